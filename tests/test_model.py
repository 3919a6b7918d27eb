"""Tests of the qbench model family (qbench.checkpoints.model) and the gated-Qwen3 loader."""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from qbench.checkpoints.catalog import VARIANTS, variant_options
from qbench.checkpoints.gated_qwen3 import convert_gated_qwen3, load_gated_qwen3
from qbench.checkpoints.model import (
    SOFTPICK_EPS,
    QBenchConfig,
    QBenchForCausalLM,
    attention_probs,
    register,
)

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
# Every option on its own (the trainer's variants plus qk_norm), and all of them at once.
OPTION_SETS = {
    **{name: opts for name, opts in VARIANTS.items() if name != "baseline"},
    "qk-norm": {"qk_norm": True},
    "combined": {
        "attn_output_gate": "elementwise",
        "attn_kv_bias": True,
        "attn_context_scaling": True,
        "attn_softmax": "softpick",
        "norm": "gatednorm",
        "qk_norm": True,
    },
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: a single thread avoids OpenMP overhead dominating the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed: int = 0, **options: object) -> QBenchForCausalLM:
    torch.manual_seed(seed)
    return QBenchForCausalLM(QBenchConfig(**TINY, **options)).eval()


def tokens(batch: int = 2, length: int = 10, seed: int = 1) -> Tensor:
    return torch.randint(
        0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def with_baseline_weights(options: dict) -> tuple[QBenchForCausalLM, QBenchForCausalLM]:
    """(baseline, variant) sharing all baseline weights; the variant's new ones perturbed."""
    base, model = make(), make(**options)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == set(model.state_dict()) - set(base.state_dict())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in missing:
            p = model.get_parameter(name)
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return base, model


def test_baseline_matches_llama() -> None:
    for tie in (False, True):
        qb = make(tie_word_embeddings=tie)
        llama = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()
        assert llama.load_state_dict(qb.state_dict(), strict=True)
        ids, mask = tokens(), torch.ones(2, 10, dtype=torch.long)
        mask[0, :3] = 0  # left padding in the first row
        with torch.no_grad():
            ours = qb(ids, output_hidden_states=True)
            ref = llama(ids, output_hidden_states=True)
            ours_pad, ref_pad = qb(ids, attention_mask=mask), llama(ids, attention_mask=mask)
        assert (ours.logits - ref.logits).abs().max() < 1e-5
        assert len(ours.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
        for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
            assert (a - b).abs().max() < 1e-5
        diff = (ours_pad.logits - ref_pad.logits)[:, 3:]  # rows of padding queries are junk
        assert diff.abs().max() < 1e-5


def test_module_names_are_llamas() -> None:
    names = set(make().state_dict())
    assert names == set(LlamaForCausalLM(LlamaConfig(**TINY)).state_dict())
    new = set(make(**OPTION_SETS["combined"]).state_dict()) - names
    layer = "model.layers.0."
    assert {
        layer + "self_attn.gate.weight",
        layer + "self_attn.context_scale.weight",
        layer + "self_attn.k_bias",
        layer + "self_attn.v_bias",
        layer + "self_attn.q_norm.weight",
        layer + "self_attn.k_norm.weight",
        layer + "input_layernorm.gate_down.weight",
        layer + "post_attention_layernorm.gate_up.weight",
        "model.norm.gate_up.weight",
    } <= new
    assert "model.norm.pre_scale" in make(norm="preaffine").state_dict()


def test_new_parameters_start_neutral(tmp_path: Path) -> None:
    def check(model: QBenchForCausalLM) -> None:
        layer = model.model.layers[0]
        attn = layer.self_attn
        for zero in (attn.gate, attn.context_scale, layer.input_layernorm.gate_up):
            assert zero.weight.abs().max() == 0
        assert attn.k_bias.abs().max() == attn.v_bias.abs().max() == 0
        assert layer.mlp.up_proj.weight.std() > 0.01

    options = {**OPTION_SETS["combined"], "attn_output_gate": "headwise"}
    check(make(**options))
    # Loading a baseline checkpoint into a variant initialises just the new parameters.
    base = make(seed=5)
    base.save_pretrained(tmp_path)
    config = QBenchConfig.from_pretrained(tmp_path, **options)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
    check(model)
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    preaffine = AutoModelForCausalLM.from_pretrained(tmp_path, norm="preaffine")
    assert torch.equal(preaffine.model.norm.pre_scale, torch.ones(TINY["hidden_size"]))


def test_tied_embeddings_roundtrip(tmp_path: Path) -> None:
    model = make(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("name", OPTION_SETS)
def test_option_changes_logits_and_roundtrips(name: str, tmp_path: Path) -> None:
    base, model = with_baseline_weights(OPTION_SETS[name])
    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
        assert (logits - base(ids).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert isinstance(loaded, QBenchForCausalLM)
    saved = {**model.config.to_dict(), "_name_or_path": str(tmp_path)}
    assert loaded.config.to_dict() == saved
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, logits)


def test_bfloat16_load_runs(tmp_path: Path) -> None:
    _, model = with_baseline_weights(OPTION_SETS["combined"])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        low, high = loaded(tokens()).logits.float(), model(tokens()).logits
    assert loaded.dtype == torch.bfloat16
    assert (low - high).abs().max() < 0.1 * high.abs().max()


@pytest.mark.parametrize("name", ["baseline", *OPTION_SETS])
def test_init_is_stable_and_trains(name: str) -> None:
    ids = tokens(4, 16)
    base_std = make()(ids).logits.std()
    model = make(**VARIANTS.get(name, OPTION_SETS.get(name, {}))).train()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert 0.25 < out.logits.std() / base_std < 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100() -> None:
    model, ids = make(), tokens()
    labels = ids.clone()
    labels[0, 4:] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(out.loss, expected)
    assert isinstance(model(ids, labels=labels, return_dict=False), tuple)


@pytest.mark.parametrize("softmax", ["standard", "off_by_one", "softpick"])
@pytest.mark.parametrize("kv_bias", [False, True])
def test_output_attentions(softmax: str, kv_bias: bool) -> None:
    _, model = with_baseline_weights({"attn_softmax": softmax, "attn_kv_bias": kv_bias})
    t = 10
    with torch.no_grad():
        out = model(tokens(length=t), output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert len(out.attentions) == TINY["num_hidden_layers"]
    for probs in out.attentions:
        assert probs.shape == (2, TINY["num_attention_heads"], t, t + kv_bias)
        assert probs.min() >= 0
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        assert probs[..., kv_bias:][..., future].abs().max() == 0  # causal (slot is column 0)
        rows = probs.sum(-1)
        if softmax == "standard":
            assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
        else:
            assert rows.max() <= 1 + 1e-5
            assert rows.min() < 0.999  # these variants can abstain


@pytest.mark.parametrize("name", ["baseline", *OPTION_SETS])
def test_padding_mask_matches_unpadded(name: str) -> None:
    _, model = with_baseline_weights(OPTION_SETS.get(name, {}))
    ids = tokens(1, 8)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 8])
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask)  # left padding; RoPE is relative
        assert torch.isfinite(out.logits).all()
    assert (out.logits[:, 3:] - ref).abs().max() < 1e-5


def test_softmax_variants_match_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = 4 * torch.randn(3, 5, 7, generator=gen)
    scores[0, 0, :3] = 100.0  # would overflow a naive fp32 exp
    scores[1] = -100.0  # all logits very negative
    keep = torch.rand(3, 5, 7, generator=gen) > 0.3
    keep[2, 0] = False  # a fully masked row
    x = scores.double()
    e = torch.where(keep, x.exp(), 0.0)
    expected = {
        "standard": e / e.sum(-1, keepdim=True),
        "off_by_one": e / (1 + e.sum(-1, keepdim=True)),
        "softpick": torch.where(keep, (x.exp() - 1).relu(), 0.0)
        / (torch.where(keep, (x.exp() - 1).abs(), 0.0).sum(-1, keepdim=True) + SOFTPICK_EPS),
    }
    for kind, ref in expected.items():
        got = attention_probs(scores, keep, kind).double()
        assert torch.isfinite(got).all()
        rows = keep.any(-1)  # the fully masked row is only required to be finite
        assert torch.allclose(got[rows], ref[rows], atol=1e-6, rtol=1e-5), kind
        if kind != "standard":
            assert got[2, 0].abs().max() == 0


def test_generate_is_greedy_without_cache() -> None:
    model, prompt = make(attn_output_gate="headwise"), tokens(1, 5)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    seq = prompt
    for _ in range(4):
        with torch.no_grad():
            next_token = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, next_token), dim=1)
    assert torch.equal(out, seq)


