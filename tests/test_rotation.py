"""Rotation: Hadamard matrices (constructions, fast transform), fp32 logits unchanged on every
architecture and family variant, with and without the Q/K rotation of a quantized KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPE, randomize

from qbench.api import quantize_, quantizer
from qbench.checkpoints.catalog import VARIANTS
from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM
from qbench.quant.formats.hadamard import (
    HadamardTransform,
    fwht,
    hadamard_construction,
    hadamard_factorization,
    paley,
    sylvester,
)
from qbench.quant.methods.rotation import HadamardInput, rotate
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.kvcache import KVTransform
from qbench.quant.walk.linear import QuantLinear

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
        (64, "sylvester(64)"),
        (12, "compressed-tensors(12)"),
        (192, "sylvester(16) x compressed-tensors(12)"),
        (384, "sylvester(32) x compressed-tensors(12)"),
        (3072, "sylvester(256) x compressed-tensors(12)"),
        (8192, "sylvester(8192)"),
        (172, "compressed-tensors(172)"),  # stories260K's MLP; QuaRot's hand-made H_172
        (2752, "sylvester(16) x compressed-tensors(172)"),
        (5504, "sylvester(32) x compressed-tensors(172)"),
        (11008, "sylvester(64) x compressed-tensors(172)"),  # Llama-2-7B's MLP
        (14336, "sylvester(512) x compressed-tensors(28)"),
        (13824, "sylvester(128) x compressed-tensors(108)"),
        (10944, "sylvester(16) x paley-1(684, q=683)"),  # bases above the table's 256
        (29568, "sylvester(32) x paley-2(924, q=461)"),
        (13696, "sylvester(128) x random-orthogonal(107)"),  # 428 * 2^i: no construction
        (6, "sylvester(2) x random-orthogonal(3)"),  # n = 2 (mod 4): no Hadamard matrix
        (43, "random-orthogonal(43)"),
    ],
)
def test_factorization_says_which_construction_a_width_gets(n, expected):
    assert hadamard_construction(n) == expected == str(hadamard_factorization(n))
    assert hadamard_factorization(n).is_hadamard == ("random-orthogonal" not in expected)


@pytest.mark.parametrize("order", [12, 28, 108, 172, 252])
def test_table_bases_are_compressed_tensors_matrices(order):
    """The base is the table's matrix (read here from its file), up to the signs of its rows."""
    from compressed_tensors.transform.utils.hadamard import REPO_PATH
    from safetensors import safe_open

    with safe_open(REPO_PATH, framework="pt") as table:
        expected = table.get_tensor(str(order)).double().T / order**0.5
    base = HadamardTransform(order).base
    signs = base[:, :1] / expected[:, :1]
    assert torch.equal(signs.abs(), torch.ones_like(signs)) and torch.equal(base, signs * expected)


@pytest.mark.parametrize("n", [10944, 29568])
def test_paley_bases_above_256_are_hadamard(n):
    rotation = HadamardTransform(n, random_signs=True)
    base = rotation.base
    order = base.shape[0]
    assert order > 256 and torch.equal(base.abs(), torch.full_like(base, order**-0.5))
    assert _orthogonal(base)
    x = torch.randn(2, n, dtype=torch.float64)
    torch.testing.assert_close(rotation.inverse(rotation(x)), x)


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


def test_a_rotated_cell_notes_the_matrix_of_each_width(tiny_model):
    model = tiny_model("llama")  # hidden 64, MLP 172, head_dim 16
    config = quantizer(name="r", method="rotation", weights={"bits": 4}, kv={"bits": 4})
    notes = []
    config.apply(model, notes=notes)
    assert "rotation: width 172 rotated by compressed-tensors(172)" in notes
    assert "rotation: width 64 rotated by sylvester(64)" in notes
    assert "rotation: width 16 rotated by sylvester(16)" in notes  # Q/K, per head
