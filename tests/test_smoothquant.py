"""SmoothQuant: lossless in float on every architecture, scales as specified, end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.checkpoints.catalog import VARIANTS
from qbench.data.calibration import CalibrationSpec
from qbench.quant.context import StepContext, sample_windows
from qbench.quant.formats.fake import fake_quant
from qbench.quant.methods.smoothquant import (
    norm_output_absmax,
    smoothable_groups,
    smoothing_scales,
)
from qbench.quant.pipeline import transform
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.linear import QuantLinear

KINDS = ["llama", "qwen2", "qk-norm", *VARIANTS]
CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32}


def _config(**kw) -> QuantizerConfig:
    base = {
        "name": "sq",
        "method": "smoothquant",
        "calibration": CALIBRATION,
        "weights": {"bits": 8},
    }
    return QuantizerConfig.model_validate({**base, **kw})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_smoothing_leaves_fp32_logits_unchanged(kind, tiny_model, tokenizer_dir):
    model = tiny_model(kind)
    before = _logits(model)
    config = _config(alpha=0.8, weights={"bits": 4})
    transform(StepContext(model, config, AutoTokenizer.from_pretrained(tokenizer_dir)))
    after = _logits(model)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, tiny_model(kind).model.layers[0].input_layernorm.weight)


def test_gatednorm_gate_sees_the_same_input_after_smoothing(tiny_model, tokenizer_dir):
    model = tiny_model("gatednorm")
    norm = model.model.layers[0].post_attention_layernorm
    x = torch.randn(3, 64)
    with torch.no_grad():
        gate_before = norm.gate_up(torch.nn.functional.silu(norm.gate_down(norm.weight * x)))
    transform(StepContext(model, _config(), AutoTokenizer.from_pretrained(tokenizer_dir)))
    with torch.no_grad():
        gate_after = norm.gate_up(torch.nn.functional.silu(norm.gate_down(norm.weight * x)))
    torch.testing.assert_close(gate_after, gate_before, rtol=1e-5, atol=1e-5)


def test_scales_follow_the_formula_and_flatten_activation_outliers(tiny_model, tokenizer_dir):
    model = tiny_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    ids = sample_windows(tokenizer, CalibrationSpec.model_validate(CALIBRATION), seed=0)
    group = smoothable_groups(model, print)[3]  # block 1's post_attention_layernorm -> gate, up
    assert group.norm is model.model.layers[1].post_attention_layernorm
    assert {r.name for r in group.readers} == {
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    }
    (x_max,) = norm_output_absmax(model, [group], ids, batch_size=2)
    w_max = torch.stack([r.module.weight.abs().amax(0) for r in group.readers]).amax(0)
    torch.testing.assert_close(smoothing_scales(x_max, group, 0.5), x_max.sqrt() / w_max.sqrt())
    torch.manual_seed(0)
    transform(StepContext(model, _config(alpha=1.0), tokenizer))
    (smoothed,) = norm_output_absmax(model, [group], ids, batch_size=2)
    # alpha 1 moves everything into the weights: every channel's max becomes 1
    torch.testing.assert_close(smoothed, torch.ones_like(smoothed), rtol=1e-4, atol=1e-4)


def test_calibration_windows_are_random_slices_of_the_split(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = CalibrationSpec.model_validate(CALIBRATION)
    ids = sample_windows(tokenizer, spec, seed=0)
    assert ids.shape == (4, 32) and len({tuple(r.tolist()) for r in ids}) == 4


def test_smoothquant_nvfp4_w4a4_rounds_the_smoothed_weights(tiny_model, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    nvfp4 = {"format": "nvfp4"}
    config = _config(weights=nvfp4, activations=nvfp4)
    smoothed = tiny_model("gatednorm", intermediate_size=128)
    torch.manual_seed(0)
    transform(StepContext(smoothed, config, tokenizer))
    model = tiny_model("gatednorm", intermediate_size=128)
    torch.manual_seed(0)
    quantize_(model, config, tokenizer)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.activations.label() == "nvfp4 token"
    expected = fake_quant(smoothed.model.layers[0].self_attn.q_proj.weight, config.weights)
    assert torch.equal(q_proj.weight, expected)
    assert _logits(model).isfinite().all()


def test_smoothquant_needs_a_tokenizer(tiny_model):
    with pytest.raises(Exception, match="pass the checkpoint's tokenizer"):
        transform(StepContext(tiny_model("llama"), _config(weights={"bits": 8})))


def test_alpha_out_of_range_is_a_field_error():
    with pytest.raises(ValueError, match="alpha"):
        _config(alpha=1.5, weights={"bits": 8})
