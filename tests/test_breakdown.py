"""The error breakdown: `breakdown: true` plans one cell per rounded part (keyed, refused and
read back from plan.json like any cell); what cannot be split is a recipe error naming the
field; the report's section gives each part's ×fp beside the whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import refusals, write_recipe

from qbench.plan import plan
from qbench.recipe import RecipeError, load_recipe
from qbench.store import read_plan, write_plan

RECIPE = """
name: b
checkpoints: [{name: local, path: LLAMA}]
quantizers:
  - name: w4a4kv4
    method: gptq
    rotate: true
    calibration: {data: embedded, sequences: 2, seq_len: 32}
    weights: {bits: 4}
    activations: {bits: 4}
    kv: {bits: 4}
    breakdown: true
  - name: w8a8
    method: smoothquant
    calibration: {data: embedded, sequences: 2, seq_len: 32}
    weights: {bits: 8}
    activations: {bits: 8}
    breakdown: true
eval:
  perplexity: [{data: embedded, seq_len: 32, max_windows: 2}]
"""


def _recipe(tmp_path: Path, llama_dir: Path, text: str = RECIPE) -> Path:
    return write_recipe(tmp_path / "b.yaml", text.replace("LLAMA", str(llama_dir)))


def test_parts_are_planned_after_their_whole_with_keys_of_their_own(tmp_path, llama_dir):
    path = _recipe(tmp_path, llama_dir)
    cells = plan(load_recipe(path), path)
    assert [c.quantizer_name for c in cells] == [
        "fp", "w4a4kv4", "w4a4kv4.weights", "w4a4kv4.activations", "w4a4kv4.kv",
        "w8a8", "w8a8.weights", "w8a8.activations",
    ]  # fmt: skip
    assert len({c.key for c in cells}) == len(cells)
    parts = {c.quantizer_name: c.quantizer for c in cells[1:]}
    weights, activations, kv = (parts[f"w4a4kv4.{p}"] for p in ("weights", "activations", "kv"))
    assert weights.steps() == "rotation+gptq" and weights.precision() == "W4A16"
    assert activations.steps() == "rotation+rtn" and activations.precision() == "W16A4"
    assert kv.precision() == "W16A16KV4" and kv.kv == parts["w4a4kv4"].kv
    assert [t.transform for t in parts["w8a8.activations"].transforms] == ["smoothquant"]
    assert not any(c.refusal for c in cells)


def test_plan_json_reads_the_parts_back(tmp_path, llama_dir):
    path = _recipe(tmp_path, llama_dir)
    recipe = load_recipe(path)
    cells = plan(recipe, path)
    write_plan(tmp_path, recipe, path, cells)
    assert [(c.quantizer_name, c.key) for c in read_plan(tmp_path, recipe)] == [
        (c.quantizer_name, c.key) for c in cells
    ]


SHARED = """
name: b
checkpoints: [{name: local, path: LLAMA}]
quantizers:
  - {name: w4a4, method: rotation, weights: {bits: 4}, activations: {bits: 4}, breakdown: true}
  - name: w4a4kv4
    method: rotation
    weights: {bits: 4}
    activations: {bits: 4}
    kv: {bits: 4}
    breakdown: true
eval:
  perplexity: [{data: embedded, seq_len: 32, max_windows: 2}]
"""


def test_two_breakdowns_share_common_parts_read_back_from_plan_json(tmp_path, llama_dir):
    """W4A4's and W4A4KV4's weights-only parts are one computation: one key, and plan.json's
    check (two cells share a key only with the same determinants) still reads them back."""
    path = _recipe(tmp_path, llama_dir, SHARED)
    recipe = load_recipe(path)
    cells = {c.quantizer_name: c for c in plan(recipe, path)}
    for part in ("weights", "activations"):
        assert cells[f"w4a4.{part}"].key == cells[f"w4a4kv4.{part}"].key
    assert cells["w4a4"].key != cells["w4a4kv4"].key
    write_plan(tmp_path, recipe, path, list(cells.values()))
    assert [c.key for c in read_plan(tmp_path, recipe)] == [c.key for c in cells.values()]


def test_a_part_is_refused_like_any_cell(tmp_path, llama_dir):
    """The KV-only part of a cache group that does not divide head_dim is refused with the
    whole, each naming itself."""
    text = RECIPE.replace("kv: {bits: 4}", "kv: {bits: 4, group: 5}")
    found = refusals(_recipe(tmp_path, llama_dir, text))
    assert set(found) == {"w4a4kv4", "w4a4kv4.kv"}
    assert "quantizers[0] 'w4a4kv4.kv'.kv.group" in found["w4a4kv4.kv"]


@pytest.mark.parametrize(
    ("quantizer", "expected"),
    [
        (
            "{name: q, method: awq, weights: {bits: 4}, activations: {bits: 4}, breakdown: true}",
            "breakdown: awq searches its scales for the weights it rounds",
        ),
        (
            "{name: q, method: rtn, weights: {bits: 4}, breakdown: true}",
            "breakdown: W4A16 rounds one part only",
        ),
        (
            "{name: q, method: quanto, weight_qtype: qint4, breakdown: true}",
            "breakdown: quanto rounds with its library's own fields",
        ),
    ],
)
def test_what_cannot_be_broken_down_is_a_recipe_error(tmp_path, llama_dir, quantizer, expected):
    text = RECIPE.split("quantizers:")[0] + f"quantizers:\n  - {quantizer}\n"
    text += "eval: {perplexity: [{data: embedded, seq_len: 32}]}\n"
    path = _recipe(tmp_path, llama_dir, text)
    with pytest.raises(RecipeError, match="quantizers\\[0\\]") as caught:
        load_recipe(path)
    assert expected in str(caught.value)


def test_a_part_name_taken_by_another_quantizer_is_an_error(tmp_path, llama_dir):
    text = RECIPE.replace("  - name: w8a8\n", "  - name: w4a4kv4.kv\n")
    with pytest.raises(RecipeError, match=r"w4a4kv4\.kv"):
        load_recipe(_recipe(tmp_path, llama_dir, text))
