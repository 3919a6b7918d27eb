"""The names a recipe may give the qbench model family (no torch): its architecture variants
and its training presets (checked when a recipe loads, without importing the model code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.registry import Registry, did_you_mean

# Short variant names used by the trainer -> the config options they change from the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "gate-headwise": {"attn_output_gate": "headwise"},
    "gate-elementwise": {"attn_output_gate": "elementwise"},
    "attn-bias": {"attn_kv_bias": True},
    "context-scaling": {"attn_context_scaling": True},
    "softmax-off-by-one": {"attn_softmax": "off_by_one"},
    "softpick": {"attn_softmax": "softpick"},
    "preaffine": {"norm": "preaffine"},
    "gatednorm": {"norm": "gatednorm"},
}


def variant_options(name: str) -> dict[str, Any]:
    """Config options of the variant `name` (a copy of VARIANTS[name])."""
    if name not in VARIANTS:
        raise ValueError(
            f"unknown variant '{name}'{did_you_mean(name, list(VARIANTS))}; "
            f"known: {', '.join(VARIANTS)}"
        )
    return dict(VARIANTS[name])


@dataclass(frozen=True)
class Preset:
    """Model shape and optimisation schedule of a training run."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    # Added later; None keeps the digests of checkpoints trained before they existed.
    beta2: float | None = None  # AdamW's second beta; None: 0.95
    min_lr: float | None = None  # the cosine's floor as a fraction of lr; None: 0.1


PRESETS: Registry[Preset] = Registry("training preset")
PRESETS.register("tiny")(
    Preset(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        seq_len=128,
        batch_size=16,
        steps=600,
        lr=3e-3,
        warmup=50,
    )
)
# About an hour on a 2-core CPU: 1.6 s/step measured (tiny: 0.27 s/step) x 2200 steps
# = 9.0M tokens, about one epoch of the shared corpus; minutes on a GPU.
PRESETS.register("small")(
    Preset(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        seq_len=256,
        batch_size=16,
        steps=2200,
        lr=2e-3,
        warmup=100,
    )
)
# For one GPU: natural text up to the scale where Gu et al. (ICLR 2025, "When Attention Sink
# Emerges in Language Models") see sinks form (1-2B tokens). 12 layers x 768 wide, GQA 12/4,
# SwiGLU 2048, BPE 8192: 88M parameters (75.5M in the blocks, 6.3M in lm_head's matmul).
# 64 x 1024 = 65,536 tokens per step x 15,300 steps = 1.003B tokens. Training FLOPs: 6 x 81.8M
# (weights) + 6 x 12 x 1024 x 768 (causal attention scores and values, fwd + bwd) = 0.55
# GFLOP per token, 5.5e17 in all: 56 min at 165 TFLOP/s (17% of an H100 SXM's 989 dense
# bf16 TFLOP/s), 31 min at 30%. Estimated, not measured: the README says on what basis.
PRESETS.register("gpu-1b")(
    Preset(
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        seq_len=1024,
        batch_size=64,
        steps=15_300,
        lr=1e-3,
        warmup=500,
        weight_decay=0.1,
    )
)

# Synthetic-task preset (train.task; qbench.data.synthetic): the model's vocabulary is the
# task's (vocab_size is used only when the preset trains on text). 2 layers x 64 wide, one head
# per layer, 2000 steps x 64 x 32 = 4.1M tokens at a constant 2e-2 (AdamW, betas 0.9 / 0.99,
# weight decay 0.1): the copy head parks non-trigger queries on BOS (mass >= 0.9) within ~600
# steps and BOS's residual state peaks (max/median ~40); about 110 s of CPU per checkpoint.
# docs/outliers.md's "Synthetic tasks" table says what else was tried and what formed.
PRESETS.register("synthetic-sink")(
    Preset(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        seq_len=32,
        batch_size=64,
        steps=2000,
        lr=2e-2,
        warmup=30,
        weight_decay=0.1,
        beta2=0.99,
        min_lr=1.0,
    )
)