def test_config_validation_and_variants() -> None:
    with pytest.raises(ValueError, match="attn_softmax"):
        QBenchConfig(attn_softmax="sparsemax")
    with pytest.raises(ValueError, match="norm"):
        QBenchConfig(norm="layernorm")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        QBenchConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="did you mean 'softpick'"):
        variant_options("softpik")
    for name in VARIANTS:
        assert QBenchConfig(**TINY, **variant_options(name)).variant_name() == name
    assert QBenchConfig(**OPTION_SETS["combined"]).variant_name() is None
    assert QBenchConfig(hidden_size=96, num_attention_heads=4).head_dim == 24
    register()  # idempotent
    register()


# --- Qwen3 and the Gated Attention paper's released format -------------------------------

QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # != hidden / heads, as in real Qwen3
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "qkv_bias": False,
    "use_qk_norm": True,
}


def write_gated_checkpoint(path: Path, gate: str, tie: bool) -> dict[str, Tensor]:
    """A random checkpoint in the authors' layout (q_proj also emits the gate logits)."""
    cfg = {
        **QWEN3,
        "headwise_attn_output_gate": gate == "headwise",
        "elementwise_attn_output_gate": gate == "elementwise",
        "tie_word_embeddings": tie,
    }
    hidden, heads, kv, d = 64, 4, 2, 32
    gate_dim = 1 if gate == "headwise" else d
    gen = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> Tensor:
        return 0.1 * torch.randn(*shape, generator=gen)

    w = {"model.embed_tokens.weight": rand(128, hidden), "model.norm.weight": 1 + rand(hidden)}
    if not tie:
        w["lm_head.weight"] = rand(128, hidden)
    for i in range(2):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": 1 + rand(hidden),
            p + "post_attention_layernorm.weight": 1 + rand(hidden),
            p + "self_attn.q_proj.weight": rand(heads * d + heads * gate_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv * d, hidden),
            p + "self_attn.v_proj.weight": rand(kv * d, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * d),
            p + "self_attn.q_norm.weight": 1 + rand(d),
            p + "self_attn.k_norm.weight": 1 + rand(d),
            p + "mlp.gate_proj.weight": rand(96, hidden),
            p + "mlp.up_proj.weight": rand(96, hidden),
            p + "mlp.down_proj.weight": rand(hidden, 96),
        }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "model.safetensors"))
    return w


