"""The papers' interventions (ablations, not quantizers): each does exactly what it says on a
tiny Llama with a planted super weight / massive activation, and the runner's restore puts the
float model back after each (two cells in a row)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import PLANTED_COLUMN, PLANTED_ROW, _save, planted_llama, write_recipe
from torch.nn import functional as F
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.cli import main
from qbench.errors import RefusedError
from qbench.plan import plan
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.meters import measured
from qbench.recipe import load_recipe
from qbench.runner import Worker

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 4}
SEARCH = {"min_ratio": 20, "calibration": CALIBRATION}
DOWN = "model.layers.0.mlp.down_proj"


def _ablation(tokenizer_dir, model, **fields) -> dict:
    config = QuantizerConfig.model_validate({"name": "a", **fields})
    assert config.precision() == "fp (ablation)"
    return quantize_(model, config, AutoTokenizer.from_pretrained(tokenizer_dir))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, model) -> dict[str, torch.Tensor]:
    """{parameter: indices of the changed entries}."""
    after = model.state_dict()
    return {k: (v != after[k]).nonzero() for k, v in before.items() if not torch.equal(v, after[k])}


def _down_io(model, ids=IDS) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of layer 0's down_proj, as the model's hooks leave the output."""
    seen = []
    handle = model.get_submodule(DOWN).register_forward_hook(
        lambda _, args, y: seen.append((args[0].detach(), y.detach()))
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def test_zero_super_weights_zeroes_the_planted_weight_and_nothing_else(tokenizer_dir):
    model = planted_llama()
    before = _state(model)
    report = _ablation(tokenizer_dir, model, method="zero_super_weights", **SEARCH)
    changed = _changed(before, model)
    assert list(changed) == [f"{DOWN}.weight"]
    assert changed[f"{DOWN}.weight"].tolist() == [[PLANTED_ROW, PLANTED_COLUMN]]
    assert model.get_submodule(DOWN).weight[PLANTED_ROW, PLANTED_COLUMN].item() == 0
    ((entry),) = report["ablations"]
    assert entry["transform"] == "zero_super_weights" and not entry["restored_activation"]
    assert [(w["row"], w["column"], w["value"]) for w in entry["zeroed"]] == [
        (PLANTED_ROW, PLANTED_COLUMN, 2.0)
    ]


def test_sw_sa_restores_the_super_activation_at_each_sequences_peak_only(tokenizer_dir):
    fp = planted_llama()
    x, y_fp = _down_io(fp)
    model = planted_llama()
    _ablation(tokenizer_dir, model, method="zero_super_weights", restore_activation=True, **SEARCH)
    x_sa, y_sa = _down_io(model)
    assert torch.equal(x_sa, x)  # layer 0's MLP input is the fp model's
    zeroed = model.get_submodule(DOWN).weight
    assert zeroed[PLANTED_ROW, PLANTED_COLUMN].item() == 0
    y_zero = F.linear(x, zeroed)
    peak = y_fp[..., PLANTED_ROW].abs().argmax(dim=-1)  # [batch]: where the SA sits
    expected = y_zero.clone()
    expected[torch.arange(2), peak, PLANTED_ROW] = y_fp[torch.arange(2), peak, PLANTED_ROW]
    torch.testing.assert_close(y_sa, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(y_sa[0, peak[0] - 1], y_zero[0, peak[0] - 1])  # elsewhere: zeroed
    assert not torch.allclose(y_sa, y_zero)


def test_the_control_zeroes_the_largest_other_weight_of_the_same_matrix(tokenizer_dir):
    model = planted_llama()
    before = _state(model)
    magnitude = before[f"{DOWN}.weight"].abs()
    magnitude[PLANTED_ROW, PLANTED_COLUMN] = -1
    largest = divmod(int(magnitude.argmax()), magnitude.shape[1])
    report = _ablation(tokenizer_dir, model, method="zero_large_weights", **SEARCH)
    changed = _changed(before, model)
    assert list(changed) == [f"{DOWN}.weight"]
    assert changed[f"{DOWN}.weight"].tolist() == [list(largest)]
    assert model.get_submodule(DOWN).weight[largest].item() == 0
    assert model.get_submodule(DOWN).weight[PLANTED_ROW, PLANTED_COLUMN].item() == 2.0
    (entry,) = report["ablations"]
    assert [(z["row"], z["column"]) for z in entry["zeroed"]] == [largest]


def test_clip_cuts_the_residual_stream_at_the_threshold_and_counts_it(tokenizer_dir):
    model = planted_llama()
    unclipped, clipped = [], []
    for block in model.model.layers:  # before the ablation's hooks: sees what they clip
        block.register_forward_hook(lambda _, __, h: unclipped.append(h.detach().clone()))
    report = _ablation(tokenizer_dir, model, method="clip_massive_activations", threshold=10)
    for block in model.model.layers:  # after them
        block.register_forward_hook(lambda _, __, h: clipped.append(h.detach().clone()))
    with torch.no_grad():
        model(input_ids=IDS)
    assert unclipped[0].abs().max() > 50  # the planted massive activation
    for before, after in zip(unclipped, clipped, strict=True):
        torch.testing.assert_close(after, before.clamp(-10, 10), rtol=0, atol=0)
    report = measured(report, model)
    beyond = sum(int((h.abs() > 10).sum()) for h in unclipped)
    assert report["clipped"]["elements"] == [beyond, sum(h.numel() for h in unclipped)]
    assert str(PLANTED_ROW) in report["clipped"]["channels"]


def _attention(model, ids=IDS) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True).attentions


def test_removing_the_sink_zeroes_key_0_for_later_queries_and_renormalises(tokenizer_dir):
    fp = planted_llama()
    fp.set_attn_implementation("eager")
    model = planted_llama()
    model.set_attn_implementation("eager")
    report = _ablation(tokenizer_dir, model, method="remove_attention_sink")
    assert report["ablations"] == [{"transform": "remove_attention_sink", "attention_modules": 2}]
    before, after = _attention(fp)[0], _attention(model)[0]  # layer 0 sees the same input
    assert torch.equal(after[:, :, 1:, 0], torch.zeros_like(after[:, :, 1:, 0]))
    torch.testing.assert_close(after.sum(-1), torch.ones_like(after.sum(-1)))
    renormalised = before[:, :, 1:, 1:] / (1 - before[:, :, 1:, :1])
    torch.testing.assert_close(after[:, :, 1:, 1:], renormalised, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[:, :, 0], before[:, :, 0])  # query 0 keeps its only key
    sdpa = planted_llama()  # sdpa's causal mask is left to the kernel: qbench builds one
    _ablation(tokenizer_dir, sdpa, method="remove_attention_sink")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=IDS).logits, model(input_ids=IDS).logits)
        cached = model(input_ids=IDS[:, :-1], use_cache=True)
        step = model(input_ids=IDS[:, -1:], past_key_values=cached.past_key_values)
        full = model(input_ids=IDS).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)


