"""The regression gate: recovery against the same checkpoint's fp cell, per metric."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import write_recipe
from pydantic import ValidationError

from qbench.cli import main
from qbench.plan import plan
from qbench.recipe import RecipeError, load_recipe
from qbench.record import Record, ResultsTable
from qbench.report.gate import Check, checks

RECIPE = """
name: gated
checkpoints: [{name: llama, path: LLAMA}]
quantizers:
  - {name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}
  - {name: w2a2, method: rtn, weights: {bits: 2}, activations: {bits: 2}}
eval:
  perplexity: [{data: embedded, seq_len: 64, max_windows: 4}]
gate:
  cadence: smoke
  min_recovery: {perplexity.embedded: 0.95}
  quantizers: {w2a2: {perplexity.embedded: 0.01}}
"""


def _ok(recipe, cell, **metrics) -> Record:
    return Record.ok(cell, recipe, 0.0, metrics=metrics)


def test_recovery_is_fp_over_quantized_for_perplexity():
    check = Check("c", "q", "perplexity.embedded", 10.0, 12.5, 0.8, lower_is_better=True)
    assert check.recovery == pytest.approx(0.8) and check.passed
    accuracy = Check("c", "q", "tasks.piqa", 0.5, 0.4, 0.81, lower_is_better=False)
    assert accuracy.recovery == pytest.approx(0.8) and not accuracy.passed
    nan = Check("c", "q", "perplexity.embedded", 10.0, math.nan, 0.5, lower_is_better=True)
    assert not nan.passed


def test_checks_use_overrides_and_fail_missing_or_failed_cells(tmp_path, llama_dir):
    path = write_recipe(tmp_path / "g.yaml", RECIPE.replace("LLAMA", str(llama_dir)))
    recipe = load_recipe(path)
    cells = plan(recipe, path)
    fp, w8a8, w2a2 = cells
    records = {
        fp.key: _ok(recipe, fp, perplexity={"embedded": 10.0}),
        w8a8.key: _ok(recipe, w8a8, perplexity={"embedded": 10.4}),
    }
    found = checks(recipe, ResultsTable(cells, records))
    assert [(c.quantizer, c.threshold, c.passed, c.quantized_state) for c in found] == [
        ("w8a8", 0.95, True, "ok"),
        ("w2a2", 0.01, False, "missing"),  # no result: missing, never a pass
    ]
    records[w2a2.key] = Record.failed(w2a2, recipe, RuntimeError("boom"), 0.0)
    failed = checks(recipe, ResultsTable(cells, records))[1]
    assert failed.quantized is None and failed.quantized_state == "failed" and not failed.passed
    with pytest.raises(ValidationError, match="finite"):  # a NaN perplexity is no ok record
        _ok(recipe, w8a8, perplexity={"embedded": math.nan})


def test_a_perplexity_column_named_with_a_dot_is_gated(tmp_path, llama_dir):
    text = RECIPE.replace("LLAMA", str(llama_dir)).replace(
        "max_windows: 4}", "max_windows: 4, name: wiki.v2}"
    )
    text = text.replace("perplexity.embedded", "perplexity.wiki.v2")
    path = write_recipe(tmp_path / "g.yaml", text)
    recipe = load_recipe(path)
    cells = plan(recipe, path)
    fp, w8a8, _ = cells
    table = ResultsTable(
        cells,
        {
            fp.key: _ok(recipe, fp, perplexity={"wiki.v2": 10.0}),
            w8a8.key: _ok(recipe, w8a8, perplexity={"wiki.v2": 12.5}),
        },
    )
    check = checks(recipe, table)[0]
    assert (check.metric, check.base, check.quantized) == ("perplexity.wiki.v2", 10.0, 12.5)
    assert check.recovery == pytest.approx(0.8) and not check.passed  # threshold 0.95


def test_gate_command_passes_then_fails_on_a_strict_threshold(tmp_path, llama_dir, capsys):
    path = write_recipe(tmp_path / "g.yaml", RECIPE.replace("LLAMA", str(llama_dir)))
    results = ["--results", str(tmp_path)]
    assert main(["run", str(path), *results, "--no-progress"]) == 0
    assert main(["gate", str(path), *results]) == 0
    assert "PASSED: 2 of 2 checks passed" in capsys.readouterr().out

    strict = RECIPE.replace("0.01", "1.5").replace("LLAMA", str(llama_dir))
    path.write_text(strict)
    assert main(["gate", str(path), *results]) == 1
    out = capsys.readouterr().out
    assert "| Base" in out and "Recovery" in out and "Threshold" in out
    assert "FAIL" in out and "FAILED: 1 of 2 checks passed" in out
    assert main(["gate", str(path), *results, "--cadence", "nightly"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_reference_values_only_warn(tmp_path, llama_dir, capsys):
    reference = tmp_path / "reference.json"
    text = RECIPE.replace("LLAMA", str(llama_dir)) + f"  reference: {reference}\n"
    path = write_recipe(tmp_path / "g.yaml", text)
    results = ["--results", str(tmp_path)]
    main(["run", str(path), *results, "--no-progress"])
    assert main(["gate", str(path), *results, "--write-reference"]) == 0
    expected = json.loads(reference.read_text())
    assert set(expected) == {"llama/fp", "llama/w8a8", "llama/w2a2"}
    expected["llama/w8a8"]["perplexity.embedded"] *= 2
    reference.write_text(json.dumps(expected))
    capsys.readouterr()
    assert main(["gate", str(path), *results]) == 0
    assert "warning: llama/w8a8 perplexity.embedded" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "{perplexity.embedded: 0.95}",
            "{perplexity.wiki: 0.95}",
            "gate: unknown metric 'perplexity.wiki'",
        ),
        ("{w2a2: {", "{w2a3: {", "gate.quantizers: no quantizer 'w2a3' (did you mean 'w2a2'?)"),
        ("0.95", "-1", "threshold of perplexity.embedded must be positive"),
    ],
)
def test_gate_errors_name_the_field(tmp_path, old, new, expected):
    path = write_recipe(tmp_path / "g.yaml", RECIPE.replace(old, new).replace("LLAMA", "x"))
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_recipe(path)


def _tasks(piqa: float, lambada_ppl: float) -> dict:
    return {
        "perplexity": {"embedded": 10.0},
        "tasks": {
            "piqa": {"metric": "acc_norm", "value": piqa, "higher_is_better": True},
            "lambada": {"metric": "perplexity", "value": lambada_ppl, "higher_is_better": False},
        },
        "zero_shot_average": piqa,
    }


def test_task_metrics_are_gated_by_their_headline_value_and_direction(tmp_path, llama_dir):
    text = RECIPE.replace("LLAMA", str(llama_dir)).replace(
        "perplexity: [{data: embedded, seq_len: 64, max_windows: 4}]",
        "perplexity: [{data: embedded, seq_len: 64, max_windows: 4}]\n  tasks: [embedded_mc]",
    )
    text = text.replace("{perplexity.embedded: 0.95}", "{tasks.embedded_mc: 0.9}")
    path = write_recipe(tmp_path / "g.yaml", text)
    recipe = load_recipe(path)
    assert recipe.gate.min_recovery == {"tasks.embedded_mc": 0.9}
    fp, w8a8, w2a2 = cells = plan(recipe, path)
    table = ResultsTable(
        cells,
        {
            fp.key: _ok(recipe, fp, **_tasks(0.60, 10.0)),
            w8a8.key: _ok(recipe, w8a8, **_tasks(0.54, 12.5)),
            w2a2.key: Record.failed(w2a2, recipe, RuntimeError("boom"), 0.0),
        },
    )
    assert table.value(w8a8, "tasks.piqa") == 0.54
    assert table.value(w8a8, "zero_shot_average") == 0.54
    assert table.value(w2a2, "tasks.piqa") is None and table.state(w2a2) == "failed"
    for metric, recovery in (("tasks.piqa", 0.9), ("tasks.lambada", 0.8)):
        check = Check(
            "c",
            "q",
            metric,
            table.value(fp, metric),
            table.value(w8a8, metric),
            0.85,
            lower_is_better=table.lower_is_better(metric),
        )
        assert check.recovery == pytest.approx(recovery) and check.passed == (recovery >= 0.85)
