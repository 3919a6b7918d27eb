"""Intervals in the leaderboard and intervals.json, from records' per-window NLLs."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from conftest import write_recipe

from qbench.plan import plan
from qbench.recipe import RecipeError, load_recipe
from qbench.record import Record, ResultsTable
from qbench.report.intervals import comparisons, write_intervals
from qbench.report.leaderboard import leaderboard

RECIPE = """
name: s
checkpoints:
  - {name: base, seeds: [0, 1, 2], train: &t {preset: tiny, corpus: embedded, steps: 1}}
  - {name: gated, seeds: [0, 1, 2], train: {<<: *t, variant: gate-headwise}}
  - {name: twin, seeds: [0, 1, 2], train: {<<: *t, variant: preaffine}}
  - {name: solo, train: {<<: *t, seed: 9}}
quantizers:
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}
eval:
  perplexity: [{data: embedded, seq_len: 64}]
report: {baseline: base, bootstrap: {iterations: 500, seed: 1}}
"""

# Extra NLL per token under w4a4 (log of ×fp), per checkpoint: gated degrades clearly more
# than base; twin as much as base (its seeds move with base's); solo has one seed.
SHIFT = {
    "base@0": 0.040, "base@1": 0.050, "base@2": 0.030,
    "gated@0": 0.070, "gated@1": 0.081, "gated@2": 0.059,
    "twin@0": 0.041, "twin@1": 0.049, "twin@2": 0.031,
    "solo": 0.045,
}  # fmt: skip
WINDOWS, TOKENS = 48, 63


def _record(nll: np.ndarray, with_windows: bool = True) -> dict:
    ppl = math.exp(nll.sum() / (TOKENS * len(nll)))
    record = {"metrics": {"perplexity": {"embedded": ppl}}, "details": {"perplexity": {}}}
    if with_windows:
        record["details"]["perplexity"]["embedded"] = {
            "window_nll": nll.tolist(),
            "window_tokens": TOKENS,
            "windows_sha": "same-tokens",
        }
    return record


@pytest.fixture
def planned(tmp_path):
    source = write_recipe(tmp_path / "r.yaml", RECIPE)
    recipe = load_recipe(source)
    cells = plan(recipe, source)
    rng = np.random.default_rng(0)
    difficulty = rng.gamma(30.0, 8.0, WINDOWS)  # the same windows for every checkpoint
    results = {}
    for cell in cells:
        name = cell.checkpoint.name
        noise = np.random.default_rng(abs(hash(name)) % 2**32).normal(0, 0.3, WINDOWS)
        fp = difficulty + noise
        if cell.quantizer is None:
            results[cell.key] = _record(fp)
        else:
            shifted = fp + TOKENS * (SHIFT[name] + rng.normal(0, 0.004, WINDOWS))
            results[cell.key] = _record(shifted, with_windows=name != "solo")
    records = {c.key: Record.ok(c, recipe, 0.0, stages={}, **results[c.key]) for c in cells}
    return recipe, source, ResultsTable(cells, records)


def test_every_delta_has_an_interval_or_says_why_not(planned):
    recipe, source, table = planned
    board = leaderboard(recipe, source, table)
    rows = [line for line in board.splitlines() if "| w4a4 " in line and "@" in line]
    assert len(rows) == 9
    bracket = re.compile(r"\+\d+\.\d{3} \[\+\d+\.\d{3}, \+\d+\.\d{3}\] +\| 1\.\d{3} \[1\.\d{3}")
    assert all(bracket.search(row) for row in rows)
    (solo,) = [line for line in board.splitlines() if line.startswith("| solo ") and "rtn:" in line]
    assert solo.count("[no interval]") == 2
    assert "paired bootstrap over the windows (500 resamples, seed 1)" in board


def test_the_baseline_section_says_which_groups_degrade_differently(planned):
    recipe, source, table = planned
    found = {c.group: c for c in comparisons(recipe, table)}
    assert found["gated"].verdict() == "more than baseline" and found["gated"].paired_seeds
    assert found["gated"].difference.low > 0 and found["gated"].shared_windows
    assert found["twin"].verdict() == "not distinguishable"
    assert found["twin"].difference.low < 0 < found["twin"].difference.high
    assert found["base"].difference is None and found["base"].degradation.estimate > 1
    assert found["solo"].degradation is None and found["solo"].members == 0
    ratios = [math.exp(SHIFT[f"gated@{s}"]) for s in range(3)]
    assert found["gated"].degradation.estimate == pytest.approx(np.mean(ratios), rel=2e-3)
    board = leaderboard(recipe, source, table)
    assert "## Degradation against base" in board
    (gated,) = [
        line for line in board.splitlines() if line.startswith("| w4a4 ") and "gated" in line
    ]
    assert "| 3/3 " in gated and "| paired " in gated and "more than baseline" in gated
    assert "hierarchical bootstrap (500 resamples, seed 1)" in board


def test_unpaired_seeds_are_drawn_independently(planned):
    recipe, _, table = planned
    twin_2 = next(c for c in table.cells if c.checkpoint.name == "twin@2" and c.quantizer)
    records = {c.key: table.record(c) for c in table.cells if c is not twin_2}
    table = ResultsTable(table.cells, records)  # a missing cell: twin's seeds {0, 1} differ
    twin = next(c for c in comparisons(recipe, table) if c.group == "twin")
    assert twin.members == 2 and twin.of == 3 and twin.paired_seeds is False


def test_intervals_json_holds_every_cell_and_comparison(planned, tmp_path):
    recipe, _, table = planned
    path = write_intervals(recipe, table, tmp_path)
    data = json.loads(path.read_text())
    assert data["bootstrap"] == {"iterations": 500, "seed": 1, "confidence": 0.95}
    assert data["baseline"] == "base" and len(data["cells"]) == 10
    gated = next(c for c in data["cells"] if c["checkpoint"] == "gated@0")
    delta = gated["perplexity"]["embedded"]["delta"]
    assert delta["low"] < delta["estimate"] < delta["high"]
    solo = next(c for c in data["cells"] if c["checkpoint"] == "solo")
    assert "no per-window NLLs" in solo["perplexity"]["embedded"]["reason"]
    verdicts = {c["group"]: c["verdict"] for c in data["comparisons"]}
    assert verdicts == {
        "base": None,
        "gated": "more than baseline",
        "twin": "not distinguishable",
        "solo": None,
    }


def test_intervals_are_reproducible_and_follow_the_seed(planned):
    recipe, _, table = planned
    first = comparisons(recipe, table)
    assert first == comparisons(recipe, table)
    bootstrap = recipe.report.bootstrap.model_copy(update={"seed": 2})
    report = recipe.report.model_copy(update={"bootstrap": bootstrap})
    moved = comparisons(recipe.model_copy(update={"report": report}), table)
    assert [c.difference for c in moved] != [c.difference for c in first]


def test_unknown_baseline_is_a_load_time_error(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", RECIPE.replace("baseline: base", "baseline: bse"))
    with pytest.raises(
        RecipeError,
        match=r"r.yaml: report.baseline: no checkpoint group 'bse' \(did you mean 'base'",
    ):
        load_recipe(path)
    member = write_recipe(tmp_path / "m.yaml", RECIPE.replace("baseline: base", "baseline: base@0"))
    with pytest.raises(RecipeError, match="groups: base, gated, twin, solo"):
        load_recipe(member)


END_TO_END = """
name: e2e
checkpoints: [{name: a, path: LLAMA}]
quantizers:
  - {name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}
