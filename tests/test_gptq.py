"""GPTQ: lower layer output error than RTN on the same calibration batch; end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.quant.context import sample_windows
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.methods.gptq import gptq_round
from qbench.quant.methods.rotation import HadamardInput
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.linear import QuantLinear

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
    ids = sample_windows(tokenizer, gptq.rounding.calibration, seed=0)
    layer = {"gate": fp.model.layers[0].mlp.gate_proj}
    x = torch.cat(_inputs_of(fp, layer["gate"], ids))
    errors = {}
    for config in (gptq, rtn):
        torch.manual_seed(0)
        model = tiny_model("llama")
        quantize_(model, config, tokenizer)
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
    ids = sample_windows(tokenizer, config.rounding.calibration, seed=0)
    reference = _layer_by_layer_gptq(tiny_model("llama"), config, ids)
    torch.manual_seed(0)
    model = tiny_model("llama")
    quantize_(model, config, tokenizer)
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
    model = tiny_model("qwen2")
    quantize_(model, config, tokenizer)
    for writer in (model.model.layers[1].mlp.down_proj, model.model.layers[1].self_attn.o_proj):
        assert isinstance(writer, HadamardInput) and isinstance(writer.linear, QuantLinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)


def test_gptq_needs_int_weights():
    with pytest.raises(ValueError, match="gptq rounds int weights"):
        QuantizerConfig.model_validate(
            {"name": "g", "method": "gptq", "weights": {"format": "nvfp4"}}
        )


def _reference_gptq(w, h, bits, group, blocksize, actorder, static_groups, damp=0.01):
    """GPTQ's reference `fasterquant` (IST-DASLab/gptq, gptq.py), transcribed line by line with
    a symmetric per-row quantizer of QuaRot's rule (scale absmax / (2^(b-1) - 1))."""
    maxq = 2 ** (bits - 1) - 1

    def find_params(x):
        return (x.abs().amax(1) / maxq).clamp(min=1e-30)

    def quantize(x, scale):
        return torch.clamp(torch.round(x / scale), -maxq - 1, maxq) * scale

    W, H = w.clone().double(), h.clone().double()
    columns = W.shape[1]
    if static_groups:
        groups = [find_params(W[:, i : i + group]) for i in range(0, columns, group)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[range(columns), range(columns)] += damp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1, Hinv1 = torch.zeros_like(W1), torch.zeros_like(W1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            x = W1[:, i]
            if not static_groups:
                if (i1 + i) % group == 0:
                    scale = find_params(W[:, (i1 + i) : (i1 + i + group)])
            else:
                idx = perm[i1 + i] if actorder else i1 + i
                scale = groups[int(idx) // group]
            q = quantize(x, scale)
            Q1[:, i] = q
            err1 = (x - q) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("static_groups", [True, False], ids=["static", "dynamic"])
def test_groups_follow_gptqs_reference_code(static_groups, act_order):
    x, w = _batch(), torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    hessian = 2 * x.double().T @ x.double() / x.shape[0]
    spec = WeightQuant.model_validate({"bits": 3, "group": 16})
    ours = gptq_round(w, hessian, spec, 0.01, 24, act_order, static_groups)
    expected = _reference_gptq(w, hessian, 3, 16, 24, act_order, static_groups)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    other = gptq_round(w, hessian, spec, 0.01, 24, act_order, not static_groups)
    assert not torch.equal(ours, other)  # the option changes the rounded weight


def test_static_groups_needs_a_group():
    with pytest.raises(ValueError, match="static_groups applies to weights with a group"):
        QuantizerConfig.model_validate(
            {"name": "g", "method": "gptq", "weights": {"bits": 4}, "static_groups": False}
        )
    config = QuantizerConfig.model_validate({"name": "g", "method": "gptq", "weights": {"bits": 4}})
    assert config.rounding.static_groups


def test_gptq_rounds_the_embedding_when_asked(tiny_model, tokenizer_dir):
    """`embeddings: true` rounds the input embedding by RTN, as rtn does (it used to be ignored)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = QuantizerConfig.model_validate(
        {
            "name": "g",
            "method": "gptq",
            "weights": {"bits": 4},
            "embeddings": True,
            "calibration": CALIBRATION,
        }
    )
    model = tiny_model("llama")
    embed = model.get_input_embeddings().weight.detach().clone()
    quantize_(model, config, tokenizer)
    expected = fake_quant(embed, config.weights)
    assert torch.equal(model.get_input_embeddings().weight, expected)
    assert not torch.equal(expected, embed)