def reference_gated_qwen3(w: dict[str, Tensor], ids: Tensor, gate: str) -> Tensor:
    """Logits written from the paper (Y * sigmoid(X W_theta) before o_proj) and the authors'
    modeling_qwen3.py split: q_proj(x).view(b, t, n_kv, -1) -> [g*d queries | g*gate_dim gates]."""
    heads, kv, d, eps, theta = 4, 2, 32, 1e-6, 1000000.0
    g, gate_dim = heads // kv, 1 if gate == "headwise" else d
    b, t = ids.shape

    def rms(x: Tensor, weight: Tensor) -> Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    angles = torch.arange(t).float()[:, None] / theta ** (torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def rope(x: Tensor) -> Tensor:
        return x * cos + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1) * sin

    causal = torch.full((t, t), -math.inf).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(2):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        per_group = (h @ w[p + "self_attn.q_proj.weight"].T).view(b, t, kv, -1)
        q, gate_logits = per_group.split([g * d, g * gate_dim], dim=-1)
        q = rms(q.reshape(b, t, heads, d), w[p + "self_attn.q_norm.weight"])
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(b, t, kv, d)
        k = rms(k, w[p + "self_attn.k_norm.weight"])
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, t, kv, d)
        q, k = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)).repeat_interleave(g, 1)
        v = v.transpose(1, 2).repeat_interleave(g, 1)
        y = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d) + causal, -1) @ v
        y = y.transpose(1, 2) * torch.sigmoid(gate_logits.reshape(b, t, heads, gate_dim))
        x = x + y.reshape(b, t, heads * d) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, w["model.norm.weight"]) @ head.T


@pytest.mark.parametrize(("gate", "tie"), [("headwise", False), ("elementwise", True)])
def test_gated_qwen3_matches_reference(gate: str, tie: bool, tmp_path: Path) -> None:
    weights = write_gated_checkpoint(tmp_path / "src", gate, tie)
    model = load_gated_qwen3(tmp_path / "src")
    assert model.config.attn_output_gate == gate and model.config.qk_norm
    assert model.config.head_dim == 32 and model.config.tie_word_embeddings == tie
    ids = tokens(2, 12)
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - reference_gated_qwen3(weights, ids, gate)).abs().max() < 1e-5

    convert_gated_qwen3(tmp_path / "src", tmp_path / "dst")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_plain_qwen3_matches_transformers(tmp_path: Path) -> None:
    config = {k: v for k, v in QWEN3.items() if k not in ("model_type", "architectures")}
    qwen = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    with torch.no_grad():  # larger than the 0.02 init so that differences would show
        for p in qwen.parameters():
            p.copy_(p + 0.1 * torch.randn_like(p))
    qwen.save_pretrained(tmp_path)
    model = load_gated_qwen3(tmp_path)
    assert model.config.attn_output_gate == "none" and model.config.qk_norm
    ids = tokens(2, 12)
    with torch.no_grad():
        assert (model(ids).logits - qwen(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"use_sliding_window": True}, "sliding-window"),
        ({"model_type": "llama"}, "not qwen3"),
        ({"headwise_attn_output_gate": False, "elementwise_attn_output_gate": True}, "q_proj"),
    ],
)
def test_qwen3_loader_rejects_what_it_cannot_represent(
    change: dict, error: str, tmp_path: Path
) -> None:
    write_gated_checkpoint(tmp_path, "headwise", False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=error):
        load_gated_qwen3(tmp_path)
