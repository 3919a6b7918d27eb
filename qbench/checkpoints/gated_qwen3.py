"""Load Qwen3 checkpoints, including the Gated Attention paper's released ones, as qbench models.

Qiu et al. 2025 ("Gated Attention for Large Language Models", github.com/qiuzh20/gated_attention,
modeling_qwen3.py) ship Qwen3-style checkpoints whose config.json carries
`headwise_attn_output_gate` / `elementwise_attn_output_gate` and whose gate logits come out of
an enlarged q_proj. Their split, per KV-head group of g = n_heads / n_kv_heads query heads:

    q_proj(x).view(b, t, n_kv_heads, g * head_dim + g * gate_dim)
        .split([g * head_dim, g * gate_dim], -1)      # queries first, then the group's gates

with gate_dim = 1 (headwise) or head_dim (elementwise); both halves are then reshaped to
[b, t, n_heads, -1], so query head h = kv * g + j. The gate multiplies the attention output,
Y * sigmoid(gate), per head before o_proj. q_norm / k_norm (`use_qk_norm`, default True) are
RMSNorms over head_dim applied before RoPE. A plain Qwen3 checkpoint (no gate flags) loads too.

Only config.json and *.safetensors are read; no remote code is imported or executed.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM


def qbench_config_from_qwen3(cfg: dict[str, Any]) -> QBenchConfig:
    """The qbench config equivalent to a (gated) Qwen3 config.json; rejects what it cannot map."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        f"model_type {cfg.get('model_type')!r} (not qwen3)": cfg.get("model_type") != "qwen3",
        "rope type other than default": rope_type != "default",
        "hidden_act other than silu": cfg.get("hidden_act", "silu") != "silu",
        "attention/qkv biases": bool(cfg.get("attention_bias") or cfg.get("qkv_bias")),
        "sliding-window attention": bool(cfg.get("use_sliding_window")),
    }
    if problems := [name for name, present in unsupported.items() if present]:
        raise ValueError(f"Qwen3 checkpoint uses {', '.join(problems)}: not in the qbench family")
    gate = "none"
    if cfg.get("elementwise_attn_output_gate"):
        gate = "elementwise"
    if cfg.get("headwise_attn_output_gate"):  # the authors' code checks it first: it wins
        gate = "headwise"
    heads = cfg["num_attention_heads"]
    return QBenchConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attn_output_gate=gate,
        qk_norm=cfg.get("use_qk_norm", True),  # transformers' Qwen3 always has it
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def split_gated_q_proj(weight: Tensor, config: QBenchConfig) -> tuple[Tensor, Tensor]:
    """Split the authors' enlarged q_proj weight into (q_proj weight, gate weight)."""
    n_heads, n_kv, head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    g = n_heads // n_kv
    gate_dim = 1 if config.attn_output_gate == "headwise" else head_dim
    if weight.shape[0] != n_heads * (head_dim + gate_dim):
        raise ValueError(
            f"q_proj has {weight.shape[0]} rows; a {config.attn_output_gate} gate needs "
            f"{n_heads * (head_dim + gate_dim)} (n_heads * (head_dim + gate_dim))"
        )
    per_group = weight.view(n_kv, g * (head_dim + gate_dim), weight.shape[-1])
    q, gate = per_group.split([g * head_dim, g * gate_dim], dim=1)
    return q.reshape(n_heads * head_dim, -1), gate.reshape(n_heads * gate_dim, -1)


def load_gated_qwen3(path: str | Path, dtype: torch.dtype | None = None) -> QBenchForCausalLM:
    """Load a (gated) Qwen3 checkpoint directory as a QBenchForCausalLM (eval mode)."""
    path = Path(path)
    config = qbench_config_from_qwen3(json.loads((path / "config.json").read_text()))
    state: dict[str, Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    # Old checkpoints may carry the (recomputed) RoPE table; no key may carry a bias.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if biases := [k for k in state if k.endswith(".bias")]:
        raise ValueError(f"checkpoint has biases, not in the qbench family: {biases[:3]}")

    if config.attn_output_gate != "none":
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}.self_attn."
            q, gate = split_gated_q_proj(state[prefix + "q_proj.weight"], config)
            state[prefix + "q_proj.weight"], state[prefix + "gate.weight"] = q, gate
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}

    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = QBenchForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert_gated_qwen3(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Convert a (gated) Qwen3 checkpoint to a qbench checkpoint directory; returns dst_dir."""
    load_gated_qwen3(src_dir).save_pretrained(dst_dir)
    return Path(dst_dir)
