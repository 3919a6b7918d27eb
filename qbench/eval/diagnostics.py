"""Outlier diagnostics: massive activations, attention sinks, kurtosis, super weights, SQNR.

Works on any causal LM whose decoder layers sit at `model.model.layers` (the qbench family,
Llama, Qwen2/3, Mistral, ...), unquantized or quantized. One forward pass over a few fixed
windows of text collects the outlier figures; with a quantizer, a second pass over the
unquantized model measures the quantization error of every linear layer.

Definitions (h is the residual stream after a decoder layer):
- massive activations: per layer, the top-3 |h| over (token position, dimension), each the
  max over the probe's samples; the median |h| over all elements; ratio = top-1 / median.
- attention sink: per layer and head, the attention mass on the first token, averaged over
  samples and over queries 1..t-1 (query 0 sees only itself). With an attention-bias slot
  (qbench attn_kv_bias: column 0 of the map), the first token is column 1 and the slot's own
  mass is reported as `bias_slot_mass`. HF models are switched to eager attention meanwhile.
  With query types (a synthetic task's probe, qbench.data.synthetic: windows that start with
  BOS, queries split into non-trigger / trigger), the same mass per type; the sink head is the
  head with the largest mass from the first type (non-trigger: where the task rewards a no-op),
  and `sink_mass_<type>` are that head's masses (Guo et al. 2024's active-dormant head: near 1
  from non-trigger queries, low from trigger queries).
- kurtosis: Pearson's E[(x - mean)^4] / var^2 over all elements (3 for a Gaussian), of each
  linear layer's input and of each weight matrix.
- super-weight candidates (Yu et al. 2024): at each down_proj, the input channel (column) and
  output channel (row) of the largest |input| and |output|; W[row, column] is the candidate,
  ranked by |input| x |output|.
- SQNR of a linear: 10 log10(sum y^2 / sum (y - y_q)^2), y its float output and y_q its
  output with the quantizer's weight and activation formats applied by round-to-nearest to
  the same input (a method's own transforms, e.g. rotation, are not applied).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate.utils import align_module_device
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qbench.checkpoints.dispatch import input_device
from qbench.config import StrictModel
from qbench.eval.perplexity import windows_of
from qbench.quant.formats.fake import fake_quant
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.inventory import find_blocks, inventory, path_kind
from qbench.quant.walk.kvcache import eager_attention
from qbench.quant.walk.select import quantized_targets

TOP = 3
CHARS_PER_TOKEN = 32  # generous: the probe tokenizes only the head of the text


class DiagnosticsSpec(StrictModel):
    """The probe: the first `samples` windows of `seq_len` tokens of the eval text."""

    samples: int = Field(default=4, ge=1)
    seq_len: int = Field(default=128, ge=2)


@dataclass(frozen=True)
class Diagnostics:
    """`summary`: a few numbers per model; `details`: per layer and per linear."""

    summary: dict[str, Any]
    details: dict[str, Any]


def probe_ids(tokenizer: PreTrainedTokenizerBase, text: str, spec: DiagnosticsSpec) -> Tensor:
    """[samples, seq_len] token windows from the start of `text`, cut as perplexity cuts them."""
    head = text[: spec.samples * spec.seq_len * CHARS_PER_TOKEN]
    ids = tokenizer(head, return_tensors="pt", verbose=False).input_ids[0]
    return windows_of(ids, spec.seq_len, spec.samples)


@torch.no_grad()
def diagnose(
    model: PreTrainedModel,
    ids: Tensor,
    sqnr: dict[str, float | None] | None = None,
    query_types: dict[str, Tensor] | None = None,
) -> Diagnostics:
    """Outlier figures of `model` on `ids` [samples, seq_len]; `sqnr`: per-linear SQNR
    (`layer_sqnr`, measured on the unquantized model before a cell quantizes it), recorded
    beside each linear; `query_types`: boolean masks [samples, seq_len] of queries by type
    (the first type picks the sink head), for the first-token mass per type."""
    ids = ids.to(input_device(model))
    blocks_path, layers = find_blocks(model)
    hidden: dict[int, dict[str, Any]] = {}
    spikes: dict[int, dict[str, Any]] = {}
    linears = _linears(model)
    inputs: dict[str, float] = {}
    hooks = [
        (layer, _store(hidden, i, lambda x, y: massive_activations(y)))
        for i, layer in enumerate(layers)
    ]
    hooks += [(m, _store(inputs, name, lambda x, y: kurtosis(x))) for name, m in linears.items()]
    width = model.get_input_embeddings().weight.shape[1]
    hooks += [
        (m, _store(spikes, index, _spike)) for index, m in _mlp_outputs(linears, blocks_path, width)
    ]
    with _eager_attention(model), _hooked(hooks):
        attentions = model(input_ids=ids, output_attentions=True).attentions
    sinks = [sink_mass(a, ids.shape[1], query_types) for a in attentions or ()]
    sqnr = sqnr or {}
    per_layer = [
        {"layer": i, **hidden[i], **(sinks[i] if sinks else {}), "down_proj": spikes.get(i)}
        for i in range(len(layers))
    ]
    per_linear = {
        name: {
            "input_kurtosis": inputs.get(name),
            "weight_kurtosis": _weight_kurtosis(m),
            "sqnr_db": sqnr.get(name),
        }
        for name, m in linears.items()
    }
    candidates = sorted(
        ({"layer": i, **s} for i, s in spikes.items()), key=lambda s: -s["input"] * s["output"]
    )
    details = {"layers": per_layer, "linears": per_linear, "super_weights": candidates}
    return Diagnostics(_summary(per_layer, per_linear, candidates), details)


def massive_activations(h: Tensor) -> dict[str, Any]:
    """Top-|h| values of a hidden state [b, t, d] with their (position, dim), median, ratio."""
    magnitude = h.detach().float().abs()
    peak = magnitude.amax(dim=0)  # [t, d]: the largest over samples
    values, flat = peak.flatten().topk(min(TOP, peak.numel()))
    width = peak.shape[1]
    median = magnitude.median().item()
    top = [
        {"value": v, "position": i // width, "dim": i % width}
        for v, i in zip(values.tolist(), flat.tolist(), strict=True)
    ]
    ratio = values[0].item() / median if median > 0 else None
    return {"max": top[0]["value"], "median": median, "ratio": ratio, "top": top}


def sink_mass(
    probs: Tensor, seq_len: int, query_types: dict[str, Tensor] | None = None
) -> dict[str, list[float | None]]:
    """Per head: mean attention on the first token (and on a bias slot, when the map has
    seq_len + 1 columns), over samples and queries 1..t-1; with `query_types` ({type: mask
    [samples, seq_len]}), also over each type's queries (`first_token_mass_<type>`; None for
    a type with no query)."""
    has_slot = probs.shape[-1] == seq_len + 1
    queries = probs[:, :, 1:].float()  # [b, heads, t-1, keys]
    mass = {"first_token_mass": queries[..., int(has_slot)].mean(dim=(0, 2)).tolist()}
    if has_slot:
        mass["bias_slot_mass"] = queries[..., 0].mean(dim=(0, 2)).tolist()
    for name, mask in (query_types or {}).items():
        chosen = mask[:, 1:].to(probs.device)  # [b, t-1]
        count = int(chosen.sum())
        on_first = queries[..., int(has_slot)].transpose(1, 2)[chosen]  # [count, heads]
        per_head = (on_first.sum(0) / count).tolist() if count else [None] * probs.shape[1]
        mass[f"first_token_mass_{name}"] = per_head
    return mass


def kurtosis(x: Tensor) -> float:
    """Pearson kurtosis E[(x - mean)^4] / var^2 over all elements (3 for a Gaussian)."""
    x = x.detach().double().flatten()
    centered = x - x.mean()
    variance = centered.pow(2).mean()
    return (centered.pow(4).mean() / variance.pow(2)).item() if variance > 0 else math.nan


def sqnr_db(reference: Tensor, approximation: Tensor) -> float | None:
    """10 log10(signal / noise power); None when the two are identical."""
    reference = reference.detach().double()
    noise = (reference - approximation.detach().double()).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    return 10 * math.log10(signal / noise) if noise > 0 else None


@torch.no_grad()
def layer_sqnr(
    model: PreTrainedModel, ids: Tensor, quantizer: QuantizerConfig
) -> dict[str, float | None]:
    """SQNR of every linear `quantizer` targets, on the inputs it sees in `model` (which is not
    changed: each linear's rounded output is computed beside it). Experts and routers are left
    out (no per-linear figure for 3-D weights yet)."""
    results: dict[str, float | None] = {}
    hooks = []
    for name, target in quantized_targets(inventory(model), quantizer).items():
        if isinstance(target.module, nn.Linear):
            rounded = partial(_rounded_output, target.module, quantizer)
            hooks.append(
                (target.module, _store(results, name, lambda x, y, q=rounded: sqnr_db(y, q(x))))
            )
    with _hooked(hooks):
        model(input_ids=ids.to(input_device(model)))
    return results


def _rounded_output(linear: nn.Linear, quantizer: QuantizerConfig, x: Tensor) -> Tensor:
    """The linear's output with the quantizer's weight and activation formats (round to
    nearest; None means float); an offloaded linear's weight loaded by its hook meanwhile."""
    if quantizer.activations is not None:
        x = fake_quant(x, quantizer.activations)
    with align_module_device(linear):
        weight = linear.weight
        if quantizer.weights is not None:
            weight = fake_quant(weight, quantizer.weights)
        return F.linear(x, weight, linear.bias)


def _summary(
    layers: list[dict[str, Any]], linears: dict[str, dict[str, Any]], candidates: list[dict]
) -> dict[str, Any]:
    """The leaderboard's numbers: peaks over layers, mean sink mass, extremes over linears."""
    peak = max(layers, key=lambda layer: layer["max"])
    sinks = [x for layer in layers for x in layer.get("first_token_mass", [])]
    slots = [x for layer in layers for x in layer.get("bias_slot_mass", [])]
    sqnr = [s["sqnr_db"] for s in linears.values() if s["sqnr_db"] is not None]
    best = candidates[0] if candidates else None
    return {
        "max_activation": peak["max"],
        "max_activation_layer": peak["layer"],
        "max_activation_position": peak["top"][0]["position"],
        "max_median_ratio": _max(layer["ratio"] for layer in layers),
        "first_token_mass": sum(sinks) / len(sinks) if sinks else None,
        "max_layer_first_token_mass": _max(
            _mean(layer.get("first_token_mass")) for layer in layers
        ),
        "max_head_first_token_mass": _max(iter(sinks)),
        **_sink_head(layers),
        "bias_slot_mass": sum(slots) / len(slots) if slots else None,
        "max_input_kurtosis": _max(s["input_kurtosis"] for s in linears.values()),
        "max_weight_kurtosis": _max(s["weight_kurtosis"] for s in linears.values()),
        "min_sqnr_db": min(sqnr) if sqnr else None,
        "mean_sqnr_db": sum(sqnr) / len(sqnr) if sqnr else None,
        "super_weight": [best["layer"], best["row"], best["column"]] if best else None,
    }


def _sink_head(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """With query types: the head with the largest first-token mass from the first type
    (`sink_head`: [layer, head]) and its mass from each type (`sink_mass_<type>`)."""
    types = [k for k in layers[0] if k.startswith("first_token_mass_")] if layers else []
    heads = [
        (value, i, h)
        for i, layer in enumerate(layers)
        for h, value in enumerate(layer.get(types[0], []) if types else [])
        if value is not None
    ]
    if not heads:
        return {}
    _, layer, head = max(heads)
    return {
        "sink_head": [layer, head],
        **{
            f"sink_mass_{key.removeprefix('first_token_mass_')}": layers[layer][key][head]
            for key in types
        },
    }


def _max(values: Iterator[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return max(present) if present else None


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def _spike(x: Tensor, y: Tensor) -> dict[str, Any]:
    """The down_proj input column and output row with the largest magnitudes."""
    inputs, outputs = x.detach().abs().flatten(0, -2), y.detach().abs().flatten(0, -2)
    column = int(inputs.amax(dim=0).argmax())
    row = int(outputs.amax(dim=0).argmax())
    return {
        "row": row,
        "column": column,
        "input": inputs[:, column].max().item(),
        "output": outputs[:, row].max().item(),
        "position": int(inputs[:, column].argmax()) % x.shape[-2],
    }


def _weight_kurtosis(linear: nn.Module) -> float:
    """The kurtosis of the linear's weight; an offloaded one (accelerate's cpu / disk offload,
    a meta placeholder between forwards) is loaded by its hook meanwhile."""
    with align_module_device(linear):
        return kurtosis(linear.weight)


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer, float or quantized (any module with in_features and a 2-D weight),
    except the output embedding."""
    head = model.get_output_embeddings()
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "in_features")
        and getattr(m, "weight", None) is not None
        and m.weight.dim() == 2
        and m is not head
    }


def _mlp_outputs(
    linears: dict[str, nn.Module], blocks_path: str, width: int
) -> Iterator[tuple[int, nn.Module]]:
    """(block index, linear) of each block's MLP output projection (down_proj, fc2, c_proj,
    dense_4h_to_h, a shared expert's down_proj): an MLP linear from a wider input to the
    residual width, where super weights sit (Yu et al. 2024)."""
    prefix = f"{blocks_path}."
    for name, module in linears.items():
        if not name.startswith(prefix) or path_kind(name, blocks_path) != "mlp":
            continue
        if module.out_features == width and module.in_features != width:
            yield int(name[len(prefix) :].split(".")[0]), module


Hook = tuple[nn.Module, Callable[[nn.Module, tuple[Any, ...], Any], None]]


def _store(table: dict, key: Any, measure: Callable[[Tensor | None, Tensor], Any]) -> Callable:
    """A forward hook storing measure(first positional input or None, output) in table[key]."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0] if args else None
        table[key] = measure(x, output[0] if isinstance(output, tuple) else output)

    return hook


@contextmanager
def _hooked(hooks: list[Hook]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Eager attention meanwhile (sdpa returns no attention maps), then the previous one."""
    previous = getattr(model.config, "_attn_implementation", "eager")
    eager = eager_attention(previous)  # keeps a quantized KV cache
    if previous in (None, eager):
        yield
        return
    model.set_attn_implementation(eager)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
