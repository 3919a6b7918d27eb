"""The one inventory of quantization targets: every linear-like weight of a decoder, by kind.

Every method, backend, diagnostic and coverage count walks a model through `inventory(model)`.
A target is one module holding weights that multiply activations:

- `nn.Linear` and qbench's rounded linears (`QuantLinear`: a quantized model reads as its
  float one did; transformers' `Conv1D`, GPT-2's [in, out] linear, is turned into an `nn.Linear`
  once at load time by `linear_conv1d`, a lossless change, so there is one layout to round);
  fused projections (qkv_proj, gate_up_proj, query_key_value, c_attn) are linears like others;
- experts held as one module with 3-D tensors (transformers' `@use_experts_implementation`
  classes: `gate_up_proj` or `up_proj` [experts, out, in] and `down_proj`, or [experts, in, out]
  when `is_transposed`; without that flag, as Llama 4's experts (x @ W[e]), the one layout in
  which the shapes chain: gate/up's output is twice down's input, down's output gate/up's
  input), and experts held as a ModuleList of linears (plain linears of kind "experts");
- routers: the MoE gate that scores experts (an `nn.Linear`, or a module of its own holding a
  2-D `weight` used as `F.linear`), and a shared expert's scalar gate;
- the depthwise `nn.Conv1d` of a state-space mixer (Mamba, Mamba-2 and their hybrids: Jamba,
  Bamba, Falcon-H1, Granite 4, Nemotron-H) or short-convolution block: weight [channels, 1,
  taps], read as one [channels, taps] matrix (one row per channel).

Kinds: attention (under the decoder block's attention module, by attribute or class name;
MLA's low-rank projections included), ssm (the projections of a state-space mixer: a module
holding `A_log`, Mamba's log state matrix), mlp (dense MLPs and shared experts), experts,
router, conv (the depthwise conv1d), norm (linears inside a norm module: the qbench family's
GatedNorm), lm_head, and other (linears outside the decoder blocks other than lm_head).
Embedding tables (kind embeddings) are counted beside them. A state-space mixer's other
parameters (`A_log`, `D`, `dt_bias`: the recurrence's state matrix, skip and step bias, used
elementwise) and its norms are no matmul weights: they stay in float, as norms do.

Modules whose weights qbench cannot round (3-D parameters outside a known experts layout,
convolutions other than depthwise 1-D ones, 2-D weights of unknown modules inside a block) are
listed in `Inventory.unsupported`, so a method refuses at plan time instead of leaving them in
float under a quantized label.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qbench.errors import QBenchError
from qbench.quant.walk.select import Kind

ROUNDING_ATTRIBUTE = "qbench_rounding"  # what a rounded module holds (qbench.quant.walk.linear)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SSM_STATE = "A_log"  # the parameter that makes a module a state-space mixer (Mamba's name)
_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)


@dataclass(frozen=True)
class ExpertsLayout:
    """Where an experts module keeps its 3-D weights (transformers' experts convention).

    `readers`: the parameters multiplying the experts' input (`gate_up_proj`, or `up_proj`
    where the experts have no gate); `writers`: `down_proj`. `transposed`: stored
    [experts, in, out] (multiplied as x @ W[e]) instead of [experts, out, in] (F.linear).
    """

    readers: tuple[str, ...]
    writers: tuple[str, ...]
    transposed: bool

    @property
    def parameters(self) -> tuple[str, ...]:
        return (*self.readers, *self.writers)


@dataclass(frozen=True)
class Target:
    """One linear-like weight holder: `module` at dotted path `name`, of `kind`.

    `experts` is set for a module holding 3-D expert weights; otherwise the module is an
    `nn.Linear` (after `linear_conv1d`), a router whose 2-D `weight` [out, in] is applied as
    `F.linear` by its own forward, or a depthwise `nn.Conv1d` (kind conv) whose weight
    [channels, 1, taps] reads as [channels, taps].
    """

    name: str
    module: nn.Module
    kind: Kind
    experts: ExpertsLayout | None = None

    def matrices(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(label, [out, in] view) of every weight matrix; writes through the view change it."""
        if self.experts is None:
            weight = self.module.weight
            yield "weight", weight.flatten(1) if weight.dim() == 3 else weight  # conv: a view
            return
        for param in self.experts.parameters:
            weight = getattr(self.module, param)
            for e in range(weight.shape[0]):
                yield f"{param}[{e}]", weight[e].T if self.experts.transposed else weight[e]

    def input_matrices(self) -> list[tuple[str, torch.Tensor]]:
        """The [out, in] views multiplying the target's input (experts: gate/up slices)."""
        return [(n, m) for n, m in self.matrices() if self._role(n, "readers")]

    def output_matrices(self) -> list[tuple[str, torch.Tensor]]:
        """The [out, in] views producing the target's output (experts: down slices)."""
        return [(n, m) for n, m in self.matrices() if self._role(n, "writers")]

    def _role(self, label: str, role: str) -> bool:
        return self.experts is None or label.split("[")[0] in getattr(self.experts, role)

    @property
    def replaceable(self) -> bool:
        """An nn.Linear that another linear module (QuantLinear, a library's) can stand in
        for: not a router whose class has its own forward (Llama 4's returns scores and
        logits), which is rounded in place instead."""
        module = self.module
        own_forward = type(module).forward is not nn.Linear.forward
        return isinstance(module, nn.Linear) and not (self.kind == "router" and own_forward)

    @property
    def numel(self) -> int:
        """Weight elements (biases not counted)."""
        return sum(m.numel() for _, m in self.matrices())

    def input_widths(self) -> dict[str, int]:
        """{parameter: input width} (group sizes and block formats must divide each)."""
        if self.experts is None:
            return {label: matrix.shape[1] for label, matrix in self.matrices()}
        dim = 1 if self.experts.transposed else 2
        return {p: getattr(self.module, p).shape[dim] for p in self.experts.parameters}


