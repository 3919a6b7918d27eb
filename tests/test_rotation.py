"""Rotation: orthogonal Hadamard matrices, fp32 logits unchanged on every architecture."""

from __future__ import annotations

import pytest
import torch

from qbench.checkpoints.model import VARIANTS
from qbench.errors import QBenchError
from qbench.quant import quantize_
from qbench.quant.hadamard import hadamard_factors, kronecker_apply, random_hadamard, sylvester
from qbench.quant.linear import QuantLinear
from qbench.quant.rotation import HadamardInput, RotationConfig, rotate

ROTATABLE = [
    "llama",
    "qwen2",
    "qk-norm",
    *(v for v in VARIANTS if v not in ("preaffine", "gatednorm")),
]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _orthogonal(m: torch.Tensor) -> bool:
    return torch.allclose(m @ m.T, torch.eye(m.shape[0], dtype=m.dtype), atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 8, 16, 64, 128, 172, 384, 2048])
def test_hadamard_matrices_are_orthogonal_for_every_size_used(n):
    a, b = hadamard_factors(n)
    assert _orthogonal(a) and _orthogonal(b) and a.shape[0] * b.shape[0] == n
    assert _orthogonal(random_hadamard(n))
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(kronecker_apply(x, a, b), x @ torch.kron(a, b))


def test_sylvester_entries_are_plus_minus_one_over_sqrt_n():
    h = sylvester(16)
    assert torch.equal(h.abs(), torch.full_like(h, 0.25))
    with pytest.raises(ValueError, match="power-of-two"):
        sylvester(12)


@pytest.mark.parametrize("kind", ROTATABLE)
def test_rotation_leaves_fp32_logits_unchanged(kind, tiny_model):
    model = tiny_model(kind)
    before = _logits(model)
    torch.manual_seed(0)
    rotate(model)
    after = _logits(model)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardInput)
    assert torch.equal(model.model.norm.weight, torch.ones(64))


def test_tied_embeddings_are_untied_and_logits_kept(tiny_model):
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    before = _logits(model)
    rotate(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert (_logits(model) - before).abs().max() < 1e-4 * before.abs().max()


@pytest.mark.parametrize("kind", ["preaffine", "gatednorm"])
def test_norms_that_no_rotation_commutes_with_are_refused(kind, tiny_model):
    with pytest.raises(QBenchError, match="rotation is not lossless"):
        rotate(tiny_model(kind))


def test_rotation_then_rtn_quantizes_inside_the_online_hadamard(tiny_model):
    model = tiny_model("llama")
    config = RotationConfig.model_validate(
        {"name": "r", "method": "rotation", "weights": {"bits": 4}, "activations": {"bits": 4}}
    )
    quantize_(model, config)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, HadamardInput) and isinstance(down.linear, QuantLinear)
    assert _logits(model).isfinite().all()
