"""The compiled fast path of QuantLinear against the eager reference `fake_quant`.

On CPU the two must agree bit for bit; on CUDA (not available where these tests were
written) within one quantization step. Each format compiles once (1-3 s; the first graph of
the process about 10 s), on small shapes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from qbench.api import quantize_
from qbench.errors import QBenchError
from qbench.quant.formats import fused
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import ActivationQuant
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.linear import QuantLinear

IN, OUT = 64, 24
SPECS = {
    "int8": {"bits": 8},
    "int4": {"bits": 4},
    "int4 asym clip": {"bits": 4, "symmetric": False, "clip": 0.9},
    "int4 g32": {"bits": 4, "group": 32},
    "fp8_e4m3": {"format": "fp8_e4m3"},
    "fp4_e2m1 tensor": {"format": "fp4_e2m1", "granularity": "tensor"},
    "mxfp4": {"format": "mxfp4"},
    "nvfp4": {"format": "nvfp4"},
}


@pytest.fixture
def fast_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused.MODE_VARIABLE, "1")


def hard_inputs(rows: int) -> torch.Tensor:
    """Gaussian rows over six orders of magnitude, plus rows that probe every rounding edge:
    all zeros, exact midpoints between grid values, powers of two and their float
    neighbours (MX scales, E2M1 binades), and saturating outliers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, IN, generator=generator)
    x *= 10 ** torch.empty(rows, 1).uniform_(-3, 3, generator=generator)
    ties = torch.arange(IN, dtype=torch.float32) / 2 - 8  # k / 2: int and E2M1 midpoints
    powers = 2.0 ** torch.arange(-8, 8, dtype=torch.float32)
    above, below = torch.nextafter(powers, powers * 2), torch.nextafter(powers, powers * 0)
    edges = torch.cat([powers, above, below, -powers])
    outliers = torch.randn(IN, generator=generator)
    outliers[::16] = 1e4
    special = torch.stack([torch.zeros(IN), ties, ties * 1.75, edges, outliers])
    return torch.cat([x, special])


@pytest.mark.parametrize("name", list(SPECS))
def test_fast_path_is_bit_identical_to_the_reference_on_cpu(name):
    spec = ActivationQuant.model_validate(SPECS[name])
    linear = nn.Linear(IN, OUT)
    weight = torch.cat([torch.eye(IN), linear.weight.detach()])  # x @ I^T recovers fake_quant(x)
    bias = torch.cat([torch.zeros(IN), linear.bias.detach()])
    x = hard_inputs(11)
    with torch.no_grad():
        out = fused.quantized_linear(x, weight, bias, spec)
        expected = nn.functional.linear(fake_quant(x, spec), linear.weight, linear.bias)
    assert torch.equal(out[:, :IN], fake_quant(x, spec))
    assert torch.equal(out[:, IN:], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_fast_path_is_within_one_step_of_the_cpu_reference(name, monkeypatch):
    monkeypatch.setenv(fused.MODE_VARIABLE, "auto")  # CUDA takes the fast path
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # x @ I stays exact
    spec = ActivationQuant.model_validate(SPECS[name])
    x = hard_inputs(64)
    layer = QuantLinear(nn.Linear(IN, IN, bias=False), None, spec).cuda()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(IN))
        fast = layer(x.cuda()).cpu()
    reference = fake_quant(x, spec)
    # one step: the widest spacing of a row's grid, relative to the row's largest value
    spacing = {"int": 1 / (2 ** (spec.bits - 1) - 1), "fp8_e4m3": 32 / 448}.get(spec.format, 1 / 2)
    step = reference.abs().amax(dim=1, keepdim=True) * spacing * (1 if spec.symmetric else 2)
    assert ((fast - reference).abs() <= step * (1 + 1e-6)).all()
    differs = ~torch.isclose(fast, reference, rtol=1e-6, atol=0)
    assert differs.float().mean() <= 1e-3


def test_mode_selects_the_path_and_rejects_unknown_values(monkeypatch):
    x = torch.ones(2, IN)
    for mode, fast_on_cpu in [("", False), ("auto", False), ("1", True), ("0", False)]:
        monkeypatch.setenv(fused.MODE_VARIABLE, mode)
        assert fused.use_fast_path(x) is fast_on_cpu
    monkeypatch.setenv(fused.MODE_VARIABLE, "yes")
    with pytest.raises(QBenchError, match="QBENCH_FAST_QUANT='yes': use auto"):
        QuantLinear(nn.Linear(IN, OUT), None, ActivationQuant(bits=4))


def test_quantized_model_is_identical_and_compiles_once_per_weight_shape(
    tiny_model, fast_everywhere, monkeypatch
):
    model = tiny_model("llama", intermediate_size=176)  # 64->64, 64->32, 64->176, 176->64
    config = {"name": "q", "method": "rtn", "weights": {"format": "nvfp4"}}
    quantize_(model, QuantizerConfig.model_validate({**config, "activations": {"format": "nvfp4"}}))
    ids = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        fast = [model(ids[:2]).logits, model(ids).logits, model(ids[:, :40]).logits]
        compiled = counters["stats"]["unique_graphs"] - graphs
        monkeypatch.setenv(fused.MODE_VARIABLE, "0")
        reference = [model(ids[:2]).logits, model(ids).logits, model(ids[:, :40]).logits]
    assert all(torch.equal(f, r) for f, r in zip(fast, reference, strict=True))
    assert compiled == 4  # new batch sizes and sequence lengths reuse the graphs


@pytest.mark.parametrize("name", ["int4 tensor", "nvfp4 tensor"])
def test_fast_path_takes_one_scale_per_sequence(name):
    """granularity tensor: one scale per sequence, compiled as the reference computes it."""
    spec = ActivationQuant.model_validate(
        {"granularity": "tensor", **({"bits": 4} if name == "int4 tensor" else {"format": "nvfp4"})}
    )
    weight = torch.eye(IN)
    x = hard_inputs(13)[:12].reshape(3, 4, IN)  # three sequences, loud and quiet ones
    with torch.no_grad():
        for batch in (x, x[:2]):  # a second batch size reuses the graph
            out = fused.quantized_linear(batch, weight, None, spec)
            each = torch.stack([fake_quant(sequence, spec) for sequence in batch])
            assert torch.equal(out, fake_quant(batch, spec)) and torch.equal(out, each)
