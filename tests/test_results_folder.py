"""The results folder: validated records, plan.json, no pickles, no symlinks followed, umask."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_recipe
from sqlitedict import SqliteDict

from qbench import runner, store
from qbench.cli import main
from qbench.eval.tasks import evaluate_tasks, request_cache_files
from qbench.files import write_text_atomic
from qbench.sweep import plan_recipes

RECIPE = """
name: folder
checkpoints: [{{name: m, path: {path}}}]
quantizers:
  - {{name: w8, method: rtn, weights: {{bits: 8}}, activations: {{bits: 8}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 64, max_windows: 2}}]
gate:
  min_recovery: {{perplexity.embedded: 0.5}}
"""


@pytest.fixture
def finished(tmp_path, llama_dir):
    """A copy of the tiny Llama, a recipe on it, and a results folder where it ran."""
    checkpoint = shutil.copytree(llama_dir, tmp_path / "checkpoint")
    path = write_recipe(tmp_path / "folder.yaml", RECIPE.format(path=checkpoint))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--no-progress"]) == 0
    return SimpleNamespace(recipe=path, results=results, checkpoint=checkpoint)


def _runs(finished) -> Path:
    return finished.results / "folder" / "runs"


def _run(finished, *extra: str) -> int:
    return main(["run", str(finished.recipe), "--results", str(finished.results), *extra])


def _corrupt(record: Path, other: Path, how: str) -> None:
    text = record.read_text()
    if how == "truncated":
        record.write_text(text[: len(text) // 2])
    elif how == "empty":
        record.write_text("")
    elif how == "wrongly typed":
        data = json.loads(text)
        data["metrics"]["perplexity"]["embedded"] = "low"
        record.write_text(json.dumps(data))
    elif how == "another cell's record":
        record.write_text(other.read_text())
    elif how == "a symlink":
        record.unlink()
        record.symlink_to(other)
    elif how == "a directory":
        record.unlink()
        record.mkdir()


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "not a valid record: Invalid JSON"),
        ("empty", "empty"),
        ("wrongly typed", "not a valid record: metrics.perplexity.embedded: Input should be"),
        ("another cell's record", "its key is"),
        ("a symlink", "a symlink (not followed)"),
        ("a directory", "not a regular file"),
    ],
)
def test_an_invalid_record_is_moved_aside_and_recomputed(
    finished, how, reason, monkeypatch, capsys
):
    fp, w8 = (next(_runs(finished).glob(f"m--{q}--*.json")) for q in ("fp", "w8"))
    good = json.loads(w8.read_text())
    _corrupt(w8, fp, how)
    capsys.readouterr()
    real, ran = runner.run_cell, []
    monkeypatch.setattr(runner, "run_cell", lambda cell, *a: ran.append(cell) or real(cell, *a))

    assert main(["gate", str(finished.recipe), "--results", str(finished.results)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qbench: warning: {w8}: {reason}"), err
    assert "moved to" in err[0] and "will be recomputed" in err[0]
    assert len(list((_runs(finished) / ".invalid").iterdir())) == 1

    assert _run(finished, "--no-progress") == 0
    assert [c.quantizer_name for c in ran] == ["w8"]  # only the invalid cell
    again = json.loads(w8.read_text())
    assert again["metrics"] == good["metrics"] and again["key"] == good["key"]


def test_report_and_gate_results_only_need_only_the_results_folder(finished, capsys):
    """The report, and the gate with --results-only (which says so), read plan.json alone;
    the gate without it plans the recipe and fails with the checkpoint gone."""
    plan = json.loads((finished.results / "folder" / "plan.json").read_text())
    assert [(c["checkpoint"], c["quantizer"]) for c in plan["cells"]] == [("m", "fp"), ("m", "w8")]
    assert plan["perplexity_columns"] == ["embedded"]
    board = (finished.results / "folder" / "LEADERBOARD.md").read_text()
    shutil.rmtree(finished.checkpoint)
    (finished.results / "folder" / "LEADERBOARD.md").unlink()
    capsys.readouterr()

    assert main(["report", str(finished.recipe), "--results", str(finished.results)]) == 0
    gate = ["gate", str(finished.recipe), "--results", str(finished.results)]
    assert main([*gate, "--results-only"]) == 0
    out = capsys.readouterr().out
    assert "PASSED: 1 of 1 checks passed" in out and "recorded results only" in out
    assert (finished.results / "folder" / "LEADERBOARD.md").read_text() == board
    assert main(gate) == 2
    assert "gate: the recipe cannot be planned now" in capsys.readouterr().err

    # a plan.json of another version of the recipe is not used: the report plans afresh
    finished.recipe.write_text(finished.recipe.read_text().replace("bits: 8}}", "bits: 4}}"))
    assert main(["report", str(finished.recipe), "--results", str(finished.results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints[0].path: no such directory" in err[0]


def test_a_planted_pickle_in_the_request_cache_is_never_loaded(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    options = SimpleNamespace(
        batch_size=4, limit=3, num_fewshot=0, bootstrap_iters=0, log_samples=False
    )
    specs = [SimpleNamespace(name="embedded_mc", limit=None, num_fewshot=None)]
    cache = tmp_path / "results" / "cache" / "lm-eval-key"
    (fresh,) = evaluate_tasks(model, tokenizer, specs, options, cache=cache, progress=False)
    [path] = request_cache_files(cache)
    stored = SqliteDict(str(path), decode=json.loads)
    assert len(stored) == fresh.requests
    assert all(isinstance(v["answer"], list) for v in stored.values())

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    with SqliteDict(str(path), autocommit=True) as planted:  # pickling, as lm-eval's own does
        for key in list(planted.keys()):
            planted[key] = Payload()
    pickle.loads(pickle.dumps(Payload()))  # what lm-eval's own cache would do with it
    assert marker.exists()
    marker.unlink()

    (again,) = evaluate_tasks(model, tokenizer, specs, options, cache=cache, progress=False)
    assert not marker.exists()
    assert again.cached_requests == 0 and again.metrics == fresh.metrics


def test_a_symlink_at_a_claim_path_never_writes_its_target(finished, capsys):
    [planned] = plan_recipes([finished.recipe])
    cell = planned.cells[1]
    victim = finished.results.parent / "victim.txt"
    victim.write_text("keep me\n")
    path = store.claim_path(finished.results, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim)
    with store.claim(finished.results, cell) as claim:
        assert claim is not None and not path.is_symlink()
        assert store.claim_holder(finished.results, cell).endswith(f"pid {os.getpid()}")
    assert victim.read_text() == "keep me\n" and not os.path.lexists(path)
    assert "a symlink in place of a claim file" in capsys.readouterr().err


def test_left_over_claims_and_temporary_files_are_removed_by_the_next_run(finished, capsys):
    runs = _runs(finished)
    claims = runs / ".claims"
    claims.mkdir(exist_ok=True)
    (claims / "m--w8--0123456789abcdef.lock").write_text("dead-host pid 1\n")
    (claims / "planted.lock").symlink_to(finished.recipe)
    stale, fresh = runs / ".m--fp--x.json.dead.tmp", runs / ".m--fp--x.json.live.tmp"
    stale.write_text("{")
    fresh.write_text("{")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    [planned] = plan_recipes([finished.recipe])
    held = store.claim(finished.results, planned.cells[0])  # a live holder's claim stays
    capsys.readouterr()
    try:
        assert _run(finished, "--no-progress") == 0
    finally:
        held.release()
    assert "folder: removed 3 files left by killed runs" in capsys.readouterr().out
    assert list(claims.iterdir()) == [] and finished.recipe.is_file()
    assert not stale.exists() and fresh.exists()  # a recent one may be a live writer's


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_are_created_with_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "sub" / "record.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "sub" / "record.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_directory_in_place_of_the_leaderboard_is_one_error_and_keeps_the_records(
    finished, capsys
):
    board = finished.results / "folder" / "LEADERBOARD.md"
    board.unlink()
    board.mkdir()
    shutil.rmtree(_runs(finished))
    capsys.readouterr()
    assert _run(finished, "--no-progress") == 2
    err = capsys.readouterr().err  # (after transformers' loading bars)
    assert err.strip().splitlines()[-1] == (
        f"qbench: error: {board}: cannot write: a directory is in its place; remove or rename it"
    )
    assert "Traceback" not in err
    assert len(list(_runs(finished).glob("*.json"))) == 2  # the cells computed are saved


def test_report_notes_end_the_leaderboard_and_change_no_cell(finished, capsys):
    """`report.notes` are printed under "Notes" without recomputing a cell; a note beyond
    2,000 characters is one error naming the field."""
    text = finished.recipe.read_text()
    finished.recipe.write_text(text + "report: {notes: ['rotation hurts **this** model']}\n")
    capsys.readouterr()
    assert _run(finished, "--no-progress") == 0
    assert "2 cells, 2 done, 0 to run" in capsys.readouterr().out
    board = (finished.results / "folder" / "LEADERBOARD.md").read_text()
    assert "## Notes\n\n- rotation hurts **this** model\n" in board

    finished.recipe.write_text(text + f"report: {{notes: ['{'x' * 2001}']}}\n")
    assert _run(finished, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report.notes[0]: String should have at most 2000" in err[0]
