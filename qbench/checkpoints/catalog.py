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
