"""Sink-aware quantization (`keep_float:`): sink tokens' activations and KV, and super weights,
kept in float beside rtn, gptq, rotation and smoothquant, checked on the tensors themselves."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    MASSIVE_TOKEN,
    PLANTED_COLUMN,
    PLANTED_ROW,
    planted_llama,
    write_recipe,
)
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.data.sources import load_text
from qbench.errors import QBenchError
from qbench.eval.perplexity import perplexity
from qbench.quant.formats.fake import fake_quant, fake_quant_except
from qbench.quant.formats.spec import ActivationQuant, WeightQuant
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk import linear as linear_module
from qbench.quant.walk.coverage import coverage_label
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.kvcache import kv_sites
from qbench.quant.walk.meters import measured

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 4}
SEARCH = {"min_ratio": 20, "calibration": CALIBRATION}


def _quantizer(**fields) -> QuantizerConfig:
    return QuantizerConfig.model_validate({"name": "q", **fields})


def _w4a4(keep: dict, method: str = "rtn", **more) -> QuantizerConfig:
    return _quantizer(
        method=method, weights={"bits": 4}, activations={"bits": 4}, keep_float=keep, **more
    )


@pytest.fixture
def rounded_inputs(monkeypatch):
    """Every QuantLinear input while kept tokens are in force: (x, keep, what it multiplies)."""
    seen = []
    real = linear_module.fake_quant_except

    def spy(x, spec, keep):
        out = real(x, spec, keep)
        seen.append((x.detach().clone(), keep.clone(), out.detach().clone(), spec))
        return out

    monkeypatch.setattr(linear_module, "fake_quant_except", spy)
    return seen


def _run(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_first_token_keeps_float_activations_the_others_are_rounded(rounded_inputs):
    model = planted_llama(super_weight=False)
    quantize_(model, _w4a4({"first_tokens": 1}))
    _run(model)
    assert len(rounded_inputs) == 2 * 7  # every linear of both layers, once
    for x, keep, used, spec in rounded_inputs:
        assert keep[:, 0].all() and not keep[:, 1:].any()
        assert torch.equal(used[:, 0], x[:, 0])  # position 0: the float activation
        assert torch.equal(used[:, 1:], fake_quant(x, spec)[:, 1:])  # the rest: rounded
        assert not torch.equal(used[:, 1], x[:, 1])


def test_the_kv_of_the_first_positions_stays_float():
    model = planted_llama(super_weight=False)
    config = _quantizer(method="rtn", kv={"bits": 4}, keep_float={"first_tokens": 2})
    quantize_(model, config)
    seen = []
    for site in kv_sites(model):
        site.transform.register_forward_hook(lambda _, args, out: seen.append((args, out)))
    _run(model)
    assert len(seen) == 2
    for (_, key, value), (_, key_used, value_used) in seen:
        for given, used in ((key, key_used), (value, value_used)):  # [b, heads, tokens, dim]
            assert torch.equal(used[:, :, :2], given[:, :, :2])
            assert torch.equal(used[:, :, 2:], fake_quant(given, config.kv)[:, :, 2:])
            assert not torch.equal(used[:, :, 2], given[:, :, 2])


def test_kept_rows_enter_no_scale_not_even_a_sequences():
    spec = ActivationQuant.model_validate({"bits": 4, "granularity": "tensor"})
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 1000  # a sink token: it would set the whole sequence's scale
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, 0] = True
    used = fake_quant_except(x, spec, keep)
    assert torch.equal(used[:, 0], x[:, 0])
    assert torch.equal(used[:, 1:], fake_quant(x[:, 1:], spec))  # the others' own scale


def test_outlier_tokens_are_the_same_in_every_layer_and_only_in_their_sequence(rounded_inputs):
    model = planted_llama(super_weight=False, massive_token=True)
    ids = IDS.clone()
    ids[ids == MASSIVE_TOKEN] = 12
    ids[0, 5] = MASSIVE_TOKEN  # an outlier token in the first sequence only
    config = _w4a4({"outlier_tokens": {"ratio": 64}})
    assert config.precision() == "W4A4 (outlier tokens fp)"
    assert "|" not in config.label()  # it reads in a markdown table
    quantize_(model, config)
    _run(model, ids)
    expected = torch.zeros(2, 16, dtype=torch.bool)
    expected[0, 5] = True
    assert len(rounded_inputs) == 2 * 14  # the pre-pass (every token in float), then the call
    for x, keep, used, _ in rounded_inputs[:14]:
        assert keep.all() and torch.equal(used, x)
    for x, keep, used, _ in rounded_inputs[14:]:
        assert torch.equal(keep, expected)
        assert torch.equal(used[0, 5], x[0, 5]) and not torch.equal(used[0, 4], x[0, 4])


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_a_sequences_result_does_not_depend_on_its_batch(granularity, tokenizer_dir):
    model = planted_llama(massive_token=True)
    activations = {"bits": 4, "granularity": granularity}
    keep = {"first_tokens": 1, "outlier_tokens": {}}
    config = _quantizer(method="rtn", weights={"bits": 4}, activations=activations,
                        kv={"bits": 4}, keep_float=keep)  # fmt: skip
    assert config.tokens_share_scales() is not None  # tasks: one request per call
    quantize_(model, config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = load_text("embedded", "test")
    scores = [
        perplexity(model, tokenizer, text, 32, batch, max_windows=8, progress=False).perplexity
        for batch in (1, 8)
    ]
    assert scores[0] == scores[1]


def test_generation_keeps_the_first_tokens_kv_and_refuses_outlier_tokens():
    model = planted_llama(super_weight=False)
    quantize_(model, _w4a4({"first_tokens": 1}, kv={"bits": 4}))
    before = _run(model)
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 19)
    (exemption,) = model.qbench_meters
    assert exemption.keys.shape == (2, 18)  # the cache: the prompt, then 2 decoded tokens
    assert exemption.keys[:, 0].all() and not exemption.keys[:, 1:].any()
    assert torch.equal(_run(model), before)  # a later call starts afresh
    other = planted_llama(super_weight=False)
    quantize_(other, _w4a4({"outlier_tokens": {}}))
    with pytest.raises(QBenchError, match="extends a KV cache"):
        other.generate(IDS, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_coverage_counts_the_tokens_kept_and_the_label_says_so():
    model = planted_llama(super_weight=False)
    config = _w4a4({"first_tokens": 1}, kv={"bits": 4})
    assert config.precision() == "W4A4KV4 (first 1 token fp)"
    assert "fp: first 1 token" in config.label()
    report = quantize_(model, config)
    _run(model)
    _run(model, IDS[:1])
    report = measured(report, model)
    assert report["float_tokens"]["tokens"] == [3, 48]  # 2 + 1 sequences of 16 tokens
    assert report["float_tokens"]["roles"] == ["activations", "kv"]
    assert report["float_tokens"]["rule"] == "first 1 token"
    assert "fp tokens (A+KV): 6.25%" in coverage_label(report)


def _distinct_off_super(weight: torch.Tensor) -> int:
    row = torch.cat(
        (weight[PLANTED_ROW, :PLANTED_COLUMN], weight[PLANTED_ROW, PLANTED_COLUMN + 1 :])
    )
    return row.unique().numel()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_planted_super_weight_is_found_kept_in_float_and_sets_no_scale(method, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {"method": method, "weights": {"bits": 4}, "keep_float": {"super_weights": SEARCH}}
    fields |= {"calibration": CALIBRATION} if method == "gptq" else {}
    config = _quantizer(**fields)
    assert config.precision() == "W4A16 (super weights fp)"
    model = planted_llama()
    report = quantize_(model, config, tokenizer)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight[PLANTED_ROW, PLANTED_COLUMN].item() == 2.0  # kept, after the rounding
    (found,) = report["super_weights"]
    assert (found["module"], found["row"], found["column"]) == (
        "model.layers.0.mlp.down_proj", PLANTED_ROW, PLANTED_COLUMN,
    )  # fmt: skip
    # the row's other weights got their own scale: with 2.0 in it (scale 2/7) all would be 0
    assert _distinct_off_super(down.weight) > 4
    plain = planted_llama()
    quantize_(plain, _quantizer(**{k: v for k, v in fields.items() if k != "keep_float"}),
              tokenizer)  # fmt: skip
    assert _distinct_off_super(plain.model.layers[0].mlp.down_proj.weight) <= 2
    if method == "rtn":  # every other weight exactly as rounding the row without it
        held = planted_llama().model.layers[0].mlp.down_proj.weight.detach().clone()
        held[PLANTED_ROW, PLANTED_COLUMN] = 0
        expected = fake_quant(held, WeightQuant(bits=4))
        expected[PLANTED_ROW, PLANTED_COLUMN] = 2.0
        assert torch.equal(down.weight, expected)
    assert report["float_weights"] == {"mlp": 1}
    mlp = report["kinds"]["mlp"]["weights"]
    assert mlp[0] == mlp[1] - 1  # one weight element in float, the rest rounded
    assert "1 super weight fp" in coverage_label(report)


def test_a_model_without_a_spike_keeps_no_weight(tokenizer_dir):
    model = planted_llama(super_weight=False)
    config = _quantizer(method="rtn", weights={"bits": 4}, keep_float={"super_weights": SEARCH})
    report = quantize_(model, config, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert report["super_weights"] == [] and "float_weights" not in report


def test_with_rotation_the_exemption_applies_to_the_rotated_activations(rounded_inputs):
    model = planted_llama()
    wrapper_inputs = []
    config = _quantizer(method="rotation", weights={"bits": 4}, activations={"bits": 4},
                        keep_float={"first_tokens": 1})  # fmt: skip
    quantize_(model, config)
    down = model.model.layers[0].mlp.down_proj  # rotation's online Hadamard around the linear
    assert down is not down.linear
    down.register_forward_pre_hook(lambda _, args: wrapper_inputs.append(args[0].clone()))
    _run(model)
    assert len(rounded_inputs) == 14
    for x, _, used, _ in rounded_inputs:
        assert torch.equal(used[:, 0], x[:, 0]) and not torch.equal(used[:, 1], x[:, 1])
    rotated = [x for x, *_ in rounded_inputs if x.shape[-1] == 172]  # the down_proj inputs
    assert not torch.equal(rotated[0], wrapper_inputs[0])  # the linear saw it rotated


@pytest.mark.parametrize("method", ["smoothquant", "gptq"])
def test_smoothquant_and_gptq_compose_with_kept_tokens(method, rounded_inputs, tokenizer_dir):
    model = planted_llama()
    config = _w4a4({"first_tokens": 1}, method, calibration=CALIBRATION)
    quantize_(model, config, AutoTokenizer.from_pretrained(tokenizer_dir))
    _run(model)
    assert len(rounded_inputs) == 14
    for x, _, used, _ in rounded_inputs:
        assert torch.equal(used[:, 0], x[:, 0]) and not torch.equal(used[:, 1], x[:, 1])


@pytest.mark.parametrize(
    ("keep", "more", "expected"),
    [
        ("{first_tokens: 1}", "", "keep_float: tokens keep float activations and KV, and this"),
        ("{}", ", activations: {bits: 4}", "quantizers[0].keep_float: keeps nothing"),
        ("{super_weights: {}}", ", rotate: true, method: gptq", "a rotation spreads every"),
        ("{first_tokens: -1}", ", activations: {bits: 4}", "keep_float.first_tokens"),
    ],
)
def test_bad_keep_float_is_one_line_naming_the_field(tmp_path, llama_dir, keep, more, expected):
    from qbench.recipe import RecipeError, load_recipe

    method = "" if "method" in more else "method: rtn, "
    text = (
        f"name: bad\ncheckpoints:\n  - {{name: m, path: {llama_dir}}}\nquantizers:\n"
        f"  - {{name: q, {method}weights: {{bits: 4}}{more}, keep_float: {keep}}}\n"
        "eval: {perplexity: [{data: embedded, seq_len: 32}]}\n"
    )
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path / "r.yaml", text))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_experts_inputs_refuse_kept_tokens():
    from conftest import family_model

    found = inventory(family_model("qwen3_moe"))
    assert "expert and router inputs" in _w4a4({"first_tokens": 1}).refusal(found)
    assert (
        _quantizer(method="rtn", weights={"bits": 4}, keep_float={"super_weights": {}}).refusal(
            found
        )
        is None
    )


def test_keys_of_quantizers_without_keep_float_stay_as_they_were():
    from qbench.plan import _quantizer_identity

    plain = _quantizer(method="rtn", weights={"bits": 4}, activations={"bits": 4})
    assert "keep_float" not in _quantizer_identity(plain)
    kept = _w4a4({"first_tokens": 1})
    assert _quantizer_identity(kept)["keep_float"]["first_tokens"] == 1


def test_lm_eval_tasks_run_with_kept_tokens_and_count_them(tokenizer_dir):
    """lm-eval's HFLM calls the model with positional ids: the kept tokens follow it."""
    from qbench.api import evaluate

    model = planted_llama(massive_token=True)
    report = quantize_(model, _w4a4({"first_tokens": 1, "outlier_tokens": {}}, kv={"bits": 4}))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    metrics = evaluate(model, tokenizer, tasks=[{"name": "embedded_mc", "limit": 5}])
    assert metrics.tasks["embedded_mc"].value is not None
    kept, total = measured(report, model)["float_tokens"]["tokens"]
    assert 0 < kept < total
