"""KV-cache quantization and QuaRot's Q/K rotation: attention's online step after RoPE.

`KVTransform` takes each attention's query, key and value after RoPE (and after qk_norm,
which comes before RoPE), shaped [batch, heads, tokens, head_dim], before GQA repeats the KV
heads: it rotates q and k by a per-head Hadamard H when rotation asks for it (QK^T is
unchanged), then fake-quantizes k and v as the recipe's `kv:` says, dynamically per token,
as a KV cache would store them. Rounding is per token, so rounding the whole cache again at
every generation step equals rounding each token once.

How it reaches attention (the architecture adapter says which):
- the qbench family: QBenchAttention calls its `kv_transform` right after RoPE. The learned
  attn-bias slot (k', v') is a parameter, not cache: it is concatenated afterwards and stays in
  float (rotation rotates k' with the keys, so the scores are unchanged);
- transformers' Llama, Qwen2, Qwen3, Mistral: their attention calls the function registered in
  transformers' AttentionInterface under `config._attn_implementation` with the post-RoPE
  states. qbench registers `qbench_kv_<base>` (base: sdpa, eager, ...), which applies the
  module's `kv_transform` and defers to <base> with <base>'s mask, and switches the model to it.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qbench.errors import QBenchError
from qbench.quant.adapters import decoder_view
from qbench.quant.hadamard import HadamardTransform
from qbench.quant.spec import KVQuant, fake_quant

KV_ATTENTION_PREFIX = "qbench_kv_"


class KVTransform(nn.Module):
    """q, k, v after RoPE -> (q H, k H, v) rounded as `quant` says (each step optional)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk_rotation: HadamardTransform | None = None
        self.quant: KVQuant | None = None

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qk_rotation is not None:
            query, key = self.qk_rotation(query), self.qk_rotation(key)
        if self.quant is not None:
            key, value = fake_quant(key, self.quant), fake_quant(value, self.quant)
        return query, key, value

    def extra_repr(self) -> str:
        return f"kv={self.quant.label() if self.quant else 'fp'}"


def kv_transforms(model: nn.Module) -> list[KVTransform]:
    """Each decoder layer's KVTransform, installed (and wired into attention) where missing."""
    view = decoder_view(model)
    if view.architecture.attention_interface:
        model.set_attn_implementation(kv_attention(model.config._attn_implementation or "sdpa"))
    transforms = []
    for layer in view.layers:
        if getattr(layer.attention, "kv_transform", None) is None:
            layer.attention.kv_transform = KVTransform()
        transforms.append(layer.attention.kv_transform)
    return transforms


def quantize_kv_cache(model: nn.Module, spec: KVQuant) -> None:
    """Round every attention's keys (after RoPE and any Q/K rotation) and values as `spec` says."""
    for transform in kv_transforms(model):
        transform.quant = spec


def kv_attention(base: str) -> str:
    """The registered name of `base` attention (sdpa, eager, ...) preceded by the KV step."""
    if base.startswith(KV_ATTENTION_PREFIX):
        return base
    name = KV_ATTENTION_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise QBenchError(
                f"attention implementation '{base}' has no mask function in "
                "transformers: no KV-cache step for it; use sdpa or eager"
            )
        AttentionInterface.register(name, functools.partial(_kv_attention, base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def eager_attention(current: str | None) -> str:
    """The eager attention matching `current`: with the KV step if `current` has it."""
    if current is not None and current.startswith(KV_ATTENTION_PREFIX):
        return kv_attention("eager")
    return "eager"


def _kv_attention(
    base: str,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    query, key, value = module.kv_transform(query, key, value)
    if base == "eager":  # no registered function: each modeling file defines its own
        attend = sys.modules[type(module).__module__].eager_attention_forward
    else:
        attend = ALL_ATTENTION_FUNCTIONS[base]
    return attend(module, query, key, value, attention_mask, **kwargs)
