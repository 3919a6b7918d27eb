"""Outlier diagnostics: massive activations, attention sinks, kurtosis, super weights, SQNR.

Works on any causal LM qbench's model walk understands, unquantized or quantized: the linears
are the targets of qbench's inventory (qbench.quant.walk.inventory), the MLP output projections
(down_proj, fc2, dense_4h_to_h, a shared expert's down_proj) are the MLP targets that the traced
residual-stream structure (qbench.quant.walk.structure) finds writing the stream. `diagnostic_walk`
reads both off the unquantized model; a quantized cell reuses it (its modules keep their
names). One forward pass over a few windows of text collects the outlier figures; with a
quantizer, a pass over the unquantized model first measures every linear's quantization error.

Windows (`DiagnosticsSpec.windows`): "stream" cuts the text as perplexity does (position 0 is
wherever a window starts); "document" starts each window at the beginning of a document, with
the tokenizer's BOS token first where it has one (`bos`), as the sink literature measures the
first token.

Definitions (h is the residual stream after a decoder layer):
- massive activations: per layer, the top-3 |h| over (token position, channel), each the
  max over the probe's samples; the median |h| over all elements; ratio = top-1 / median.
  `largest_activations`: the largest of them over all layers, with (layer, position, channel).
- attention sink: per layer and head, `first_token_mass`: the attention on the first token,
  averaged over samples and over queries 1..t-1 (query 0 sees only itself); `sink_score`:
  Gu et al.'s (ICLR 2025) importance score of the first token, the same average over all
  queries 0..t-1. `sink_share_0.3` / `sink_share_0.5`: the share of all heads whose sink
  score exceeds 0.3 / 0.5 (their Sink metric, epsilon 0.3). With an attention-bias slot
  (qbench attn_kv_bias: column 0 of the map), the first token is column 1 and the slot's own
  mass is reported as `bias_slot_mass`. HF models are switched to eager attention meanwhile.
  With query types (a synthetic task's probe, qbench.data.synthetic: windows that start with
  BOS, queries split into non-trigger / trigger), the same mass per type; the sink head is the
  head with the largest mass from the first type (non-trigger: where the task rewards a no-op),
  and `sink_mass_<type>` are that head's masses (Guo et al. 2024's active-dormant head: near 1
  from non-trigger queries, low from trigger queries).
- kurtosis: Pearson's E[(x - mean)^4] / var^2 over all elements (3 for a Gaussian), of each
  linear layer's input and of each weight matrix.
- super-weight candidates (Yu et al. 2024, "The Super Weight in Large Language Models"): at each
  MLP output projection, the input channel (column) of the largest |input| and the output
  channel (row) of the largest |output|; W[row, column] is the candidate, ranked by
  |input| x |output|.
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
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import align_module_device
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qbench.errors import QBenchError
from qbench.eval.perplexity import windows_of
from qbench.eval.specs import DiagnosticsSpec
from qbench.quant.formats.fake import fake_quant
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.kvcache import eager_attention
from qbench.quant.walk.onload import input_device, offloaded_modules
from qbench.quant.walk.select import quantized_targets
from qbench.quant.walk.structure import trace_structure

if TYPE_CHECKING:
    from qbench.eval.specs import PerplexitySpec

TOP = 3  # per layer: the largest |h| entries kept
LARGEST = 10  # over all layers: the largest activations listed
SINK_THRESHOLDS = (0.3, 0.5)  # Gu et al.'s epsilon, and a majority of the attention
CHARS_PER_TOKEN = 32  # generous: the probe tokenizes only the head of the text


@dataclass(frozen=True)
class Diagnostics:
    """`summary`: a few numbers per model; `details`: per layer and per linear."""

    summary: dict[str, Any]
    details: dict[str, Any]


@dataclass(frozen=True)
class Walk:
    """Where the diagnostics look, by module name: `linears`, the inventory's targets with a
    2-D weight but lm_head (name -> kind); `mlp_writers`, per decoder block the MLP targets
    writing the residual stream; the decoder blocks' path and count; `source`, how it was
    found."""

    linears: dict[str, str]
    mlp_writers: dict[int, list[str]]
    blocks_path: str
    depth: int
    source: str


def probe_ids(
    tokenizer: PreTrainedTokenizerBase, text: PerplexitySpec, spec: DiagnosticsSpec
) -> Tensor:
    """[samples, seq_len] token windows of `text` (the eval text): from the start of its
    text, cut as perplexity cuts them, or each from the start of one of its documents.

    Raises QBenchError when the text has fewer than `samples` such windows.
    """
    if spec.windows == "document":
        return document_windows(tokenizer, text.documents(), spec)
    head = text.text()[: spec.samples * spec.seq_len * CHARS_PER_TOKEN]
    ids = tokenizer(head, return_tensors="pt", verbose=False).input_ids[0]
    return windows_of(ids, spec.seq_len, spec.samples)


def document_windows(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], spec: DiagnosticsSpec
) -> Tensor:
    """[samples, seq_len]: the first seq_len tokens of each of the first `samples` documents
    that have as many (BOS first when `spec.bos` and the tokenizer has one, else the document's
    own first token); shorter documents are skipped."""
    bos = [tokenizer.bos_token_id] if spec.bos and tokenizer.bos_token_id is not None else []
    windows = []
    for document in documents:
        head = document[: spec.seq_len * CHARS_PER_TOKEN]
        ids = bos + tokenizer(head, add_special_tokens=False, verbose=False).input_ids
        if len(ids) >= spec.seq_len:
            windows.append(ids[: spec.seq_len])
        if len(windows) == spec.samples:
            return torch.tensor(windows)
    raise QBenchError(
        f"diagnostics: only {len(windows)} of the text's {len(documents)} documents have "
        f"{spec.seq_len} tokens, fewer than samples {spec.samples}; lower seq_len or samples, "
        "or use windows: stream"
    )


@torch.no_grad()
def diagnostic_walk(model: nn.Module, ids: Tensor) -> Walk:
    """The walk of an unquantized `model`, from qbench's inventory and the structure traced on
    the first tokens of `ids` ([samples, seq_len], the probe's).

    A model with offloaded modules (accelerate's cpu / disk offload) cannot be traced (the
    trace probes copies of its norms, whose weights are meta placeholders between forwards):
    its MLP writers are then the inventory's MLP targets from a wider input to the residual
    width, and `source` says so.
    """
    if offloaded_modules(model):
        found = inventory(model)
        width = model.get_input_embeddings().weight.shape[1]
        writers: dict[int, list[str]] = {}
        for index in range(len(found.blocks)):
            for name, target in found.in_block(index).items():
                shape = target.module.weight.shape if target.experts is None else None
                if target.kind == "mlp" and shape is not None and shape[0] == width != shape[1]:
                    writers.setdefault(index, []).append(name)
        source = "inventory (offloaded modules: MLP outputs by width, no structure trace)"
    else:
        structure = trace_structure(model, ids[:2, :16].to(input_device(model)))
        found = structure.inventory
        writers = {
            block.index: [
                t.name
                for t in [*block.writers, *block.post_normed]
                if t.kind == "mlp" and t.experts is None
            ]
            for block in structure.blocks
        }
        source = "inventory and structure trace"
    linears = {
        name: target.kind
        for name, target in found.targets.items()
        if target.kind != "lm_head" and target.experts is None
    }
    writers = {i: [n for n in names if n in linears] for i, names in writers.items()}
    return Walk(
        linears,
        {i: n for i, n in writers.items() if n},
        found.blocks_path,
        len(found.blocks),
        source,
    )


def _module(model: nn.Module, name: str, inner: bool) -> nn.Module:
    """The module at `name`; with `inner`, the linear inside a wrapper for an online transform
    (rotation's HadamardInput), which sees the transformed input."""
    module = model.get_submodule(name)
    child = getattr(module, "linear", None)
    return child if inner and isinstance(child, nn.Module) else module


@torch.no_grad()
def diagnose(
    model: PreTrainedModel,
    ids: Tensor,
    sqnr: dict[str, float | None] | None = None,
    walk: Walk | None = None,
    query_types: dict[str, Tensor] | None = None,
) -> Diagnostics:
    """Outlier figures of `model` on `ids` ([samples, seq_len]); `sqnr`: per-linear SQNR
    (`layer_sqnr`, measured on the unquantized model before a cell quantizes it), recorded
    beside each linear; `walk`: the unquantized model's (`diagnostic_walk`), for a quantized
    one (default: read off `model` itself); `query_types`: boolean masks [samples, seq_len] of
    queries by type (the first type picks the sink head), for the first-token mass per type."""
    walk = walk or diagnostic_walk(model, ids)
    ids = ids.to(input_device(model))
    layers = model.get_submodule(walk.blocks_path)
    hidden: dict[int, dict[str, Any]] = {}
    spikes: dict[str, dict[str, Any]] = {}
    inputs: dict[str, float] = {}
    linears = {name: _module(model, name, inner=True) for name in walk.linears}
    hooks = [
        (layer, _store(hidden, i, lambda x, y: massive_activations(y)))
        for i, layer in enumerate(layers)
    ]
    hooks += [(m, _store(inputs, name, lambda x, y: kurtosis(x))) for name, m in linears.items()]
    writers = [name for names in walk.mlp_writers.values() for name in names]
    hooks += [(_module(model, name, inner=False), _store(spikes, name, _spike)) for name in writers]
    with _eager_attention(model), _hooked(hooks):
        attentions = model(input_ids=ids, output_attentions=True).attentions
    sinks = [sink_mass(a, ids.shape[1], query_types) for a in attentions or ()]
    candidates = _super_weights(model, walk, spikes)
    per_layer = [
        {
            "layer": i,
            **hidden[i],
            **(sinks[i] if sinks else {}),
            "down_proj": next((c for c in candidates if c["layer"] == i), None),
        }
        for i in range(walk.depth)
    ]
    per_linear = {
        name: {
            "input_kurtosis": inputs.get(name),
            "weight_kurtosis": _weight_kurtosis(m),
            "sqnr_db": (sqnr or {}).get(name),
        }
        for name, m in linears.items()
    }
    details = {
        "layers": per_layer,
        "linears": per_linear,
        "super_weights": candidates,
        "largest_activations": largest_activations(per_layer),
        "walk": walk.source,
        "windows": {
            "samples": ids.shape[0],
            "seq_len": ids.shape[1],
            "first_tokens": ids[:, 0].tolist(),
        },
    }
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
    """Per head of an attention map [b, heads, queries, keys]: the mean attention on the first
    token over samples and queries 1..t-1 (`first_token_mass`) and over every query
    (`sink_score`, Gu et al.'s), and on a bias slot (when the map has seq_len + 1 columns);
    with `query_types` ({type: mask [samples, seq_len]}), also over each type's queries
    (`first_token_mass_<type>`; None for a type with no query)."""
    has_slot = probs.shape[-1] == seq_len + 1
    first = probs[..., int(has_slot)].float()  # [b, heads, queries]
    mass = {
        "first_token_mass": first[:, :, 1:].mean(dim=(0, 2)).tolist(),
        "sink_score": first.mean(dim=(0, 2)).tolist(),
    }
    if has_slot:
        mass["bias_slot_mass"] = probs[:, :, 1:, 0].float().mean(dim=(0, 2)).tolist()
    for name, mask in (query_types or {}).items():
        chosen = mask[:, 1:].to(probs.device)  # [b, t-1]
        count = int(chosen.sum())
        on_first = first[:, :, 1:].transpose(1, 2)[chosen]  # [count, heads]
        per_head = (on_first.sum(0) / count).tolist() if count else [None] * probs.shape[1]
        mass[f"first_token_mass_{name}"] = per_head
    return mass


def sink_shares(layers: list[dict[str, Any]]) -> dict[str, float | None]:
    """{f"sink_share_{eps}": the share of all heads whose sink score exceeds eps} (Gu et al.'s
    Sink metric at each of SINK_THRESHOLDS); None without attention maps."""
    scores = [s for layer in layers for s in layer.get("sink_score", [])]
    return {
        f"sink_share_{eps}": sum(s > eps for s in scores) / len(scores) if scores else None
        for eps in SINK_THRESHOLDS
    }


def largest_activations(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LARGEST largest |h| over all layers, each with its (layer, position, channel)."""
    entries = [
        {
            "layer": layer["layer"],
            "position": t["position"],
            "channel": t["dim"],
            "value": t["value"],
        }
        for layer in layers
        for t in layer["top"]
    ]
    return sorted(entries, key=lambda e: -e["value"])[:LARGEST]


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
    """The leaderboard's numbers: peaks over layers, sink mass and shares, extremes over
    linears, the top super-weight candidate [layer, row, column]."""
    peak = max(layers, key=lambda layer: layer["max"])
    top = peak["top"][0]
    sinks = [x for layer in layers for x in layer.get("first_token_mass", [])]
    slots = [x for layer in layers for x in layer.get("bias_slot_mass", [])]
    sqnr = [s["sqnr_db"] for s in linears.values() if s["sqnr_db"] is not None]
    best = candidates[0] if candidates else None
    return {
        "max_activation": peak["max"],
        "max_activation_layer": peak["layer"],
        "max_activation_at": [peak["layer"], top["position"], top["dim"]],
        "max_activation_position": top["position"],
        "max_median_ratio": _max(layer["ratio"] for layer in layers),
        "first_token_mass": sum(sinks) / len(sinks) if sinks else None,
        "max_layer_first_token_mass": _max(
            _mean(layer.get("first_token_mass")) for layer in layers
        ),
        "max_head_first_token_mass": _max(iter(sinks)),
        **_sink_head(layers),
        **sink_shares(layers),
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
    """An MLP output projection's input column and output row of the largest magnitudes."""
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


def _super_weights(
    model: nn.Module, walk: Walk, spikes: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Super-weight candidates, largest |input| x |output| first: per block, that of its MLP
    writer with the largest product, with the weight W[row, column] itself."""
    candidates = []
    for layer, names in walk.mlp_writers.items():
        name = max(names, key=lambda n: spikes[n]["input"] * spikes[n]["output"])
        spike = spikes[name]
        linear = _module(model, name, inner=True)
        with align_module_device(linear):
            weight = linear.weight[spike["row"], spike["column"]].item()
        candidates.append({"layer": layer, "module": name, **spike, "weight": weight})
    return sorted(candidates, key=lambda c: -c["input"] * c["output"])


def _weight_kurtosis(linear: nn.Module) -> float:
    """The kurtosis of the linear's weight; an offloaded one (accelerate's cpu / disk offload,
    a meta placeholder between forwards) is loaded by its hook meanwhile."""
    with align_module_device(linear):
        return kurtosis(linear.weight)


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
