"""KV-cache quantization and QuaRot's Q/K rotation: attention's online step after RoPE.

`KVTransform` takes each attention's query, key and value after RoPE (and after qk_norm,
which comes before RoPE), shaped [batch, heads, tokens, head_dim], before GQA repeats the KV
heads: it rotates q and k by a per-head Hadamard H when rotation asks for it (QK^T is
unchanged), then fake-quantizes k and v as the recipe's `kv:` says, dynamically per token,
as a KV cache would store them, but for the tokens `keep_float:` keeps in float
(qbench.quant.walk.tokens). Rounding is per token, so rounding the whole cache again at
every generation step equals rounding each token once. Where an ablation removes the
attention sink (`drop_first_key`), the attention mask of transformers' attention functions
hides the first key from every later query (`KVTransform.mask`).

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
- attention modules that do not go through the AttentionInterface (Falcon, MPT, GPT-J,
  CodeGen, BLOOM): their forward runs under a torch function mode that applies `kv_transform`
  to the q, k, v of the scaled_dot_product_attention they call (Falcon), or, where the
  attention is written out, to the factors of its two batched products of activations (matmul,
  bmm or baddbmm of two tensors of 3 or more dimensions, no parameter): the scores q @ k^T
  (MPT, GPT-J, CodeGen; BLOOM's baddbmm with ALiBi), whose second factor is the keys
  transposed, then the probabilities @ v. An attention making another number of such
  products is refused (QBenchError) rather than guessed at. The keys are those the cache holds:
  after RoPE (GPT-J, CodeGen), with the cache's earlier tokens.
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

from qbench.errors import QBenchError, RefusedError
from qbench.quant.formats.fake import fake_quant, fake_quant_except
from qbench.quant.formats.hadamard import HadamardTransform
from qbench.quant.formats.spec import KVQuant
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.tokens import TokenExemption

KV_ATTENTION_PREFIX = "qbench_kv_"
_ATTENTION_CLASS = re.compile(r"Attention", re.IGNORECASE)
_SEEN: contextvars.ContextVar[dict[int, tuple[nn.Module, int]] | None] = contextvars.ContextVar(
    "qbench_kv_discovery", default=None
)


class KVTransform(nn.Module):
    """q, k, v after RoPE -> (q H, k H, v) rounded as `quant` says (each step optional), the
    tokens `float_tokens` keeps in float left as they are; `drop_first_key`: `mask` hides the
    first key from the queries after it."""

    def __init__(self) -> None:
        super().__init__()
        self.qk_rotation: HadamardTransform | None = None
        self.quant: KVQuant | None = None
        self.float_tokens: TokenExemption | None = None
        self.drop_first_key = False

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*self.keys(query, key), self.values(value))

    def keys(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q H, k H rounded): [..., tokens, head_dim] each."""
        if self.qk_rotation is not None:
            query, key = self.qk_rotation(query), self.qk_rotation(key)
        return query, self._round(key)

    def values(self, value: torch.Tensor) -> torch.Tensor:
        """v rounded: [..., tokens, head_dim]."""
        return self._round(value)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """Keys or values [batch, heads, tokens, head_dim] rounded, the float tokens' rows
        (keep_float) left as they are."""
        if self.quant is None:
            return x
        if self.float_tokens is None:
            return fake_quant(x, self.quant)
        return fake_quant_except(x, self.quant, self.float_tokens.key_rows(x))  # [b, 1, t]

    def mask(
        self, attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor | None:
        """The attention mask, with the first key hidden from every query after it where
        `drop_first_key` (bool masks: False; additive float masks: the dtype's minimum; None, a
        causal mask left to the kernel: an explicit causal bool mask). Softmax over the keys
        left renormalises each row. Queries sit at the last positions of the keys."""
        if not self.drop_first_key:
            return attention_mask
        queries, keys = query.shape[-2], key.shape[-2]
        position = torch.arange(keys - queries, keys, device=query.device)  # [q]
        width = keys if attention_mask is None else attention_mask.shape[-1]
        hide = torch.zeros(queries, width, dtype=torch.bool, device=query.device)
        hide[:, 0] = position > 0  # [q, k]: key 0, for the queries past position 0
        if attention_mask is None:
            causal = torch.arange(keys, device=query.device) <= position[:, None]  # [q, k]
            return (causal & ~hide)[None, None]
        if attention_mask.dtype == torch.bool:
            return attention_mask & ~hide
        return attention_mask.masked_fill(hide, torch.finfo(attention_mask.dtype).min)

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
        """Where attention computes (its execution device where accelerate dispatched it)."""
        from qbench.quant.walk.onload import execution_device

        return execution_device(self.attention)


def kv_sites(model: nn.Module) -> list[KVSite]:
    """Every attention module's KVTransform, installed (and wired into attention) where
    missing, in the order attention runs; RefusedError for a model without attention,
    QBenchError if attention has no place for it."""
    family = [m for m in model.modules() if _calls_kv_transform(m)]
    seen = {id(m): (m, m.head_dim) for m in family} if family else _discover(model)
    if not seen and not _has_attention(model):
        raise RefusedError(
            f"{model.config.model_type} has no attention layers, so no KV cache (its "
            "state-space mixers keep a recurrent state); remove kv: for this checkpoint"
        )
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


def _has_attention(model: nn.Module) -> bool:
    """Whether the inventory finds attention projections (a Mamba model has none)."""
    return bool(inventory(model).of_kind("attention"))


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
            module.forward = functools.partial(_forward_under_kv_step, module)


def _apply(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's KV step (identity where none is installed); records it while discovering."""
    _discovered(module, query)
    transform = getattr(module, "kv_transform", None)
    return transform(query, key, value) if transform is not None else (query, key, value)


def _discovered(module: nn.Module, query: torch.Tensor) -> None:
    seen = _SEEN.get()
    if seen is not None:
        seen.setdefault(id(module), (module, query.shape[-1]))


def _keys(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV step's (q H, k H rounded) where attention is written out (scores' factors)."""
    _discovered(module, query)
    transform = getattr(module, "kv_transform", None)
    return transform.keys(query, key) if transform is not None else (query, key)


def _values(module: nn.Module, value: torch.Tensor) -> torch.Tensor:
    transform = getattr(module, "kv_transform", None)
    return transform.values(value) if transform is not None else value


def _forward_under_kv_step(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with _AttentionStep(module) as step:
        out = type(module).forward(module, *args, **kwargs)
    if step.products not in (0, 2):
        raise QBenchError(
            f"{type(module).__name__} makes {step.products} batched products of activations "
            "in one call: qbench cannot tell its scores (q @ k^T) from its values (p @ v), so "
            "it has no KV-cache step; remove kv: for this checkpoint"
        )
    return out


# batched products of two activations: the positions and keywords of their two factors
_PRODUCTS = {
    "matmul": ((0, 1), ("input", "other")),
    "__matmul__": ((0, 1), ("input", "other")),
    "bmm": ((0, 1), ("input", "mat2")),
    "baddbmm": ((1, 2), ("batch1", "batch2")),
}


class _AttentionStep(TorchFunctionMode):
    """Applies the module's KV step inside its forward: to the q, k, v of
    scaled_dot_product_attention calls, and to the factors of its written-out attention's two
    batched products (scores q @ k^T, then probabilities @ v; see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.products = 0  # batched products of activations seen in this call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention" and len(args) >= 3:
            args = (*_apply(self.module, *args[:3]), *args[3:])
        elif name in _PRODUCTS:
            args = self._product(name, list(args), kwargs)
        return func(*args, **kwargs)

    def _product(self, name: str, args: list, kwargs: dict) -> tuple:
        """The arguments with the factors through the KV step (kwargs changed in place)."""
        where = [
            (args, i) if i < len(args) else (kwargs, key)
            for i, key in zip(*_PRODUCTS[name], strict=True)
        ]
        factors = [holder.get(at) if holder is kwargs else holder[at] for holder, at in where]
        if not all(
            isinstance(f, torch.Tensor) and f.dim() >= 3 and not isinstance(f, nn.Parameter)
            for f in factors
        ):
            return tuple(args)
        first, second = factors
        if self.products % 2 == 0:  # scores: q [..., tokens, d] @ k^T [..., d, tokens']
            query, key = _keys(self.module, first, second.transpose(-1, -2))
            new = (query, key.transpose(-1, -2))
        else:  # values: probabilities [..., tokens, tokens'] @ v [..., tokens', d]
            new = (first, _values(self.module, second))
        self.products += 1
        for (holder, at), value in zip(where, new, strict=True):
            holder[at] = value
        return tuple(args)


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
    transform = getattr(module, "kv_transform", None)
    if transform is not None:
        attention_mask = transform.mask(attention_mask, query, key)
    if base == "eager":  # no registered function: each modeling file defines its own
        attend = sys.modules[type(module).__module__].eager_attention_forward
    else:
        attend = ALL_ATTENTION_FUNCTIONS[base]
    return attend(module, query, key, value, attention_mask, **kwargs)
