"""GPTQ: lower layer output error than RTN on the same calibration batch; end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from qbench.data.calibration import calibration_ids
from qbench.quant import QuantizerConfig, quantize_
from qbench.quant.gptq import gptq_round
from qbench.quant.linear import QuantLinear
from qbench.quant.rotation import HadamardInput
from qbench.quant.spec import WeightQuant, fake_quant

CALIBRATION = {"data": "embedded", "sequences": 8, "seq_len": 32, "batch_size": 4}


def _batch(n: int = 512, width: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(width, width, generator=generator)  # correlated features
    scales = torch.rand(width, generator=generator) * 4  # and uneven channel energy
    return (torch.randn(n, width, generator=generator) @ mixing) * scales


@pytest.mark.parametrize(
    "weights, act_order",
    [
        ({"bits": 4}, False),
        ({"bits": 3, "group": 16}, True),
        ({"bits": 4, "symmetric": False}, True),
    ],
)
def test_gptq_output_error_is_below_rtn(weights, act_order):
    x = _batch()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    spec = WeightQuant.model_validate(weights)
    hessian = 2 * x.double().T @ x.double() / x.shape[0]
    gptq = gptq_round(w, hessian, spec, damp=0.01, block_size=16, act_order=act_order)
    rtn = fake_quant(w, spec)
    error = {name: (x @ (q - w).T).pow(2).mean() for name, q in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.8 * error["rtn"]


def test_gptq_values_lie_on_the_rtn_grid_of_each_group():
    x, w = _batch(), torch.randn(8, 64)
    spec = WeightQuant.model_validate({"bits": 4, "group": 32})
    q = gptq_round(w, 2 * x.double().T @ x.double() / 512, spec, 0.01, 128, act_order=True)
    scales = w.reshape(8, 2, 32).abs().amax(-1, keepdim=True) / 7
    steps = q.reshape(8, 2, 32) / scales
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert steps.abs().max() <= 8


def test_gptq_model_layer_error_is_below_rtn_on_the_calibration_batch(tiny_model, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    gptq = QuantizerConfig.model_validate(
        {"name": "g", "method": "gptq", "weights": {"bits": 3}, "calibration": CALIBRATION}
    )
    rtn = QuantizerConfig.model_validate({"name": "r", "method": "rtn", "weights": {"bits": 3}})
    fp = tiny_model("llama")
    torch.manual_seed(0)  # the batch GPTQ calibrates on
    ids = calibration_ids(tokenizer, gptq.rounding.calibration)
    layer = {"gate": fp.model.layers[0].mlp.gate_proj}
    x = torch.cat(_inputs_of(fp, layer["gate"], ids))
    errors = {}
    for config in (gptq, rtn):
        torch.manual_seed(0)
        model = quantize_(tiny_model("llama"), config, tokenizer)
        with torch.no_grad():
            diff = model.model.layers[0].mlp.gate_proj(x) - layer["gate"](x)
        errors[config.method] = diff.pow(2).mean()
    assert errors["gptq"] < 0.9 * errors["rtn"]


def _inputs_of(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor) -> list:
    """The inputs [tokens, in] that `module` receives when `model` runs on `ids` (batches of 4)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].flatten(0, -2)))
    with torch.no_grad():
        for batch in ids.split(4):
            model(batch)
    handle.remove()
    return seen


def _layer_by_layer_gptq(model, config, ids):
    """GPTQ as before blockwise calibration: layer i's Hessians from a full forward pass of the
    model, layers 0..i-1 already rounded (the reference the blockwise flow must equal)."""
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        inputs = {n: torch.cat(_inputs_of(model, m, ids)).double() for n, m in linears.items()}
        for name, linear in linears.items():
            x = inputs[name]
            hessian = 2 * x.T @ x / x.shape[0]
            w = gptq_round(linear.weight, hessian, config.weights, config.rounding.damp, 128, False)
            quantized = QuantLinear(linear, config.weights, config.activations, rounded=w)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, quantized)
    return model


def test_blockwise_gptq_equals_the_layer_by_layer_computation(tiny_model, tokenizer_dir):
    """The blockwise flow (two block passes per block) rounds every weight as running the
    model from its embeddings for every layer does, within float tolerance."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = QuantizerConfig.model_validate(
        {"name": "g", "method": "gptq", "weights": {"bits": 4}, "activations": {"bits": 8},
         "calibration": CALIBRATION}
    )  # fmt: skip
    torch.manual_seed(0)
    ids = calibration_ids(tokenizer, config.rounding.calibration)
    reference = _layer_by_layer_gptq(tiny_model("llama"), config, ids)
    torch.manual_seed(0)
    model = quantize_(tiny_model("llama"), config, tokenizer)
    for name, module in reference.named_modules():
        if isinstance(module, QuantLinear):
            ours = model.get_submodule(name).weight
            assert (ours - module.weight).abs().max() <= 1e-5 * module.weight.abs().max(), name


def test_quarot_gptq_rotates_then_rounds_every_linear(tiny_model, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = QuantizerConfig.model_validate(
        {
            "name": "quarot",
            "method": "gptq",
            "rotate": True,
            "act_order": True,
            "weights": {"bits": 4, "clip_search": True},
            "activations": {"bits": 8},
            "calibration": CALIBRATION,
        }
    )
    assert config.has_transform
    model = quantize_(tiny_model("qwen2"), config, tokenizer)
    for writer in (model.model.layers[1].mlp.down_proj, model.model.layers[1].self_attn.o_proj):
        assert isinstance(writer, HadamardInput) and isinstance(writer.linear, QuantLinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)


def test_gptq_needs_int_weights():
    with pytest.raises(ValueError, match="gptq rounds int weights"):
        QuantizerConfig.model_validate(
            {"name": "g", "method": "gptq", "weights": {"format": "nvfp4"}}
        )
