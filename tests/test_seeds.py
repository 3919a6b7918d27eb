"""Seed groups aggregate the right cells; missing values stay missing."""

from __future__ import annotations

import operator
import statistics

import pytest
from conftest import write_recipe

from qbench.plan import plan
from qbench.recipe import load_recipe
from qbench.record import Record, ResultsTable
from qbench.report.seeds import checkpoint_groups, group_values, seed_section, spread

RECIPE = """
name: s
checkpoints:
  - {name: base, seeds: [0, 1, 2], train: {preset: tiny, corpus: embedded, steps: 1}}
  - {name: solo, train: {preset: tiny, corpus: embedded, steps: 1, seed: 9}}
quantizers:
  - {name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}
eval:
  perplexity: [{data: embedded, seq_len: 64}]
"""

# (checkpoint, quantizer) -> perplexity; base@2 x w4a4 has no result.
PERPLEXITY = {
    ("base@0", "fp"): 10.0,
    ("base@0", "w4a4"): 12.0,
    ("base@1", "fp"): 11.0,
    ("base@1", "w4a4"): 14.0,
    ("base@2", "fp"): 13.0,
    ("solo", "fp"): 20.0,
    ("solo", "w4a4"): 21.0,
}


@pytest.fixture
def planned(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", RECIPE))
    cells = plan(recipe, tmp_path / "r.yaml")
    records = {}
    for cell in cells:
        value = PERPLEXITY.get((cell.checkpoint.name, cell.quantizer_name))
        if value is not None:
            metrics = {"perplexity": {"embedded": value}}
            records[cell.key] = Record.ok(cell, recipe, 0.0, metrics=metrics)
    return recipe, ResultsTable(cells, records)


def test_groups_follow_seeds(planned):
    recipe, _ = planned
    groups = checkpoint_groups(recipe)
    assert {k: [c.name for c in v] for k, v in groups.items()} == {
        "base": ["base@0", "base@1", "base@2"],
        "solo": ["solo"],
    }


def test_values_and_deltas_come_from_each_members_own_cells(planned):
    recipe, table = planned
    members = checkpoint_groups(recipe)["base"]
    fp = group_values(members, "fp", table, "perplexity.embedded")
    w4a4 = group_values(members, "w4a4", table, "perplexity.embedded")
    deltas = group_values(members, "w4a4", table, "perplexity.embedded", operator.sub)
    assert fp == [10.0, 11.0, 13.0]
    assert w4a4 == [12.0, 14.0, None]
    assert deltas == [2.0, 3.0, None]


def test_spread_skips_missing_values_and_none_is_missing():
    aggregate = spread([12.0, None, 14.0])
    assert (aggregate.mean, aggregate.n, aggregate.low, aggregate.high) == (13.0, 2, 12.0, 14.0)
    assert aggregate.std == pytest.approx(statistics.stdev([12.0, 14.0]))
    assert spread([None, None]) is None
    assert spread([5.0]).std is None and spread([5.0]).format("{:.1f}") == "5.0"


def _rows(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """(group, quantizer) -> the row's cells, from a github-style markdown table."""
    table = "\n".join(lines).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table if line.startswith("|")]
    return {(row[0], row[1]): row[2:] for row in cells}


def test_seed_table_shows_counts_and_missing(planned):
    recipe, table = planned
    rows = _rows(seed_section(recipe, table))
    assert rows[("base", "fp")] == ["3/3", "11.333 ± 1.528", "", ""]
    assert rows[("base", "w4a4")] == ["2/3", "13.000 ± 1.414", "+2.500 ± 0.707", "1.2364 ± 0.0514"]
    assert rows[("solo", "w4a4")] == ["1/1", "21.000", "+1.000", "1.0500"]
    empty = _rows(seed_section(recipe, ResultsTable(table.cells, {})))
    assert empty[("base", "w4a4")] == ["0/3", "missing", "missing", "missing"]
