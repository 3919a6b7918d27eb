"""KV-cache quantization and QuaRot's Q/K rotation: attention's online step after RoPE.

`KVTransform` takes each attention's query, key and value after RoPE (and after qk_norm,
which comes before RoPE), shaped [batch, heads, tokens, head_dim], before GQA repeats the KV
heads: it rotates q and k by a per-head Hadamard H when rotation asks for it (QK^T is
unchanged), then fake-quantizes k and v as the recipe's `kv:` says, dynamically per token,
as a KV cache would store them. Rounding is per token, so rounding the whole cache again at
every generation step equals rounding each token once.

How it reaches attention, found by one probe forward pass (`kv_sites`), whatever the model:
- transformers models whose attention calls the function registered in transformers'
  AttentionInterface under `config._attn_implementation` (Llama, Qwen, Mistral, Gemma, Phi,
  GPT-2, OPT, GPT-NeoX, OLMo, Granite, StableLM, Starcoder2, MoE and MLA models, ...): qbench
  registers `qbench_kv_<base>` (base: sdpa, eager, ...), which applies the attention module's
  `kv_transform` and defers to <base> with <base>'s mask (sliding windows included), and
  switches the model to it. Multi-head latent attention (DeepSeek) reaches it with its
  decompressed keys and values: those are what is rounded.
- the qbench family: QBenchAttention calls its `kv_transform` right after RoPE. The learned
  attn-bias slot (k', v') is a parameter, not cache: it is concatenated afterwards and stays in
  float (rotation rotates k' with the keys, so the scores are unchanged);
- attention modules that call torch's scaled_dot_product_attention themselves (Falcon): their
  forward runs under a torch function mode that applies `kv_transform` to SDPA's q, k, v.
A model whose attention reaches none of these has no KV step: QBenchError.
"""

from __future__ import annotations

import contextvars
import functools
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qbench.errors import QBenchError
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.hadamard import HadamardTransform
from qbench.quant.formats.spec import KVQuant

KV_ATTENTION_PREFIX = "qbench_kv_"
_ATTENTION_CLASS = re.compile(r"Attention", re.IGNORECASE)
_SEEN: contextvars.ContextVar[dict[int, tuple[nn.Module, int]] | None] = contextvars.ContextVar(
    "qbench_kv_discovery", default=None
)


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


@dataclass(frozen=True)
class KVSite:
    """One attention module with its KV step; head_dim: the width of its queries and keys."""

    attention: nn.Module
    transform: KVTransform
    head_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.attention.parameters()).device


def kv_sites(model: nn.Module) -> list[KVSite]:
    """Every attention module's KVTransform, installed (and wired into attention) where
    missing, in the order attention runs; QBenchError if attention has no place for it."""
    family = [m for m in model.modules() if _calls_kv_transform(m)]
    seen = {id(m): (m, m.head_dim) for m in family} if family else _discover(model)
    if not seen:
        raise QBenchError(
            f"{model.config.model_type}: attention runs neither through transformers' "
            "AttentionInterface nor torch's scaled_dot_product_attention: no KV-cache step; "
            "remove kv: for this checkpoint"
        )
    sites = []
    for attention, head_dim in seen.values():
        if getattr(attention, "kv_transform", None) is None:
            attention.kv_transform = KVTransform()
        sites.append(KVSite(attention, attention.kv_transform, head_dim))
    return sites


def _calls_kv_transform(module: nn.Module) -> bool:
    """The qbench family's attention, which calls its own `kv_transform` after RoPE."""
    return type(module).__module__.startswith("qbench.") and hasattr(module, "kv_transform")


def _discover(model: nn.Module) -> dict[int, tuple[nn.Module, int]]:
    """Route attention through the KV step, and find the modules that reach it in one pass."""
    from qbench.quant.walk.structure import probe_ids

    _route_attention(model)
    seen: dict[int, tuple[nn.Module, int]] = {}
    token = _SEEN.set(seen)
    try:
        with torch.no_grad():
            model(input_ids=probe_ids(model))
    finally:
        _SEEN.reset(token)
    return seen


def quantize_kv_cache(model: nn.Module, spec: KVQuant) -> None:
    """Round every attention's keys (after RoPE and any Q/K rotation) and values as `spec` says."""
    for site in kv_sites(model):
        site.transform.quant = spec


def _route_attention(model: nn.Module) -> None:
    """Make every attention module call `_apply` with its q, k, v (see the module docstring)."""
    if type(model)._can_set_attn_implementation():
        model.set_attn_implementation(kv_attention(model.config._attn_implementation or "sdpa"))
        return
    for module in model.modules():
        if _ATTENTION_CLASS.search(type(module).__name__) and "forward" not in vars(module):
            module.forward = functools.partial(_forward_under_sdpa_step, module)


def _apply(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's KV step (identity where none is installed); records it while discovering."""
    seen = _SEEN.get()
    if seen is not None:
        seen.setdefault(id(module), (module, query.shape[-1]))
    transform = getattr(module, "kv_transform", None)
    return transform(query, key, value) if transform is not None else (query, key, value)


def _forward_under_sdpa_step(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with _SDPAStep(module):
        return type(module).forward(module, *args, **kwargs)


class _SDPAStep(TorchFunctionMode):
    """Applies the module's KV step to the q, k, v of scaled_dot_product_attention calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention" and len(args) >= 3:
            args = (*_apply(self.module, *args[:3]), *args[3:])
        return func(*args, **kwargs)


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
    query, key, value = _apply(module, query, key, value)
    if base == "eager":  # no registered function: each modeling file defines its own
        attend = sys.modules[type(module).__module__].eager_attention_forward
    else:
        attend = ALL_ATTENTION_FUNCTIONS[base]
    return attend(module, query, key, value, attention_mask, **kwargs)
