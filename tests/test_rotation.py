"""Rotation: Hadamard matrices (constructions, fast transform), fp32 logits unchanged on every
architecture and family variant, with and without the Q/K rotation of a quantized KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPE, randomize

from qbench.checkpoints.model import VARIANTS, QBenchConfig, QBenchForCausalLM
from qbench.quant import QuantizerConfig, quantize_
from qbench.quant.hadamard import (
    HadamardTransform,
    fwht,
    hadamard_factorization,
    paley,
    sylvester,
)
from qbench.quant.kvcache import KVTransform
from qbench.quant.linear import QuantLinear
from qbench.quant.rotation import HadamardInput, rotate

EVERY_KIND = ["llama", "qwen2", "qwen3", "mistral", "qk-norm", *VARIANTS]
# every width the tests and the shipped recipes rotate (stories260K: 64, 172, head_dim 8; the
# tiny/small presets: 128, 384, 256, 768, head_dim 32; Llama-2-7B: 4096, 11008, head_dim 128)
SMALL = TINY_SHAPE
WIDTHS = [1, 2, 8, 16, 32, 64, 128, 172, 192, 256, 384, 512, 768, 2048, 4096, 11008]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _orthogonal(m: torch.Tensor) -> bool:
    return torch.allclose(m @ m.T, torch.eye(m.shape[0], dtype=m.dtype), atol=1e-10)


@pytest.mark.parametrize("n", WIDTHS)
def test_rotations_are_orthogonal_for_every_width_used(n):
    rotation = HadamardTransform(n, random_signs=True)
    base, power = rotation.base, rotation.factorization.power
    assert power * base.shape[0] == n and _orthogonal(base)  # H_p (x) B: orthogonal iff B is
    assert torch.equal(rotation.signs.abs(), torch.ones(n, dtype=torch.float64))
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(rotation.inverse(rotation(x)), x)
    torch.testing.assert_close(rotation(x).norm(dim=-1), x.norm(dim=-1))
    if n <= 2048:  # the dense matrix (quadratic memory, cubic check): orthogonal, and equal
        m = rotation.matrix()  # to what the fast path computes
        assert m.shape == (n, n) and _orthogonal(m)
        torch.testing.assert_close(rotation(x), x @ m)
        torch.testing.assert_close(rotation.inverse(x), x @ m.T)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (64, "64 = sylvester(64)"),
        (12, "12 = sylvester(1) x paley-1(12, q=11)"),
        (28, "28 = sylvester(1) x paley-2(28, q=13)"),
        (192, "192 = sylvester(16) x paley-1(12, q=11)"),
        (384, "384 = sylvester(32) x paley-1(12, q=11)"),
        (14336, "14336 = sylvester(512) x paley-2(28, q=13)"),
        (13824, "13824 = sylvester(128) x paley-1(108, q=107)"),
        (172, "172 = sylvester(4) x random-orthogonal(43)"),
        (11008, "11008 = sylvester(256) x random-orthogonal(43)"),
        (6, "6 = sylvester(2) x random-orthogonal(3)"),
    ],
)
def test_factorization_says_which_construction_a_width_gets(n, expected):
    assert str(hadamard_factorization(n)) == expected


@pytest.mark.parametrize("n", [12, 20, 24, 28, 36, 44, 60, 108, 148, 192, 384, 768, 1024])
def test_constructed_matrices_are_hadamard(n):
    """Entries +-1/sqrt(n) and orthogonal: a true normalized Hadamard matrix."""
    assert hadamard_factorization(n).is_hadamard
    m = HadamardTransform(n).matrix()
    assert torch.allclose(m.abs(), torch.full_like(m, n**-0.5), atol=1e-12)
    assert _orthogonal(m)


def test_paley_constructions_by_hand():
    """Paley I of order 4 (q = 3) is I + [[0, 1, 1, 1], [-1, 0, 1, -1], ...]; II of 12 (q = 5)."""
    h4 = paley("paley-1", 3) * 2
    expected = torch.tensor(
        [[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]], dtype=torch.float64
    )
    assert torch.equal(h4, expected)
    h12 = paley("paley-2", 5) * 12**0.5
    assert torch.allclose(h12 @ h12.T, 12 * torch.eye(12, dtype=torch.float64))


def test_sylvester_entries_are_plus_minus_one_over_sqrt_n():
    h = sylvester(16)
    assert torch.equal(h.abs(), torch.full_like(h, 0.25))
    with pytest.raises(ValueError, match="power-of-two"):
        sylvester(12)


@pytest.mark.parametrize("n", [1, 2, 8, 128, 4096])
def test_fast_walsh_hadamard_transform_equals_the_dense_product(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ sylvester(n))
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(12))


@pytest.mark.parametrize("rotate_qk", [False, True], ids=["plain", "qk"])
@pytest.mark.parametrize("kind", EVERY_KIND)
def test_rotation_leaves_fp32_logits_unchanged(kind, rotate_qk, tiny_model):
    model = tiny_model(kind)
    before = _logits(model)
    torch.manual_seed(0)
    rotate(model, rotate_qk=rotate_qk)
    after = _logits(model)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardInput)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    kv = getattr(model.model.layers[0].self_attn, "kv_transform", None)
    assert (kv is not None and kv.qk_rotation is not None) == rotate_qk


@pytest.mark.parametrize("norm", ["preaffine", "gatednorm"])
def test_all_options_at_once_stay_lossless(norm):
    """Every attention option together (headwise gate, bias slot, context scaling, softpick,
    qk_norm) with a PreAffine or GatedNorm norm, Q/K rotated."""
    options = dict(
        attn_output_gate="headwise",
        attn_kv_bias=True,
        attn_context_scaling=True,
        attn_softmax="softpick",
        qk_norm=True,
        norm=norm,
    )
    config = QBenchConfig(**SMALL, **options)
    model = randomize(QBenchForCausalLM(config), 0)
    before = _logits(model)
    rotate(model, rotate_qk=True)
    assert (_logits(model) - before).abs().max() < 1e-4 * before.abs().max()


@pytest.mark.parametrize("kind", ["preaffine", "gatednorm"])
def test_norms_with_more_than_a_weight_take_the_rotation(kind, tiny_model):
    model = tiny_model(kind)
    rotate(model)
    norm = model.model.layers[0].input_layernorm
    assert isinstance(norm.stream_rotation, HadamardTransform)
    assert norm.stream_rotation.signs is not None  # the residual stream's random Hadamard


def test_tied_embeddings_are_untied_and_logits_kept(tiny_model):
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    before = _logits(model)
    rotate(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert (_logits(model) - before).abs().max() < 1e-4 * before.abs().max()


def test_rotation_then_rtn_quantizes_inside_the_online_hadamard(tiny_model):
    model = tiny_model("llama")
    config = QuantizerConfig.model_validate(
        {
            "name": "r",
            "method": "rotation",
            "weights": {"bits": 4},
            "activations": {"bits": 4},
            "kv": {"bits": 4, "clip": 0.95},
        }
    )
    quantize_(model, config)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, HadamardInput) and isinstance(down.linear, QuantLinear)
    kv = model.model.layers[0].self_attn.kv_transform
    assert isinstance(kv, KVTransform) and kv.qk_rotation is not None and kv.quant is config.kv
    assert _logits(model).isfinite().all()
