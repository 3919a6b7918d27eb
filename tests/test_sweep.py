"""Sweeps: failures recorded and retried, concurrent sweeps, shared calibration, Ray == local."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, needs_wikitext, write_recipe
from transformers import AutoModelForCausalLM, Qwen3Config

from qbench import runner, store
from qbench.checkpoints.spec import CheckpointIdentity
from qbench.cli import main
from qbench.errors import QBenchError
from qbench.executors import RayExecutor, _cells_at_once, _check_resources
from qbench.quant import context
from qbench.quant.methods import gptq, smoothquant
from qbench.quant.quantizer import QuantizerConfig
from qbench.recipe import RecipeError, load_recipe
from qbench.sweep import Job, plan_recipes, sweep

EVAL = "eval:\n  perplexity: [{data: embedded, seq_len: 64, max_windows: 2}]\n"
CALIBRATION = "calibration: {data: embedded, split: valid, sequences: 4, seq_len: 64}"


def _records(results: Path, recipe: str) -> dict[tuple[str, str], dict]:
    found = {}
    for path in (results / recipe / "runs").glob("*.json"):
        data = json.loads(path.read_text())
        found[data["checkpoint"]["name"], data["quantizer"]["name"]] = data
    return found


@pytest.fixture(scope="module")
def nan_llama_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with one NaN weight: every forward pass gives NaN logits."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    path = tmp_path_factory.mktemp("nan-llama")
    model.save_pretrained(path)
    for file in llama_dir.glob("tokenizer*"):
        (path / file.name).write_bytes(file.read_bytes())
    return path


FAULTS = f"""
name: faults
checkpoints:
  - {{name: good, path: GOOD}}
  - {{name: broken, path: BROKEN}}
quantizers:
  - {{name: w8a8, method: rtn, weights: {{bits: 8}}, activations: {{bits: 8}}}}
  - {{name: boom, method: rtn, weights: {{bits: 4}}}}
{EVAL}gate:
  min_recovery: {{perplexity.embedded: 0.5}}
"""


def test_failed_cells_are_recorded_reported_and_only_they_are_retried(
    tmp_path, llama_dir, nan_llama_dir, monkeypatch, capsys
):
    text = FAULTS.replace("GOOD", str(llama_dir)).replace("BROKEN", str(nan_llama_dir))
    path = write_recipe(tmp_path / "faults.yaml", text)
    results = ["--results", str(tmp_path)]
    real_apply = QuantizerConfig.apply

    def apply(self, model, *args, **kwargs):
        if self.name == "boom":
            raise RuntimeError("boom: a simulated failure")
        return real_apply(self, model, *args, **kwargs)

    monkeypatch.setattr(QuantizerConfig, "apply", apply)
    assert main(["run", str(path), *results, "--no-progress"]) == 1  # every cell ran
    records = _records(tmp_path, "faults")
    assert len(records) == 6
    assert {k for k, r in records.items() if r["status"] == "ok"} == {
        ("good", "fp"),
        ("good", "w8a8"),
    }
    boom = records["good", "boom"]
    assert boom["error"]["type"] == "RuntimeError" and "simulated" in boom["error"]["message"]
    assert "in apply" in boom["error"]["traceback"] and "metrics" not in boom
    for quantizer in ("fp", "w8a8"):  # NaN logits: a failed cell, not a NaN number
        error = records["broken", quantizer]["error"]
        assert error["type"] == "NonFiniteMetricError" and "nan" in error["message"]
    out = capsys.readouterr()
    assert "[3/6] faults: good x boom: FAILED RuntimeError: boom" in out.out
    assert "4 of 6 cells failed" in out.err

    board = (tmp_path / "faults" / "LEADERBOARD.md").read_text()
    assert "2 of 6 cells have results, 4 failed" in board and "## Failed cells" in board
    table, failures = board.split("## Failed cells")
    assert re.search(r"\| good +\| boom .*\| failed", table) and "nan" not in table.lower()
    assert re.search(r"\| broken +\| fp +\| NonFiniteMetricError: non-finite", failures)

    assert main(["gate", str(path), *results]) == 1
    gate = capsys.readouterr().out
    assert re.search(r"good +\| w8a8 .*\| pass", gate)
    assert re.search(r"good +\| boom .*\| failed .*FAIL", gate)
    assert "failed cell: broken/fp: NonFiniteMetricError" in gate
    assert "FAILED: 1 of 4 checks passed; 4 cells failed" in gate

    monkeypatch.setattr(QuantizerConfig, "apply", real_apply)  # the cause of boom is fixed
    real_run_cell, ran = runner.run_cell, []

    def counting_run_cell(cell, *args, **kwargs):
        ran.append((cell.checkpoint.name, cell.quantizer_name))
        return real_run_cell(cell, *args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", counting_run_cell)
    assert main(["run", str(path), *results, "--no-progress"]) == 1  # broken still NaN
    assert "6 cells, 2 done, 4 to run (4 failed before: retried)" in capsys.readouterr().out
    assert sorted(ran) == [("broken", q) for q in ("boom", "fp", "w8a8")] + [("good", "boom")]
    assert _records(tmp_path, "faults")["good", "boom"]["status"] == "ok"


def test_sweep_of_two_recipes_loads_their_shared_checkpoint_once(
    tmp_path, llama_dir, monkeypatch, capsys
):
    quantizers = {
        "a": "[{name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}]",
        "b": "[{name: w4a16, method: rtn, weights: {bits: 4}}]",
    }
    paths = [
        write_recipe(
            tmp_path / f"{name}.yaml",
            f"name: {name}\ncheckpoints: [{{name: m{name}, path: {llama_dir}}}]\n"
            f"quantizers: {quantizers[name]}\n{EVAL}",
        )
        for name in quantizers
    ]
    real_load, loads = runner.load_identified, []
    monkeypatch.setattr(runner, "load_identified", lambda *a: loads.append(1) or real_load(*a))
    assert main(["sweep", *map(str, paths), "--results", str(tmp_path), "--no-progress"]) == 0
    assert len(loads) == 1
    for name in quantizers:
        assert len(_records(tmp_path, name)) == 2
        assert "2 of 2 cells have results" in (tmp_path / name / "LEADERBOARD.md").read_text()
    out = capsys.readouterr().out
    assert "[4/4] b: mb x w4a16" in out

    paths[1].write_text(paths[1].read_text().replace("name: b", "name: a"))
    with pytest.raises(RecipeError, match=r"b\.yaml: name: 'a' is also the name of .*a\.yaml"):
        plan_recipes(paths)


def test_cells_of_a_checkpoint_share_calibration_and_match_cells_run_alone(
    tmp_path, llama_dir, monkeypatch
):
    text = f"""
