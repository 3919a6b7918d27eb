"""A recipe runs end to end; reruns do no work; interrupted runs resume with equal numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from qbench import runner
from qbench.cli import main
from qbench.sweep import plan_recipes, sweep

TRAINED = """
name: e2e
checkpoints:
  - {name: tiny, train: {preset: tiny, steps: 20}}
quantizers:
  - {name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}
  - {name: w4a16-g32, method: rtn, weights: {bits: 4, group: 32}}
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}
eval:
  perplexity: [{data: embedded, seq_len: 128, max_windows: 6}]
"""


def _metrics(results: Path) -> dict[str, float]:
    found = {}
    for path in (results / "e2e" / "runs").glob("*.json"):
        data = json.loads(path.read_text())
        found[data["quantizer"]["name"]] = data["metrics"]["perplexity"]["embedded"]
    return found


def test_recipe_runs_to_a_leaderboard_and_a_rerun_does_no_work(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "e2e.yaml", TRAINED)
    assert main(["run", str(recipe), "--results", str(tmp_path), "--no-progress"]) == 0
    runs = sorted((tmp_path / "e2e" / "runs").glob("*.json"))
    assert len(runs) == 4
    result = json.loads(runs[0].read_text())
    for field in (
        "recipe",
        "checkpoint",
        "quantizer",
        "stage",
        "metrics",
        "seed",
        "versions",
        "wall_time_s",
        "key",
    ):
        assert field in result
    scores = _metrics(tmp_path)
    assert scores["fp"] < scores["w4a4"] and scores["fp"] <= scores["w8a8"] * 1.01

    board = (tmp_path / "e2e" / "LEADERBOARD.md").read_text()
    assert "4 of 4 cells have results" in board and "GPTQ-style token perplexity" in board
    rows = [line for line in board.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == ["fp", "w8a8", "w4a16-g32", "w4a4"]
    best = min(v for k, v in scores.items() if k != "fp")
    assert f"**{best:.3f}**" in board

    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: pytest.fail("recomputed a cell"))
    capsys.readouterr()
    assert main(["run", str(recipe), "--results", str(tmp_path), "--no-progress"]) == 0
    assert "4 cells, 4 done, 0 to run" in capsys.readouterr().out


def test_interrupted_run_resumes_with_identical_numbers(tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "e2e.yaml", TRAINED)
    sweep(plan_recipes([path]), tmp_path / "straight", progress=False)

    real_run_cell, calls = runner.run_cell, []

    def interrupt_third(*args, **kwargs):
        calls.append(args[0].quantizer_name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        sweep(plan_recipes([path]), tmp_path / "resumed", progress=False)
    assert len(_metrics(tmp_path / "resumed")) == 2
    calls.clear()
    sweep(plan_recipes([path]), tmp_path / "resumed", progress=False)
    assert calls == ["w4a16-g32", "w4a4"]  # only the unfinished cells ran
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")


def test_killed_process_leaves_no_partial_result_and_rerun_completes(tmp_path, llama_dir):
    quantizers = "\n".join(
        f"  - {{name: q{b}, method: rtn, weights: {{bits: {b}}}, activations: {{bits: 8}}}}"
        for b in range(2, 9)
    )
    recipe = write_recipe(
        tmp_path / "kill.yaml",
        f"""
name: kill
checkpoints: [{{name: llama, path: {llama_dir}}}]
quantizers:
{quantizers}
eval:
  perplexity: [{{data: embedded, split: train, seq_len: 256, max_windows: 120}}]
""",
    )
    command = [
        sys.executable,
        "-m",
        "qbench.cli",
        "run",
        str(recipe),
        "--results",
        str(tmp_path),
        "--no-progress",
    ]
    runs = tmp_path / "kill" / "runs"
    process = subprocess.Popen(
        command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list(runs.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.read_text() for p in runs.glob("*.json")}
    assert 1 <= len(finished) < 8, "the kill should land mid-run"
    assert all(json.loads(text)["metrics"] for text in finished.values())

    subprocess.run(command, check=True, env=os.environ.copy(), capture_output=True)
    after = {p.name: p.read_text() for p in runs.glob("*.json")}
    assert len(after) == 8 and all(after[name] == text for name, text in finished.items())
    assert list(runs.glob(".*.tmp")) == []
    assert list((runs / ".claims").iterdir()) == []  # the dead run's claim blocked nothing
