"""Honour or refuse: every field of every quantizer changes the quantized model as documented,
or is rejected at load time with its field path."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import write_recipe
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.quant.quantizer import QuantizerConfig
from qbench.recipe import RecipeError, load_recipe

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 4}
W4 = {"method": "rtn", "weights": {"bits": 4}}
W8A8 = {"method": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}}
KV = {"method": "rtn", "kv": {"bits": 4}}
SQ = {**W8A8, "method": "smoothquant", "calibration": CALIBRATION}
GPTQ = {
    "method": "gptq",
    "weights": {"bits": 3, "group": 16},
    "block_size": 32,  # the reference's dynamic groups read W as of the last lazy block
    "calibration": CALIBRATION,
}
AWQ = {"method": "awq", "weights": {"bits": 3, "group": 16}, "calibration": CALIBRATION}
PIPELINE = {
    "transforms": [{"transform": "smoothquant", "calibration": CALIBRATION}],
    "rounding": {"method": "gptq", "calibration": CALIBRATION},
    "weights": {"bits": 8},
    "activations": {"bits": 8},
}
BNB = {"method": "bitsandbytes", "scheme": "nf4"}
QUANTO = {"method": "quanto", "weight_qtype": "qint4", "group": 32}


def _with(base: dict, path: str, value) -> dict:
    """`base` with the dotted field `path` set to `value` (a missing parent is created)."""
    config = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return config


# (base config, field, new value): the field's new value must change the quantized model.
CHANGES = [
    (W4, "weights.format", "fp4_e2m1"),
    (W4, "weights.bits", 3),
    (W4, "weights.symmetric", False),
    (W4, "weights.granularity", "tensor"),
    (W4, "weights.group", 16),
    (W4, "weights.clip", 0.8),
    (W4, "weights.clip_search", True),
    (_with(W4, "weights.clip_search", True), "weights.clip_search_norm", 2.0),
    (W4, "weights.scale_rule", "half-range"),
    ({"method": "rtn", "weights": {"format": "mxfp4"}}, "weights.scale_rule", "even"),
    ({"method": "rtn", "weights": {"format": "nvfp4"}}, "weights.granularity", "channel"),
    (W4, "activations", {"bits": 8}),
    (W8A8, "activations.bits", 4),
    (W8A8, "activations.symmetric", False),
    (W8A8, "activations.granularity", "tensor"),
    (W8A8, "activations.group", 16),
    (W8A8, "activations.clip", 0.5),
    (W8A8, "activations.format", "fp8_e4m3"),
    (W8A8, "activations.scale_rule", "half-range"),
    (W4, "kv", {"bits": 4}),
    (KV, "kv.bits", 3),
    (KV, "kv.symmetric", True),
    (KV, "kv.group", 8),
    (KV, "kv.clip", 0.8),
    (KV, "kv.format", "fp4_e2m1"),
    (W4, "lm_head", True),
    (W4, "embeddings", True),
    (SQ, "alpha", 0.9),
    (SQ, "calibration.sequences", 8),
    (SQ, "calibration.seq_len", 16),
    (SQ, "calibration.split", "test"),
    (GPTQ, "rotate", True),
    (GPTQ, "damp", 0.5),
    (GPTQ, "act_order", True),
    (GPTQ, "static_groups", False),
    (_with(GPTQ, "static_groups", False), "block_size", 128),  # the reference's group scales
    (GPTQ, "embeddings", True),
    (GPTQ, "calibration.sequences", 8),
    (_with(W4, "method", "rotation"), "kv", {"bits": 4}),  # and the Q/K rotation
    (AWQ, "grid", 4),
    (AWQ, "duo_scaling", True),
    (AWQ, "clip", False),
    (AWQ, "max_shrink", 0.2),
    (AWQ, "calibration.sequences", 8),
    (PIPELINE, "transforms", ["rotation"]),
    (PIPELINE, "rounding", "rtn"),
    (PIPELINE, "rounding.damp", 0.5),
    (BNB, "scheme", "fp4"),
    (BNB, "blocksize", 32),
    (BNB, "double_quant", True),
    (BNB, "compute_dtype", "bfloat16"),
    (BNB, "lm_head", True),
    ({"method": "bitsandbytes", "scheme": "int8"}, "threshold", 0.5),
    (QUANTO, "weight_qtype", "qint2"),
    (QUANTO, "group", 64),
    (QUANTO, "activation_qtype", "qint8"),
    (_with(QUANTO, "activation_qtype", "qint8"), "calibration", {"batch_size": 2}),  # quanto's
    (_with(QUANTO, "activation_qtype", "qint8"), "calibration", {"sequences": 8}),  # moving avg
]
# (base, field, value): documented as leaving the model as it is (speed or memory only).
SAME = [
    (SQ, "calibration.batch_size", 2),  # per-channel max over every batch
    (GPTQ, "calibration.batch_size", 2),  # the Hessian sums every batch (float64)
    (GPTQ, "block_size", 128),  # static groups: lazy updates, the same arithmetic
]


@pytest.fixture(scope="module")
def setting(tiny_model, tokenizer_dir):
    # a context of 512: quanto's default calibration windows (512 tokens) must fit it
    model = tiny_model("qwen2", intermediate_size=128, max_position_embeddings=512)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    return model, AutoTokenizer.from_pretrained(tokenizer_dir), ids


@functools.cache
def _cached_logits(setting, config: str) -> torch.Tensor:
    return _quantized_logits(setting, json.loads(config))


def _logits(setting, config: dict) -> torch.Tensor:
    """The logits of the model quantized as `config` says (each config quantized once)."""
    return _cached_logits(setting, json.dumps(config, sort_keys=True))


def _quantized_logits(setting, config: dict) -> torch.Tensor:
    model, tokenizer, ids = setting
    model = copy.deepcopy(model)
    spec = {"name": "q", **config}
    torch.manual_seed(0)
    quantize_(model, QuantizerConfig.model_validate(spec), tokenizer)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("base", "field", "value"),
    CHANGES,
    ids=[f"{b.get('method', 'pipeline')}-{f}" for b, f, _ in CHANGES],
)
def test_every_option_changes_the_model(base, field, value, setting):
    changed = _with(base, field, value)
    assert changed != base
    assert not torch.equal(_logits(setting, base), _logits(setting, changed))


@pytest.mark.parametrize(
    ("base", "field", "value"), SAME, ids=[f"{b['method']}-{f}" for b, f, _ in SAME]
)
def test_speed_options_leave_the_model_as_it_is(base, field, value, setting):
    before, after = _logits(setting, base), _logits(setting, _with(base, field, value))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


REJECTED = [
    ("{method: rtn, weights: {bits: 4, clip: 0.9, clip_search: true}}",
     "quantizers[0].weights: clip_search picks the clip of each row: remove clip"),
    ("{method: rtn, weights: {bits: 4, clip_search_norm: 2}}",
     "quantizers[0].weights: clip_search_norm applies with clip_search: true"),
    ("{method: rtn, activations: {bits: 4, clip_search: true}}",
     "quantizers[0].activations.clip_search: Input should be False"),
    ("{method: rtn, kv: {bits: 4, clip_search_norm: 3}}",
     "quantizers[0].kv: clip_search_norm applies with clip_search"),
    ("{method: rtn, weights: {bits: 4, symmetric: false, scale_rule: qmax}}",
     "quantizers[0].weights: scale_rule applies to symmetric int"),
    ("{method: rtn, weights: {format: nvfp4, scale_rule: floor}}",
     "quantizers[0].weights: nvfp4 has one scale rule: remove scale_rule"),
    ("{method: rtn, weights: {format: mxfp4, clip: 0.9}}",
     "quantizers[0].weights: mxfp4 scales from each block's max: remove clip"),
    ("{method: rtn, activations: {format: mxfp4, granularity: token}}",
     "quantizers[0].activations: mxfp4 has only block scales: remove granularity"),
    ("{method: rtn, embeddings: true, activations: {bits: 8}}",
     "quantizers[0]: embeddings: true needs weights:"),
    ("{method: gptq, weights: {bits: 4}, static_groups: false}",
     "quantizers[0]: static_groups applies to weights with a group"),
    ("{method: gptq, weights: {format: fp8_e4m3}}", "quantizers[0]: gptq rounds int weights"),
    ("{method: bitsandbytes, scheme: nf4, threshold: 1}",
     "quantizers[0]: threshold is LLM.int8's (scheme int8), not nf4's"),
    ("{method: bitsandbytes, scheme: int8, blocksize: 32}",
     "quantizers[0]: blocksize applies to scheme nf4 / fp4, not int8"),
    ("{method: bitsandbytes, scheme: int8, weights: {bits: 8}}",
     "quantizers[0]: bitsandbytes takes scheme: int8 | nf4 | fp4, not weights:"),
    ("{method: quanto, weight_qtype: qint8, embeddings: true}",
     "quantizers[0]: quanto quantizes linear layers only: remove embeddings"),
    ("{method: quanto, weight_qtype: qint8, group: 32}",
     "quantizers[0]: group applies to qint4 / qint2"),
    ("{method: quanto, weight_qtype: qint4, calibration: {}}",
     "quantizers[0]: calibration sets activation scales: add activation_qtype"),
    ("{method: smoothquant, weights: {bits: 8}, alpha: 1.5}",
     "quantizers[0].alpha: Input should be less than or equal to 1"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "message"), REJECTED, ids=[m for _, m in REJECTED])
def test_options_that_cannot_apply_are_load_time_errors(fields, message, tmp_path, llama_dir):
    name = "{name: q, " + fields[1:]
    text = (
        f"name: t\ncheckpoints: [{{name: a, path: {llama_dir}}}]\nquantizers:\n  - {name}\n"
        "eval: {perplexity: [{data: embedded, seq_len: 32}]}\n"
    )
    path = write_recipe(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)