name: shared
checkpoints: [{{name: llama, path: {llama_dir}}}]
quantizers:
  - {{name: sq5, method: smoothquant, alpha: 0.5, {CALIBRATION}, weights: {{bits: 4}}}}
  - {{name: sq8, method: smoothquant, alpha: 0.8, {CALIBRATION},
      weights: {{bits: 8}}, activations: {{bits: 8}}}}
  - {{name: gptq4, method: gptq, {CALIBRATION}, weights: {{bits: 4}}}}
  - {{name: gptq3, method: gptq, act_order: true, {CALIBRATION}, weights: {{bits: 3}}}}
{EVAL}"""
    path = write_recipe(tmp_path / "shared.yaml", text)
    calls = {"windows": 0, "absmax": 0, "hessians": 0}
    for module, name, counter in (
        (context, "sample_windows", "windows"),
        (smoothquant, "norm_output_absmax", "absmax"),
        (gptq, "input_hessians", "hessians"),
    ):
        real = getattr(module, name)

        def counted(*args, _real=real, _counter=counter, **kwargs):
            calls[_counter] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    [planned] = plan_recipes([path])
    assert not sweep([planned], tmp_path / "swept", progress=False).failed
    # one window sample and one absmax for all four; GPTQ layer 0 shared, layer 1 per cell
    assert calls == {"windows": 1, "absmax": 1, "hessians": 1 + 2}

    swept = _records(tmp_path / "swept", "shared")
    for cell in planned.cells[1:]:
        alone = runner.Worker(progress=False).execute(cell, planned.recipe, tmp_path / "alone")
        alone, shared = alone.to_json(), swept["llama", cell.quantizer_name]
        assert alone["metrics"] == shared["metrics"] and alone["stages"] == shared["stages"]


def test_two_sweeps_on_one_results_folder_share_the_cells(tmp_path, llama_dir):
    quantizers = "\n".join(
        f"  - {{name: w{b}a8, method: rtn, weights: {{bits: {b}}}, activations: {{bits: 8}}}}"
        for b in range(2, 9)
    )
    path = write_recipe(
        tmp_path / "both.yaml",
        f"name: both\ncheckpoints: [{{name: llama, path: {llama_dir}}}]\nquantizers:\n"
        f"{quantizers}\neval:\n  perplexity: [{{data: embedded, seq_len: 128, max_windows: 16}}]\n",
    )
    command = [sys.executable, "-m", "qbench.cli", "sweep", str(path), "--results", str(tmp_path)]
    sweeps = [
        subprocess.Popen(
            [*command, "--no-progress"], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in sweeps]
    assert [process.returncode for process in sweeps] == [0, 0]
    computed = [re.findall(r"\] both: llama x (\w+): perplexity", out) for out in outputs]
    assert sorted(computed[0] + computed[1]) == sorted(["fp", *(f"w{b}a8" for b in range(2, 9))])
    assert all(computed), f"each sweep should compute some cells: {outputs}"
    records = _records(tmp_path, "both")
    assert len(records) == 8 and all(r["status"] == "ok" for r in records.values())
    assert {r["worker"]["pid"] for r in records.values()} == {p.pid for p in sweeps}
    runs = tmp_path / "both" / "runs"
    assert list(runs.glob(".*.tmp")) == [] and list((runs / ".claims").iterdir()) == []


def test_claims_are_exclusive_and_released(tmp_path, llama_dir):
    path = write_recipe(
        tmp_path / "c.yaml", f"name: c\ncheckpoints: [{{name: m, path: {llama_dir}}}]\n{EVAL}"
    )
    [planned] = plan_recipes([path])
    cell = planned.cells[0]
    store.claim_path(tmp_path, cell).parent.mkdir(parents=True)
    store.claim_path(tmp_path, cell).write_text("dead-host pid 1\n")  # left by a dead process
    first = store.claim(tmp_path, cell)
    assert first is not None and store.claim(tmp_path, cell) is None
    assert store.claim_holder(tmp_path, cell).endswith(f"pid {os.getpid()}")
    first.release()
    assert not store.claim_path(tmp_path, cell).exists()
    with store.claim(tmp_path, cell) as again:
        assert again is not None


def test_ray_executor_gives_the_local_executor_results(tmp_path, llama_dir, capsys):
    path = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: r
checkpoints: [{{name: llama, path: {llama_dir}}}]
quantizers:
  - {{name: w8a8, method: rtn, weights: {{bits: 8}}, activations: {{bits: 8}}}}
  - {{name: sq, method: smoothquant, {CALIBRATION}, weights: {{bits: 4}}}}
{EVAL}""",
    )
    planned = plan_recipes([path])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task with one CPU runs: the same float sums
    try:
        assert not sweep(planned, tmp_path / "local", progress=False).failed
    finally:
        torch.set_num_threads(threads)
    tally = sweep(planned, tmp_path / "ray", RayExecutor(num_cpus=2), progress=False)
    assert len(tally.ran) == 3 and not tally.failed
    assert "ray: 3 cells on 2 CPUs, 0 GPUs" in capsys.readouterr().out
    local, ray = (
        {p.name: json.loads(p.read_text()) for p in (tmp_path / run / "r" / "runs").glob("*.json")}
        for run in ("local", "ray")
    )
    assert local.keys() == ray.keys() and len(local) == 3
    for name, record in local.items():
        for field in ("key", "status", "checkpoint", "quantizer", "metrics", "details", "stages"):
            assert ray[name][field] == record[field]
        assert ray[name]["worker"]["pid"] != os.getpid()


