"""The one inventory of quantization targets: every linear-like weight of a decoder, by kind.

Every method, backend, diagnostic and coverage count walks a model through `inventory(model)`.
A target is one module holding weights that multiply activations:

- `nn.Linear` and qbench's rounded linears (`QuantLinear`: a quantized model reads as its
  float one did; transformers' `Conv1D`, GPT-2's [in, out] linear, is turned into an `nn.Linear`
  once at load time by `linear_conv1d`, a lossless change, so there is one layout to round);
  fused projections (qkv_proj, gate_up_proj, query_key_value, c_attn) are linears like others;
- experts held as one module with 3-D tensors (transformers' `@use_experts_implementation`
  classes: `gate_up_proj` or `up_proj` [experts, out, in] and `down_proj`, or [experts, in, out]
  when `is_transposed`), and experts held as a ModuleList of linears (plain linears of kind
  "experts");
- routers: the MoE gate that scores experts (an `nn.Linear`, or a module of its own holding a
  2-D `weight` used as `F.linear`), and a shared expert's scalar gate.

Kinds: attention (under the decoder block's attention module; MLA's low-rank projections
included), mlp (dense MLPs and shared experts), experts, router, norm (linears inside a norm
module: the qbench family's GatedNorm), lm_head, and other (linears outside the decoder blocks
other than lm_head). Embedding tables (kind embeddings) are counted beside them.

Modules whose weights qbench cannot round (3-D parameters outside a known experts layout, 2-D
weights of unknown modules inside a block) are listed in `Inventory.unsupported`, so a method
refuses at plan time instead of leaving them in float under a quantized label.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qbench.errors import QBenchError
from qbench.quant.walk.select import Kind

ROUNDING_ATTRIBUTE = "qbench_rounding"  # what a rounded module holds (qbench.quant.walk.linear)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
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
    `nn.Linear` (after `linear_conv1d`) or a router whose 2-D `weight` [out, in] is applied as
    `F.linear` by its own forward.
    """

    name: str
    module: nn.Module
    kind: Kind
    experts: ExpertsLayout | None = None

    def matrices(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(label, [out, in] view) of every weight matrix; writes through the view change it."""
        if self.experts is None:
            yield "weight", self.module.weight
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
    def numel(self) -> int:
        """Weight elements (biases not counted)."""
        return sum(m.numel() for _, m in self.matrices())

    def input_widths(self) -> dict[str, int]:
        """{parameter: input width} (group sizes and block formats must divide each)."""
        if self.experts is None:
            return {"weight": self.module.weight.shape[1]}
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
        prefix = f"{self.blocks_path}.{index}."
        return {n: t for n, t in self.targets.items() if n.startswith(prefix)}

    def sizes(self) -> dict[str, tuple[Kind, int]]:
        """{target: (kind, weight elements)}, counted now (a quantizer may free the weights)."""
        return {name: (t.kind, t.numel) for name, t in self.targets.items()}


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers experts module (`@use_experts_implementation`), else None."""
    if not hasattr(module, "is_transposed") or not isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    ):
        return None
    readers = ("gate_up_proj",) if getattr(module, "has_gate", True) else ("up_proj",)
    if not all(isinstance(getattr(module, p, None), nn.Parameter) for p in readers):
        return None
    return ExpertsLayout(readers, ("down_proj",), bool(module.is_transposed))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder blocks: the ModuleList of `num_hidden_layers` modules of one
    class holding parameters (model.layers, transformer.h, gpt_neox.layers, decoder.layers, ...).

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
        and len({type(m) for m in module}) == 1
        and any(True for _ in module[0].parameters())
    ]
    matching = [c for c in candidates if len(c[1]) == depth] or candidates
    if not matching:
        raise QBenchError(f"{type(model).__name__} has no list of decoder blocks")
    return max(matching, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def linear_conv1d(model: nn.Module) -> int:
    """Replace every transformers Conv1D (weight [in, out]) by the equal nn.Linear (weight
    [out, in]), in place; the number replaced. The output changes by float rounding only
    (addmm and F.linear sum in another order)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in found:
        linear = nn.Linear(conv.nx, conv.nf, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().T.contiguous(), conv.weight.requires_grad)
        linear.bias = conv.bias
        replace_module(model, name, linear)
    return len(found)


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
        kind = _kind(name, module, blocks_path, experts) if in_block else None
        if module is lm_head:
            targets[name] = Target(name, module, "lm_head")
        elif (layout := experts_layout(module)) is not None:
            targets[name] = Target(name, module, "experts", layout)
            skip.add(name)
        elif isinstance(module, nn.Linear) or _rounded_linear(module):
            targets[name] = Target(name, module, kind or "other")
        elif in_block and _is_router(module, name, experts):
            targets[name] = Target(name, module, "router")
        elif in_block and (why := _unsupported(module)):
            unsupported[name] = why
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return Inventory(targets, embeddings, blocks_path, blocks, unsupported)


def _rounded_linear(module: nn.Module) -> bool:
    """A linear qbench rounded (QuantLinear: a 2-D weight applied as F.linear), a target of the
    kind it was, so the inventory reads a quantized model as it read the float one."""
    weight = getattr(module, "weight", None)
    rounded = hasattr(module, ROUNDING_ATTRIBUTE) and not isinstance(module, nn.Embedding)
    return rounded and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _expert_count(config: PretrainedConfig | None) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((getattr(config, f) for f in EXPERT_COUNT_FIELDS if getattr(config, f, None)), None)


def _kind(name: str, module: nn.Module, blocks: str, experts: int | None) -> Kind:
    """The kind of a linear inside decoder block `blocks`.<i> (see the module docstring)."""
    if _is_router(module, name, experts):
        return "router"
    return path_kind(name, blocks)


def path_kind(name: str, blocks: str) -> Kind:
    """The kind of a linear at dotted path `name` inside decoder block `blocks`.<i>, from the
    modules above it: norm, attention, experts, else mlp (routers are told apart by shape)."""
    owners = name[len(blocks) + 1 :].split(".")[1:-1]  # the modules between block and linear
    if any(_NORM_NAME.search(p) for p in owners):
        return "norm"
    if any(_ATTENTION_NAME.search(p) for p in owners):
        return "attention"
    if "experts" in owners:
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