@dataclass
class Inventory:
    """The targets of one model, its blocks and embeddings, and what qbench cannot round."""

    targets: dict[str, Target]
    embeddings: dict[str, nn.Embedding]
    blocks_path: str
    blocks: nn.ModuleList
    unsupported: dict[str, str] = field(default_factory=dict)  # module path -> why

    def of_kind(self, *kinds: Kind) -> dict[str, Target]:
        return {n: t for n, t in self.targets.items() if t.kind in kinds}

    def in_block(self, index: int) -> dict[str, Target]:
        """The targets inside decoder block `index`."""
        prefix = f"{self.block_path(index)}."
        return {n: t for n, t in self.targets.items() if n.startswith(prefix)}

    def block_path(self, index: int) -> str:
        """The dotted path of decoder block `index` (e.g. model.layers.3)."""
        return f"{self.blocks_path}.{index}"

    def outside_blocks(self, targets: dict[str, Target]) -> dict[str, Target]:
        """The targets of `targets` outside the decoder blocks (lm_head, others)."""
        inside = f"{self.blocks_path}." if self.blocks_path else None
        return {n: t for n, t in targets.items() if inside is None or not n.startswith(inside)}

    def sizes(self) -> dict[str, tuple[Kind, int]]:
        """{target: (kind, weight elements)}, counted now (a quantizer may free the weights)."""
        return {name: (t.kind, t.numel) for name, t in self.targets.items()}


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of an experts module holding 3-D `gate_up_proj` (or `up_proj` where
    `has_gate` is false) and `down_proj`, else None: as its `is_transposed` flag says
    (transformers' `@use_experts_implementation`), or without one (Llama 4) the one layout in
    which the shapes chain; None where both would (no gate, the flag missing)."""
    readers = ("gate_up_proj",) if getattr(module, "has_gate", True) else ("up_proj",)
    weights = [getattr(module, p, None) for p in (*readers, "down_proj")]
    if not all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights):
        return None
    if hasattr(module, "is_transposed"):
        return ExpertsLayout(readers, ("down_proj",), bool(module.is_transposed))
    reader, down = weights
    gate = 2 if readers == ("gate_up_proj",) else 1  # gate and up side by side
    chain = [t for t in (False, True) if _chains(reader, down, gate, t)]
    return ExpertsLayout(readers, ("down_proj",), chain[0]) if len(chain) == 1 else None


def _chains(reader: torch.Tensor, down: torch.Tensor, gate: int, transposed: bool) -> bool:
    """Whether experts stored [experts, in, out] (`transposed`) or [experts, out, in] make one
    MLP: down's output width is the reader's input width, the reader's output `gate` times
    down's input width."""
    (r_out, r_in), (d_out, d_in) = (
        (w.shape[2], w.shape[1]) if transposed else (w.shape[1], w.shape[2]) for w in (reader, down)
    )
    return r_in == d_out and r_out == gate * d_in


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder blocks (model.layers, transformer.h, gpt_neox.layers,
    decoder.layers, ...): the largest ModuleList of `num_hidden_layers` modules that all hold
    parameters, whatever their classes (Jamba's, Bamba's and Nemotron-H's blocks are attention
    or Mamba blocks); without that number, the largest such list of one class.

    Raises QBenchError when the model has no such list.
    """
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(any(True for _ in m.parameters()) for m in module)
    ]
    matching = [c for c in candidates if len(c[1]) == depth] or [
        c for c in candidates if len({type(m) for m in c[1]}) == 1
    ]
    if not matching:
        raise QBenchError(f"{type(model).__name__} has no list of decoder blocks")
    return max(matching, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def linear_conv1d(model: nn.Module) -> int:
    """Replace every transformers Conv1D (weight [in, out]) by the equal nn.Linear (weight
    [out, in]), in place; the number replaced. The output changes by float rounding only
    (addmm and F.linear sum in another order). An offloaded Conv1D is onloaded meanwhile and
    its Linear offloaded after (qbench.quant.walk.onload)."""
    from qbench.quant.walk.onload import onloaded

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        with onloaded(model, name):
            weight = conv.weight.detach().T.contiguous()
            linear = nn.Linear(conv.nx, conv.nf, device="meta")
            linear.weight = nn.Parameter(weight, conv.weight.requires_grad)
            linear.bias = conv.bias
            replace_module(model, name, linear)
    return len(found)


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The dotted path of `module` inside `model` (ValueError if it is not there)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a module of {type(model).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def inventory(model: nn.Module) -> Inventory:
    """Every quantization target of `model`, with its kind (see the module docstring)."""
    try:
        blocks_path, blocks = find_blocks(model)
    except QBenchError:  # not a decoder: every linear is a target of kind "other"
        blocks_path, blocks = "", nn.ModuleList()
    heads = getattr(model, "get_output_embeddings", None)
    lm_head = heads() if heads is not None else None
    experts = _expert_count(getattr(model, "config", None))
    targets: dict[str, Target] = {}
    unsupported: dict[str, str] = {}
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(f"{s}.") for s in skip):
            continue
        in_block = bool(blocks_path) and name.startswith(f"{blocks_path}.")
        kind = _kind(model, name, module, blocks_path, experts) if in_block else None
        if module is lm_head:
            targets[name] = Target(name, module, "lm_head")
        elif (layout := experts_layout(module)) is not None:
            targets[name] = Target(name, module, "experts", layout)
            skip.add(name)
        elif isinstance(module, nn.Linear) or _rounded_linear(module):
            targets[name] = Target(name, module, kind or "other")
        elif in_block and _is_depthwise_conv(module):
            targets[name] = Target(name, module, "conv")
        elif in_block and _is_router(module, name, experts):
            targets[name] = Target(name, module, "router")
        elif in_block and (why := _unsupported(module)):
            unsupported[name] = why
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return Inventory(targets, embeddings, blocks_path, blocks, unsupported)


def _is_depthwise_conv(module: nn.Module) -> bool:
    """A depthwise 1-D convolution (one filter per channel: Mamba's conv1d), or one qbench
    rounded (it keeps its class)."""
    return (
        isinstance(module, nn.Conv1d)
        and module.groups == module.in_channels == module.out_channels
        and module.weight.shape[1] == 1
    )


def _rounded_linear(module: nn.Module) -> bool:
    """A linear qbench rounded (QuantLinear: a 2-D weight applied as F.linear), a target of the
    kind it was, so the inventory reads a quantized model as it read the float one."""
    weight = getattr(module, "weight", None)
    rounded = hasattr(module, ROUNDING_ATTRIBUTE) and not isinstance(module, nn.Embedding)
    return rounded and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _expert_count(config: PretrainedConfig | None) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((getattr(config, f) for f in EXPERT_COUNT_FIELDS if getattr(config, f, None)), None)


def _kind(model: nn.Module, name: str, module: nn.Module, blocks: str, experts: int | None) -> Kind:
    """The kind of a linear inside decoder block `blocks`.<i> (see the module docstring)."""
    if _is_router(module, name, experts):
        return "router"
    parts = name.split(".")
    first = len(blocks.split(".")) + 1 if blocks else 0  # the first module below the block
    owners = [model.get_submodule(".".join(parts[:i])) for i in range(first + 1, len(parts))]
    return path_kind(name, blocks, owners)


def path_kind(name: str, blocks: str, owners: list[nn.Module] | None = None) -> Kind:
    """The kind of a linear at dotted path `name` inside decoder block `blocks`.<i>, from the
    modules between block and linear: their attribute names and, given `owners` (those
    modules), their classes and parameters: norm, ssm (a module holding `A_log`), attention,
    experts, else mlp (routers are told apart by shape)."""
    path = name[len(blocks) + 1 :].split(".")[1:-1]  # the modules between block and linear
    classes = [type(m).__name__ for m in owners or ()]
    if any(_NORM_NAME.search(p) for p in path):
        return "norm"
    if any(SSM_STATE in dict(m.named_parameters(recurse=False)) for m in owners or ()):
        return "ssm"
    if any(_ATTENTION_NAME.search(p) for p in [*path, *classes]):
        return "attention"
    if "experts" in path:
        return "experts"
    return "mlp"


def _is_router(module: nn.Module, name: str, experts: int | None) -> bool:
    """An MoE router (one output per expert) or a shared expert's scalar gate."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or experts is None:
        return False
    last = name.rsplit(".", 1)[-1]
    gate_like = "router" in last or last == "gate" or last.endswith("_gate")
    return gate_like and weight.shape[0] in (experts, 1)


def _unsupported(module: nn.Module) -> str | None:
    """Why a module's own weights cannot be rounded by qbench, if it holds any it cannot."""
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.Embedding | nn.Linear) or not own:
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return (
            f"{type(module).__name__} ({module.groups} groups) is a convolution; qbench rounds "
            "depthwise Conv1d only"
        )
    big = [n for n, p in own.items() if p.dim() >= 3]
    if big:
        return (
            f"{type(module).__name__} holds {', '.join(big)} as 3-D tensors outside transformers' "
            "experts layout (@use_experts_implementation)"
        )
    weight = own.get("weight")
    if weight is not None and weight.dim() == 2:
        return f"{type(module).__name__} applies its own 2-D weight in a way qbench does not know"
    return None


def set_weight(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` (any float dtype) into the tensor in place, in the tensor's dtype."""
    target.copy_(value.to(target.dtype))


ROW_CHUNK = 1 << 22  # float64 elements (32 MiB) `set_rows` changes at a time


def rows_per_chunk(matrix: torch.Tensor) -> int:
    """How many rows (slices along dim 0) of `matrix` hold about ROW_CHUNK elements."""
    return max(1, ROW_CHUNK // max(1, matrix[0].numel()))


def set_rows(matrix: torch.Tensor, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """matrix <- change(matrix in float64) in place, `change` applied to chunks of rows of
    about ROW_CHUNK elements: it must act on each row alone (e.g. along the last dimension).
    The float64 copies and the change's temporaries then stay that small whatever the matrix
    (an embedding table, lm_head, a 7B model's down_proj) instead of a few times its size."""
    for chunk in matrix.split(rows_per_chunk(matrix)):
        set_weight(chunk, change(chunk.double()))