def test_ray_resources_are_checked_against_the_cluster(tmp_path, llama_dir):
    path = write_recipe(
        tmp_path / "g.yaml",
        f"name: g\ncheckpoints: [{{name: m, path: {llama_dir}}}]\n{EVAL}"
        "resources: {gpus_per_cell: 1}\n",
    )
    [planned] = plan_recipes([path])
    jobs = [Job(planned.recipe, path, cell) for cell in planned.cells]
    with pytest.raises(QBenchError, match=r"g\.yaml: resources\.gpus_per_cell: 1 per cell, but"):
        _check_resources(jobs, {"CPU": 2.0})
    _check_resources(jobs, {"CPU": 2.0, "GPU": 1.0})
    assert _cells_at_once(jobs, {"CPU": 16.0, "GPU": 4.0}) == 4  # GPUs bound, not CPUs
    path.write_text(path.read_text().replace("gpus_per_cell: 1", "gpus_per_cell: 1.5"))
    with pytest.raises(RecipeError, match=r"resources\.gpus_per_cell: 1\.5: give a fraction"):
        load_recipe(path)


QWEN3_0_6B = dict(  # Qwen/Qwen3-0.6B's published config.json (sizes that planning checks)
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
)


@needs_wikitext
def test_ci_gpu_recipe_loads_and_plans(monkeypatch):
    from qbench import plan as planner

    real = planner.checkpoint_config

    def config(spec, commit=None):  # the hub is unreachable here: Qwen3-0.6B's config, by hand
        return Qwen3Config(**QWEN3_0_6B) if spec.hf == "Qwen/Qwen3-0.6B" else real(spec, commit)

    def identity(spec):  # and its commit
        return CheckpointIdentity(hf=spec.hf, revision="main", commit="0" * 40)

    monkeypatch.setattr(planner, "checkpoint_config", config)
    monkeypatch.setattr(planner, "checkpoint_identity", identity)
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/ci-gpu.yaml")
    assert recipe.gate.cadence == "nightly" and recipe.resources.gpus_per_cell == 1
    [planned] = plan_recipes([Path("recipes/ci-gpu.yaml")])
    assert len(planned.cells) == len(recipe.checkpoints) * (1 + len(recipe.quantizers))
