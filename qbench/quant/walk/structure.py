"""Which norm feeds which linears, and what writes the residual stream: read off the model.

Smoothing and rotation need the dataflow around the residual stream: the norms that read it
and the targets (linears, routers, experts) that read each norm's output, the targets that read
it without a norm, the targets whose outputs are added to it (writers), norms applied to a
writer's output before the add (Gemma 2/3's and OLMo 2's post-norms), and the embedding tables
that start it. `trace_structure` derives all of it from one forward pass over a few tokens,
with module hooks and a torch function mode that follows tensors through additions, scalings
and views; no table per model type. So Llama, Gemma's sandwich norms, GPT-NeoX's and Phi-2's
parallel residual, Falcon's shared LayerNorm, MoE blocks with shared experts and MLA attention
come out of the same code, and an unlisted decoder built like them works too.

What the trace does not understand becomes a `problems` entry (e.g. a block output that is not
the residual stream: a post-LN model such as OPT-350m), which transforms turn into a refusal.

`norm_spec` tells how a norm module computes, by probing a copy of it: its scale (w, or Gemma's
1 + w), whether it subtracts the mean (LayerNorm), whether it adds a bias, and which other
parameters it has (the qbench family's PreAffine and GatedNorm).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qbench.quant.walk.inventory import Inventory, Target, inventory

_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")

# How the trace follows a tensor through torch functions (by function name).
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "sub_", "__isub__"}
_SCALE = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_"}
_GATE = {"mul", "__mul__", "__rmul__"}  # a linear's output times an activation: a gated MLP
_SAME = {
    "view", "reshape", "flatten", "unflatten", "contiguous", "to", "float", "half", "bfloat16",
    "type", "type_as", "clone", "squeeze", "unsqueeze", "dropout", "__getitem__", "view_as",
    "reshape_as", "detach", "index_select",
}  # fmt: skip
_ACCUMULATE = {"index_add_", "index_add", "scatter_add_", "scatter_add"}


@dataclass(frozen=True)
class NormSpec:
    """How a norm computes y = normalize(x) * scale + bias.

    scale: "weight" (y = n * w), "one_plus_weight" (Gemma: n * (1 + w)) or None (no weight).
    centers: subtracts the mean (LayerNorm) before dividing by the deviation; else RMS.
    bias: adds a learned bias. extra: other parameters (PreAffine's pre_scale, GatedNorm's
    gate); such a norm takes part in a rotation only through its `stream_rotation` attribute.
    eps: the epsilon added to the variance.
    """

    scale: Literal["weight", "one_plus_weight"] | None
    centers: bool
    bias: bool
    extra: tuple[str, ...]
    eps: float

    def effective_scale(self, norm: nn.Module) -> torch.Tensor | None:
        """The per-channel factor the norm applies (float64), None if it has none."""
        if self.scale is None:
            return None
        weight = norm.weight.detach().double()
        return 1 + weight if self.scale == "one_plus_weight" else weight


@dataclass
class NormGroup:
    """A norm on the residual stream and the targets reading its output.

    `inner`: targets inside the norm module that read its scaled output (GatedNorm's gate).
    """

    name: str
    norm: nn.Module
    spec: NormSpec | None  # None: a norm qbench cannot classify (see `problems`)
    readers: list[Target] = field(default_factory=list)
    inner: list[Target] = field(default_factory=list)


@dataclass
class BlockStructure:
    """One decoder block's dataflow around the residual stream.

    norms: residual norms (pre-norms) with their readers; direct_readers: targets reading the
    residual stream without a norm (OLMo 2); writers: targets whose output is added to the
    stream; writer_norms: norms whose output is added to the stream (post-norms), with
    `post_normed`: the targets whose output they normalize (not writers themselves).
    """

    index: int
    norms: list[NormGroup] = field(default_factory=list)
    direct_readers: list[Target] = field(default_factory=list)
    writers: list[Target] = field(default_factory=list)
    writer_norms: list[tuple[str, nn.Module]] = field(default_factory=list)
    post_normed: list[Target] = field(default_factory=list)
    gated_pairs: list[tuple[Target, Target]] = field(default_factory=list)


@dataclass
class Structure:
    """The residual stream of a decoder: what starts it, each block, and what reads its end."""

    inventory: Inventory
    embeddings: list[tuple[str, nn.Module]]
    blocks: list[BlockStructure]
    final: NormGroup | None  # the final norm and its readers (lm_head)
    head_readers: list[Target]  # targets reading the final stream without a norm
    problems: list[str]

    @property
    def residual_norms(self) -> list[NormGroup]:
        """Every norm reading the residual stream, in order, the final one last."""
        groups = [g for block in self.blocks for g in block.norms]
        return groups + ([self.final] if self.final else [])


def probe_ids(model: nn.Module, batch: int = 2, tokens: int = 16) -> torch.Tensor:
    """[batch, tokens] fixed token ids (not from torch's global RNG) on the model's device,
    for passes that read the model's structure or check a transform."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    return ids.to(model.get_input_embeddings().weight.device)


def is_norm(module: nn.Module) -> bool:
    """A normalization module: its class name says norm and its own parameters are 1-D."""
    own = list(module.parameters(recurse=False))
    return bool(_NORM_CLASS.search(type(module).__name__)) and all(p.dim() == 1 for p in own)


@torch.no_grad()
def norm_spec(norm: nn.Module) -> NormSpec | None:
    """How `norm` computes (see NormSpec), probed on a float64 copy; None if it is neither an
    RMSNorm nor a LayerNorm with a weight w or 1 + w and an optional bias."""
    own = dict(norm.named_parameters(recurse=False))
    extra = tuple(n for n, _ in norm.named_parameters() if n not in ("weight", "bias"))
    eps = next((float(getattr(norm, a)) for a in EPS_ATTRIBUTES if hasattr(norm, a)), 1e-6)
    if extra:  # a norm with more than a weight: its own protocol (stream_rotation)
        scale = "weight" if "weight" in own else None
        return NormSpec(scale, False, "bias" in own, extra, eps)
    width = own["weight"].shape[0] if "weight" in own else 64
    probe = copy.deepcopy(norm).to(device="cpu", dtype=torch.float64)
    x = 100 * torch.randn(3, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    centered = x - x.mean(-1, keepdim=True)
    rms = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    layer = centered / centered.pow(2).mean(-1, keepdim=True).sqrt()
    for p in probe.parameters():
        p.zero_()
    y = probe(x)
    scale = None
    if "weight" in own:
        scale = "weight" if torch.allclose(y, torch.zeros_like(y)) else "one_plus_weight"
        if scale == "weight":
            probe.weight.fill_(1)
            y = probe(x)
    if "bias" in own:
        shift = torch.linspace(-1, 1, width, dtype=torch.float64)
        probe.bias.copy_(shift)
        if not torch.allclose(probe(x) - y, shift.expand_as(y), atol=1e-6):
            return None
    for centers, expected in ((False, rms), (True, layer)):
        if torch.allclose(y, expected, atol=1e-4, rtol=1e-4):
            return NormSpec(scale, centers, "bias" in own, (), eps)
    return None


# ---------------------------------------------------------------- the trace


@dataclass
class _State:
    """What the trace knows of one tensor."""

    sources: frozenset[str] = frozenset()  # targets / embeddings whose output it sums
    residual: bool = False  # it is the residual stream
    norm: str | None = None  # it is this norm's output (or a view of it)
    gated: frozenset[str] = frozenset()  # targets whose output it is times a gate, elementwise
    taint: frozenset[str] = frozenset()  # targets it was computed from through nonlinear ops


@dataclass
class _Trace:
    """Observations of one traced forward pass."""

    states: dict[int, _State] = field(default_factory=dict)
    alive: list[torch.Tensor] = field(default_factory=list)  # keeps ids unique during the trace
    block: int | None = None  # the block running now
    after_blocks: bool = False
    reads: dict[str, _State] = field(default_factory=dict)  # target/norm -> its input's state
    read_in_block: dict[str, int | None] = field(default_factory=dict)
    adds: list[tuple[int | None, _State]] = field(default_factory=list)  # (block, operand)
    stream_start: _State | None = None
    block_outputs: list[bool] = field(default_factory=list)  # block output is the stream

    def state(self, x: Any) -> _State | None:
        return self.states.get(id(x)) if isinstance(x, torch.Tensor) else None

    def set(self, x: Any, state: _State) -> None:
        if isinstance(x, torch.Tensor):
            self.states[id(x)] = state
            self.alive.append(x)


class _Follow(TorchFunctionMode):
    """Propagates `_State` through additions, scalings by scalars, views and accumulations."""

    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._propagate(getattr(func, "__name__", ""), args, out)
        return out

    def _propagate(self, name: str, args: tuple, out: Any) -> None:
        trace = self.trace
        first = trace.state(args[0]) if args else None
        second = trace.state(args[1]) if len(args) > 1 else None
        if name in _ADD and len(args) > 1:
            self._add(args, first, second, out)
            return
        new = None
        if name in _SCALE and len(args) > 1:
            if _scalar_like(args[1], args[0]):
                new = first
            elif _scalar_like(args[0], args[1]):
                new = second
            elif name in _GATE:
                new = _gated(first, second)
        elif name in _SAME:
            new = first
        elif name in _ACCUMULATE and first is not None:
            source = trace.state(args[3]) if len(args) > 3 else None
            new = _State(first.sources | (source.sources if source else frozenset()))
        if new is None:  # a nonlinear op: the result is computed from its inputs' sources
            states = [trace.state(a) for a in args]
            taint = frozenset().union(*(t.sources | t.taint for t in states if t is not None))
            new = _State(taint=taint) if taint else None
        for item in out if isinstance(out, tuple | list) else (out,):
            if new is not None or trace.state(item) is not None:  # clears in-place results
                trace.set(item, new or _State())

    def _add(self, args: tuple, first: _State | None, second: _State | None, out: Any) -> None:
        trace = self.trace
        if (first and first.residual) or (second and second.residual):
            operand = second if first and first.residual else first
            other = args[1] if first and first.residual else args[0]
            if isinstance(other, torch.Tensor):
                trace.adds.append((trace.block, operand or _State()))
            trace.set(out, _State(residual=True))
            return
        states = [x for x in (first, second) if x is not None]
        sources = frozenset().union(*(x.sources for x in states))
        trace.set(out, _State(sources, taint=frozenset().union(*(x.taint for x in states))))


def _gated(first: _State | None, second: _State | None) -> _State | None:
    """The product of one linear's output and a gate computed from other tensors (not from that
    linear: x * gelu'(x) is an activation, not a gate): gated by that linear."""
    states = [first or _State(), second or _State()]
    for state, other in (states, states[::-1]):
        if len(state.sources) == 1 and not other.sources and not state.sources & other.taint:
            return _State(gated=state.sources)
    return None


def _scalar_like(x: Any, other: Any) -> bool:
    """x scales `other` uniformly over its last (channel) dimension."""
    if not isinstance(x, torch.Tensor):
        return isinstance(x, int | float)
    return x.numel() == 1 or (
        isinstance(other, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == 1 < other.shape[-1]
    )


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@torch.no_grad()
def trace_structure(model: nn.Module, ids: torch.Tensor) -> Structure:
    """Derive the residual-stream structure of `model` from one forward pass over `ids`
    ([batch, tokens] token ids; a few short rows suffice). The model is not changed."""
    inv = inventory(model)
    trace = _Trace()
    norms = {n: m for n, m in model.named_modules() if is_norm(m)}
    with ExitStack() as stack:
        for hook in _hooks(model, inv, norms, trace):
            stack.callback(hook.remove)
        with _Follow(trace):
            model(input_ids=ids.to(next(model.parameters()).device))
    return _derive(model, inv, norms, trace)


def _hooks(
    model: nn.Module, inv: Inventory, norms: dict[str, nn.Module], trace: _Trace
) -> Iterator[torch.utils.hooks.RemovableHandle]:
    def reader(name: str):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            state = trace.state(x)
            trace.reads[name] = state or _State()
            trace.read_in_block[name] = trace.block

        return pre

    def produced(state_of: Any):
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            trace.set(_first_tensor(output), state_of())

        return post

    for name, target in inv.targets.items():
        yield target.module.register_forward_pre_hook(reader(name), with_kwargs=True)
        yield target.module.register_forward_hook(produced(lambda n=name: _State(frozenset({n}))))
    for name, norm in norms.items():
        yield norm.register_forward_pre_hook(reader(name), with_kwargs=True)
        yield norm.register_forward_hook(produced(lambda n=name: _State(norm=n)))
    for name, table in inv.embeddings.items():
        yield table.register_forward_hook(produced(lambda n=name: _State(frozenset({n}))))
    for index, block in enumerate(inv.blocks):
        yield block.register_forward_pre_hook(_block_start(trace, index), with_kwargs=True)
        yield block.register_forward_hook(_block_end(trace, index == len(inv.blocks) - 1))


def _block_start(trace: _Trace, index: int):
    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if index == 0:
            trace.stream_start = trace.state(x) or _State()
        trace.block = index
        trace.set(x, _State(residual=True))

    return pre


def _block_end(trace: _Trace, last: bool):
    def post(module: nn.Module, args: tuple, output: Any) -> None:
        out = _first_tensor(output)
        state = trace.state(out)
        trace.block_outputs.append(bool(state and state.residual))
        trace.set(out, _State(residual=True))
        trace.block = None
        trace.after_blocks = last

    return post


def _derive(
    model: nn.Module, inv: Inventory, norms: dict[str, nn.Module], trace: _Trace
) -> Structure:
    problems: list[str] = []
    if not all(trace.block_outputs):
        problems.append(
            "a decoder block's output is not the residual stream plus its branches (a norm "
            "after the residual addition: post-LN, as OPT-350m)"
        )
    blocks = [BlockStructure(i) for i in range(len(inv.blocks))]
    specs = {name: norm_spec(norm) for name, norm in norms.items()}
    groups = {
        name: NormGroup(name, norms[name], specs[name])
        for name, state in trace.reads.items()
        if name in norms and state.residual
    }
    final = None
    for name, group in groups.items():
        index = trace.read_in_block.get(name)
        if index is None:
            final = group
        else:
            blocks[index].norms.append(group)
        if group.spec is None:
            problems.append(
                f"norm {name} ({type(group.norm).__name__}) computes neither an RMSNorm nor a "
                "LayerNorm with a per-channel weight and bias"
            )
    head_readers = []
    for name, target in inv.targets.items():
        state, index = trace.reads.get(name), trace.read_in_block.get(name)
        if state is None:
            continue
        inside = next((g for n, g in groups.items() if name.startswith(f"{n}.")), None)
        if inside is not None:  # inside the norm: a reader of its normalized width (GatedNorm)
            width = getattr(inside.norm, "weight", None)
            if width is not None and target.input_widths().get("weight") == width.shape[0]:
                inside.inner.append(target)
        elif state.norm in groups:
            groups[state.norm].readers.append(target)
        elif state.residual and index is not None:
            blocks[index].direct_readers.append(target)
        elif state.gated and index is not None and isinstance(target.module, nn.Linear):
            (producer,) = state.gated
            if isinstance(inv.targets.get(producer, target).module, nn.Linear):
                blocks[index].gated_pairs.append((inv.targets[producer], target))
        elif state.residual:
            head_readers.append(target)
    for index, operand in trace.adds:
        if index is None:
            continue
        if operand.norm is not None:
            norm_input = trace.reads.get(operand.norm, _State())
            blocks[index].writer_norms.append((operand.norm, norms[operand.norm]))
            producers = [inv.targets[s] for s in norm_input.sources if s in inv.targets]
            blocks[index].post_normed += producers
            unknown = not norm_input.sources
        else:
            blocks[index].writers += [inv.targets[s] for s in operand.sources if s in inv.targets]
            unknown = not operand.sources or any(s not in inv.targets for s in operand.sources)
        if unknown:
            problems.append(
                f"block {index} adds to the residual stream a tensor that is not a linear's or "
                "a norm's output (the trace cannot follow it)"
            )
    start = trace.stream_start or _State()
    embeddings = [(n, inv.embeddings[n]) for n in sorted(start.sources) if n in inv.embeddings]
    if not embeddings or len(embeddings) != len(start.sources):
        problems.append("the residual stream does not start as a sum of embedding tables")
    for block in blocks:  # a target reached twice through views is listed once
        block.writers = _unique(block.writers)
        block.post_normed = _unique(block.post_normed)
    return Structure(inv, embeddings, blocks, final, head_readers, problems)


def _unique(targets: list[Target]) -> list[Target]:
    return list({t.name: t for t in targets}.values())