def test_no_spike_no_super_weight_says_how_far(tokenizer_dir):
    with pytest.raises(RefusedError, match=r"no super weight: no MLP output spike reaches"):
        _ablation(tokenizer_dir, planted_llama(super_weight=False), method="zero_super_weights")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"transforms": ["smoothquant", {"transform": "clip_massive_activations",
                                            "threshold": 1}],
             "rounding": "rtn", "weights": {"bits": 4}, "activations": {"bits": 4}},
            "clip_massive_activations is an ablation: put it before",
        ),
        (
            {"transforms": [{"transform": "clip_massive_activations", "threshold": 1},
                            "rotation"],
             "rounding": "rtn", "weights": {"bits": 4}},
            "a rotation mixes",
        ),
        (
            {"transforms": [{"transform": "zero_super_weights", "restore_activation": True}],
             "rounding": "rtn", "weights": {"bits": 4}},
            "use it alone (rounding: none)",
        ),
        ({"method": "none"}, "rounding: none rounds nothing: it takes ablation transforms"),
        ({"method": "remove_attention_sink", "kv": {"bits": 4}}, "rounds nothing: remove kv"),
        ({"method": "clip_massive_activations"}, "threshold"),
    ],
)  # fmt: skip
def test_bad_pipelines_are_refused_with_a_reason(fields, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        QuantizerConfig.model_validate({"name": "q", **fields})


def test_an_ablation_composes_with_a_quantizer(tokenizer_dir):
    config = QuantizerConfig.model_validate(
        {
            "name": "clip-w4a4",
            "transforms": [{"transform": "clip_massive_activations", "threshold": 10}],
            "rounding": "rtn",
            "weights": {"bits": 4},
            "activations": {"bits": 4},
        }
    )
    assert config.precision() == "W4A4 (ablation)" and config.ablation
    assert "clip the residual stream at ±10" in config.label()
    model = planted_llama()
    quantize_(model, config, AutoTokenizer.from_pretrained(tokenizer_dir))
    seen = []
    model.model.layers[0].register_forward_hook(lambda _, __, h: seen.append(h))
    with torch.no_grad():
        model(input_ids=IDS)
    assert seen[0].abs().max() <= 10  # clipped, in the rounded model
    assert type(model.get_submodule(DOWN)).__name__ == "QuantLinear"


def test_the_qbench_familys_own_attention_refuses_sink_removal(tiny_model):
    config = QuantizerConfig.model_validate({"name": "q", "method": "remove_attention_sink"})
    assert "computes attention itself" in config.refusal(inventory(tiny_model("baseline")))
    assert config.refusal(inventory(planted_llama())) is None


RECIPE = """
name: ablate
checkpoints:
  - {{name: planted, path: {path}}}
quantizers:
  - {{name: zero-sw, method: zero_super_weights, {search}}}
  - {{name: zero-sw-sa, method: zero_super_weights, restore_activation: true, {search}}}
  - {{name: zero-control, method: zero_large_weights, {search}}}
  - {{name: clip-10, method: clip_massive_activations, threshold: 10}}
  - {{name: no-sink, method: remove_attention_sink}}
  - name: clip-10-w4a4
    transforms: [{{transform: clip_massive_activations, threshold: 10}}]
    rounding: rtn
    weights: {{bits: 4}}
    activations: {{bits: 4}}
  - {{name: w4a4-first, method: rtn, weights: {{bits: 4}}, activations: {{bits: 4}},
     kv: {{bits: 4}}, keep_float: {{first_tokens: 1, super_weights: {{{search}}}}}}}
eval:
  perplexity: [{{data: embedded, seq_len: 32, max_windows: 6}}]
"""
SEARCH_YAML = (
    "min_ratio: 20, calibration: {data: embedded, sequences: 4, seq_len: 32, batch_size: 4}"
)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, tokenizer_dir):
    return _save(planted_llama(), tokenizer_dir, tmp_path_factory.mktemp("planted"))