eval:
  perplexity:
    - {data: c4, seq_len: 64, max_windows: 12}
    - {name: mine, data: text, path: TEXT, seq_len: 64, max_windows: 12}
  tasks: [{name: embedded_mc, limit: 24}]
  task_options: {batch_size: 8}
report: {bootstrap: {iterations: 200}}
"""


def test_offline_run_with_c4_and_a_text_file_puts_an_interval_on_every_delta(
    tmp_path, llama_dir, monkeypatch
):
    from qbench.cli import main
    from qbench.data.sources import embedded_rows

    rows = embedded_rows("train")
    (tmp_path / "data" / "c4").mkdir(parents=True)
    (tmp_path / "data" / "c4" / "c4.utf8").write_text(
        "".join(row.replace("\n", " ") + "\n" for row in rows[:20])
    )
    (tmp_path / "mine.txt").write_text("\n\n".join(rows[20:40]))
    monkeypatch.setenv("QBENCH_DATA_DIR", str(tmp_path / "data"))
    text = END_TO_END.replace("LLAMA", str(llama_dir)).replace("TEXT", str(tmp_path / "mine.txt"))
    source = write_recipe(tmp_path / "e2e.yaml", text)
    assert main(["run", str(source), "--results", str(tmp_path), "--no-progress"]) == 0

    board = (tmp_path / "e2e" / "LEADERBOARD.md").read_text()
    quantized = [line for line in board.splitlines() if "| rtn: " in line]
    assert len(quantized) == 2
    for row in quantized:  # c4 and mine: Δ and ×fp, each 'estimate [low, high]'
        assert len(re.findall(r"[-+]?\d+\.\d{3} \[[-+]?\d+\.\d{3}, [-+]?\d+\.\d{3}\]", row)) == 4
    assert not [
        line for line in board.splitlines() if line.startswith("|") and "no interval" in line
    ]
    assert "20-document sample of C4 (en) web documents" in board and "NOT C4's" in board
    assert f"`{tmp_path / 'mine.txt'}` (a file: one document)" in board
    per_task = [line for line in board.splitlines() if line.startswith("| ") and "w4a4" in line]
    assert any(re.search(r"\| [-+]?\d+\.\d \[[-+]?\d+\.\d, [-+]?\d+\.\d\] \|", r) for r in per_task)

    record = json.loads(next((tmp_path / "e2e" / "runs").glob("a--w4a4--*.json")).read_text())
    assert len(record["details"]["perplexity"]["c4"]["window_nll"]) == 12
    assert len(record["details"]["tasks"]["embedded_mc"]["doc_scores"]) == 24
    intervals = json.loads((tmp_path / "e2e" / "intervals.json").read_text())
    cell = next(c for c in intervals["cells"] if c["quantizer"] == "w4a4")
    assert set(cell["perplexity"]) == {"c4", "mine"}
    assert cell["tasks"]["average"]["low"] <= cell["tasks"]["average"]["estimate"]
    tasks = json.loads((tmp_path / "e2e" / "tasks.json").read_text())["cells"]
    assert tasks[2]["delta_interval"] is not None and tasks[0]["delta_interval"] is None