def test_the_runner_restores_the_float_model_after_each_intervention(tmp_path, planted_dir):
    path = write_recipe(
        tmp_path / "ablate.yaml", RECIPE.format(path=planted_dir, search=SEARCH_YAML)
    )
    recipe = load_recipe(path)
    cells = plan(recipe, path)
    fp_cell = cells[0]
    worker = Worker(progress=False)
    reference = worker.execute(fp_cell, recipe, tmp_path)
    model = worker.context(fp_cell).model
    state = _state(model)
    attention = model.config._attn_implementation
    for cell in cells[1:]:
        record = worker.execute(cell, recipe, tmp_path)
        assert record.finished, record.error
        assert record.stage == ("ablation" if cell.quantizer.rounding.float_only else "quantized")
        assert worker.context(fp_cell).model is model  # restored, not reloaded
        again = worker.execute(fp_cell, recipe, tmp_path)  # the next cell sees the fp model
        assert again.details.perplexity == reference.details.perplexity, cell.quantizer_name
        assert model.config._attn_implementation == attention
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert not hasattr(model, "qbench_meters")
        after = _state(model)
        assert all(torch.equal(after[k], v) for k, v in state.items()), cell.quantizer_name
    assert worker.loads == 1


def test_a_recipe_shows_the_interventions_in_their_own_block(tmp_path, planted_dir):
    path = write_recipe(
        tmp_path / "ablate.yaml", RECIPE.format(path=planted_dir, search=SEARCH_YAML)
    )
    assert main(["run", str(path), "--results", str(tmp_path), "--no-progress"]) == 0
    board = (tmp_path / "ablate" / "LEADERBOARD.md").read_text()
    main_table, _, section = board.partition("## Interventions (ablations, not quantizers)")
    assert section, board
    ablations = ["zero-sw", "zero-sw-sa", "zero-control", "clip-10", "no-sink", "clip-10-w4a4"]
    rows = {cells[1]: cells for cells in _rows(section)}
    assert list(rows) == ablations
    for name in ablations[:-1]:  # precision; ×fp with its interval
        assert rows[name][2] == "fp (ablation)" and re.match(r"\d\.\d+ \[", rows[name][-1])
    assert rows["clip-10-w4a4"][2] == "W4A4 (ablation)"
    assert f"{DOWN}[{PLANTED_ROW}, {PLANTED_COLUMN}]" in rows["zero-sw"][4]
    assert "SA restored" in rows["zero-sw-sa"][4] and "clipped " in rows["clip-10"][4]
    # the evaluation's elements only (6 windows x 32 tokens x 64 channels x 2 blocks), not the
    # transformed stage's: the same count for the ablation alone and before a quantizer
    assert "of 24,576 residual elements" in rows["clip-10"][4]
    assert "of 24,576 residual elements" in rows["clip-10-w4a4"][4]
    assert "(float " in rows["clip-10-w4a4"][5] and "(float " not in rows["clip-10"][5]
    assert rows["no-sink"][4] == "key 0 masked in 2 attention modules"
    listed = {cells[1]: cells for cells in _rows(main_table)}
    assert list(listed) == ["fp", "w4a4-first"]
    assert listed["w4a4-first"][2] == "W4A4KV4 (first 1 token fp, super weights fp)"
    assert "1 super weight fp; fp tokens (A+KV): 3.12%" in listed["w4a4-first"][4]  # 1 in 32
    record = next(
        json.loads(p.read_text()) for p in (tmp_path / "ablate" / "runs").glob("*w4a4-first*")
    )
    assert record["coverage"]["float_tokens"]["tokens"] == [6, 6 * 32]


def _rows(markdown: str) -> list[list[str]]:
    """The cells of the table rows of checkpoint 'planted'."""
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in markdown.splitlines()
        if line.startswith("| planted")
    ]
