"""AWQ: activation-aware per-channel scaling with a grid search, then an optional clip search
(its step: qbench.quant.steps.awq).

As the AWQ paper (Lin et al. 2024, arxiv 2306.00978), its reference code (mit-han-lab/llm-awq:
awq/quantize/auto_scale.py, auto_clip.py) and llm-compressor's AWQ modifier describe it, block
by block on cached calibration inputs (qbench.quant.blockwise):

1. Scales. For each group of targets sharing an input, with x_mean the mean |x| per input
   channel over the calibration tokens: for ratio r in {0, 1/grid, ..., (grid-1)/grid},
   s = x_mean^r (clamped at 1e-4, then divided by sqrt(max(s) min(s))) (with `duo_scaling`,
   s = x_mean^r / w_mean^(1-r), llm-compressor's option, w_mean the mean of |W| / max|W| per
   group over the readers' columns); the readers' weights become Q(W diag(s)) diag(s)^-1 with Q
   the recipe's weight quantizer, and the ratio with the smallest mean squared error of the
   inspected module's output against its float output wins. The inspected module is the
   reference's module2inspect: the smallest submodule of the block holding every reader (its
   parent where that is one reader), e.g. self_attn for q/k/v and for a fused qkv, mlp for
   gate/up and for down; the block itself where the readers span it (a parallel block) or
   where one reader sits directly under it (OPT's fc1, which llm-awq judges by fc1 alone). A
   grid point runs the block on its calibration inputs only up to the inspected module's last
   call, the modules before the readers replaying their recorded outputs, so it runs what the
   group feeds.
   Then the input's producer takes 1/s and the readers' columns s, a float-lossless change:
   - a residual norm and its readers (attention inputs; MLP or experts' inputs, the router
     taking the scales without setting them), as every AWQ mapping starts;
   - a gated MLP's up projection (rows / s) and its down projection (columns * s), found in
     the traced structure (qbench.quant.structure's gated_pairs).
   The reference's v_proj -> o_proj scaling (which it skips under grouped-query attention) is
   not applied: attention's value path is not traced.
2. Clip (`clip: true`, the reference's auto_clip): for every linear of the block but those whose
   name holds "q_" or "k_" (the reference's rule: their error passes through QK^T), per output
   channel and weight group, the largest |w| kept in {1, 1 - 1/grid, ..., 1 - max_shrink} that
   minimizes the mean squared error of the group's contribution on up to 512 sampled tokens;
   weights are clamped to it. This changes the float model (the transformed stage shows it).
Expert weights held as 3-D tensors take the norm scaling (their gate/up slices), not the clip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qbench.errors import QBenchError
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.methods.folding import (
    lossless_tolerance,
    relative_error,
    scale_norm_group,
)
from qbench.quant.walk.blockwise import BlockInputs
from qbench.quant.walk.inventory import Target, set_weight
from qbench.quant.walk.onload import onloaded
from qbench.quant.walk.structure import BlockStructure, probe_ids, trace_structure

CLIP_TOKENS = 512  # tokens sampled per linear for the clip search (the reference's n_sample_token)
SKIPPED_IN_CLIP = ("q_", "k_")  # the reference's rule: queries and keys are not clipped
CLIP_CHUNK = 1 << 24  # elements of the per-step products a chunk of output channels holds


@torch.no_grad()
def awq(
    model: nn.Module,
    inputs: BlockInputs,
    weights: WeightQuant,
    grid: int = 20,
    duo_scaling: bool = False,
    clip: bool = True,
    max_shrink: float = 0.5,
) -> None:
    """Scale (and clip) `model` in place, block by block on the calibration inputs `inputs`
    (at block 0), for rounding with `weights`; each block onloaded meanwhile where the model
    is offloaded (qbench.quant.walk.onload)."""
    structure = trace_structure(model, probe_ids(model))
    for block in structure.blocks:
        with onloaded(model, structure.inventory.block_path(block.index)):
            _awq_block(inputs, block, weights, grid, duo_scaling, clip, max_shrink)
            inputs.advance()
    inputs.release()


def _awq_block(
    inputs: BlockInputs,
    block: BlockStructure,
    weights: WeightQuant,
    grid: int,
    duo_scaling: bool,
    clip: bool,
    max_shrink: float,
) -> None:
    """Scale each group of the block in turn (norm groups, then gated pairs), check that the
    float block is unchanged, then clip (see the module docstring)."""
    groups = [g for g in block.norms if g.spec is not None and g.spec.scale is not None]
    units = [(_rounded(g.readers), g.norm, lambda s, g=g: scale_norm_group(g, s)) for g in groups]
    units += [([down], down.module, lambda s, u=up, d=down: scale_pair(u, d, s))
              for up, down in block.gated_pairs]  # fmt: skip
    chains = [_inspectable(inputs.blocks[inputs.index], readers) for readers, _, _ in units]
    groups = [(producer, readers) for readers, producer, _ in units]
    first = _reference_pass(inputs, groups, {m for chain in chains for m in chain})
    for (readers, _, apply), mean, chain in zip(units, first.means, chains, strict=True):
        replay = _Replay.record(inputs, first.upstream(readers, block), readers)
        scales = search_scales(inputs, first.inspected(chain), readers, mean, weights, grid,
                               duo_scaling, replay)  # fmt: skip
        apply(scales)
    linears = {t.name: t.module for t in _block_linears(block)} if clip else {}
    samples = check_scaling(inputs, first.outputs, linears)
    for name, linear in linears.items():
        maxima = search_clip(linear.weight.detach(), samples[name], weights, grid, max_shrink)
        rows = linear.weight.detach().reshape(*maxima.shape[:2], -1)
        set_weight(linear.weight, torch.clamp(rows, -maxima, maxima).reshape(linear.weight.shape))


def _rounded(readers: list[Target]) -> list[Target]:
    """The readers the recipe rounds and the search measures (routers stay in float)."""
    return [r for r in readers if r.kind != "router"]


def _inspectable(block: nn.Module, readers: list[Target]) -> list[nn.Module]:
    """The modules a group's grid point may be judged by, smallest first: the readers' lowest
    common ancestor in `block` (its parent where that is one reader, a fused projection), then
    each module above it up to `block` (the first of them the block calls is inspected)."""
    names = {module: name for name, module in block.named_modules()}
    if not readers or any(r.module not in names for r in readers):
        return [block]
    paths = [names[r.module].split(".") if names[r.module] else [] for r in readers]
    common: list[str] = []  # the leading names every path shares
    for names_here in zip(*paths, strict=False):
        if len(set(names_here)) > 1:
            break
        common.append(names_here[0])
    if any(len(path) == len(common) for path in paths):
        common = common[:-1]
    return [block.get_submodule(".".join(common[:i])) for i in range(len(common), -1, -1)]


@dataclass
class _Inspected:
    """The module a group's grid is judged by and its float outputs [*, out]: `expected[b]`
    holds one per call in calibration batch b (none where it was not called, e.g. an expert
    no token reached in that batch)."""

    module: nn.Module
    expected: list[list[torch.Tensor]]


@dataclass
class _FirstPass:
    """What the block's first pass saw: its float outputs per batch, the mean |x| per channel
    of each group's input, the float outputs of the modules a grid may inspect (per batch, per
    call), and when each submodule's calls started (first) and ended (last) in the first batch
    (a counter of module calls), to tell which modules run before a group's readers."""

    outputs: list[torch.Tensor]
    means: list[torch.Tensor]
    calls: dict[nn.Module, list[list[torch.Tensor]]]
    starts: dict[nn.Module, int]
    ends: dict[nn.Module, int]

    def inspected(self, chain: list[nn.Module]) -> _Inspected:
        """The first module of `chain` (see _inspectable) that output a nonempty tensor, the
        block (the chain's last) otherwise."""
        for module in chain[:-1]:
            if any(y.numel() for calls in self.calls.get(module, []) for y in calls):
                return _Inspected(module, self.calls[module])
        return _Inspected(chain[-1], [[output] for output in self.outputs])

    def upstream(self, readers: list[Target], block: BlockStructure) -> list[nn.Module]:
        """The largest submodules of the block holding a target whose every call ends before
        the first of `readers` starts: their outputs do not depend on the readers' weights."""
        if not readers:
            return []
        start = min(self.starts.get(r.module, -1) for r in readers)
        targets = {id(t.module) for t in _block_targets(block)}
        readers_in = {id(r.module) for r in readers}
        chosen: list[nn.Module] = []
        for module, end in sorted(self.ends.items(), key=lambda item: self.starts[item[0]]):
            inside = {id(m) for m in module.modules()}
            if end >= start or not inside & targets or inside & readers_in:
                continue
            if not any(module in list(c.modules()) for c in chosen):
                chosen.append(module)
        return chosen


def _block_targets(block: BlockStructure) -> list[Target]:
    """The targets the block's structure names (readers, writers, gated pairs)."""
    targets = [t for g in block.norms for t in [*g.readers, *g.inner]] + block.direct_readers
    return targets + block.writers + block.post_normed + [t for p in block.gated_pairs for t in p]


def _reference_pass(
    inputs: BlockInputs,
    groups: list[tuple[nn.Module, list[Target]]],
    inspectable: set[nn.Module],
) -> _FirstPass:
    """One pass of the float block: its outputs, each group's input means (what a norm outputs,
    what a gated pair's down linear receives), the outputs of the `inspectable` submodules and
    the order of the submodules' calls."""
    block = inputs.blocks[inputs.index]
    batch = [0]
    calls = {m: [[] for _ in inputs.hidden] for m in inspectable if m is not block}

    def keep(module: nn.Module, _: tuple, y: object) -> None:
        if isinstance(output := _first(y), torch.Tensor):
            calls[module][batch[0]].append(output.detach().clone())

    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    starts: dict[nn.Module, int] = {}
    ends: dict[nn.Module, int] = {}
    clock = iter(range(1 << 62))

    def add(index: int, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).abs().double()
        sums[index] = sums.get(index, 0) + x.sum(0)
        counts[index] = counts.get(index, 0) + x.shape[0]

    def start(module: nn.Module, _: tuple) -> None:
        starts.setdefault(module, next(clock))

    def end(module: nn.Module, _: tuple, __: object) -> None:
        ends[module] = next(clock)

    order = []  # the call order is read in the first batch (every batch calls alike)
    for module in block.modules():
        if module is not block:
            order += [module.register_forward_pre_hook(start), module.register_forward_hook(end)]
    handles = []
    for index, (producer, _) in enumerate(groups):
        if isinstance(producer, nn.Linear):  # a gated pair's down: what it receives
            hook = producer.register_forward_pre_hook(lambda _, a, i=index: add(i, a[0]))
        else:  # a norm: what it outputs
            hook = producer.register_forward_hook(lambda _, __, y, i=index: add(i, _first(y)))
        handles.append(hook)
    handles += [module.register_forward_hook(keep) for module in calls]
    outputs = []
    try:
        for output in inputs.run():
            outputs.append(output)
            batch[0] += 1
            for handle in order:
                handle.remove()
    finally:
        for handle in handles + order:
            handle.remove()
    means = [(sums[i] / counts[i]).float() for i in range(len(groups))]
    return _FirstPass(outputs, means, calls, starts, ends)


def _first(output: object) -> object:
    """A module's main output: the first of a tuple (attention's, an MoE block's)."""
    return output[0] if isinstance(output, tuple) and output else output


class _Replay:
    """Submodules answering each call with the output they gave in a recorded pass, so that a
    grid point runs only what a group's readers feed (exactly: those outputs do not depend on
    the readers' weights). `outputs[module][b]`: its outputs per call in calibration batch b."""

    def __init__(self, outputs: dict[nn.Module, list[list[Any]]]) -> None:
        self.outputs = outputs
        self.next: dict[nn.Module, Iterator[Any]] = {}

    @classmethod
    def record(
        cls, inputs: BlockInputs, modules: list[nn.Module], readers: list[Target]
    ) -> _Replay | None:
        """Their outputs over a pass of the block that stops as the first of `readers`
        starts (None when there are none)."""
        if not modules:
            return None
        outputs: dict[nn.Module, list[list[Any]]] = {m: [] for m in modules}
        handles = [m.register_forward_hook(lambda m, _, y: outputs[m][-1].append(y))
                   for m in modules]  # fmt: skip
        handles += [r.module.register_forward_pre_hook(_enough) for r in readers]
        try:
            for batch in range(len(inputs.hidden)):
                for calls in outputs.values():
                    calls.append([])
                _run_until_enough(inputs, batch)
        finally:
            for handle in handles:
                handle.remove()
        return cls(outputs)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, the modules replay their recorded outputs (`rewind` to a batch
        before running the block on it)."""
        saved = {m: vars(m).get("forward") for m in self.outputs}
        for module in self.outputs:
            vars(module)["forward"] = lambda *_, __m=module, **___: _copy(next(self.next[__m]))
        try:
            yield
        finally:
            for module, forward in saved.items():
                if forward is None:
                    vars(module).pop("forward", None)
                else:
                    vars(module)["forward"] = forward

    def rewind(self, batch: int) -> None:
        self.next = {m: iter(outputs[batch]) for m, outputs in self.outputs.items()}


class _Enough(Exception):
    """Raised by a hook where a partial pass of the block has what it needs (the replay's
    recording as a group's first reader starts, a grid point after the inspected module's
    last call)."""


def _run_until_enough(inputs: BlockInputs, batch: int) -> None:
    """Run the current block on calibration batch `batch`, up to where a hook raises _Enough."""
    rest, kwargs = inputs.arguments[batch][inputs.index]
    with contextlib.suppress(_Enough):
        inputs.blocks[inputs.index](inputs.hidden[batch], *rest, **kwargs)


def _enough(*_: object) -> None:
    raise _Enough


def _copy(value: Any) -> Any:
    """A copy of a recorded output (tensors cloned: the block may change them in place)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_copy(v) for v in value)
    return value


def check_scaling(
    inputs: BlockInputs, reference: list[torch.Tensor], linears: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """QBenchError when the scaled block's float output moved from `reference` (its output
    before scaling) beyond the rotation's LOSSLESS_TOLERANCE (relative L2): the scaling must be
    lossless, so a clipped AWQ cell's transformed stage still vouches for it. In the same pass,
    up to CLIP_TOKENS evenly spaced input rows [tokens, in] of each of `linears` (the clip
    search's samples)."""
    tokens = sum(h.shape[:-1].numel() for h in inputs.hidden)
    stride = max(1, tokens // CLIP_TOKENS)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    handles = [
        m.register_forward_pre_hook(lambda _, a, n=n: seen[n].append(
            a[0].reshape(-1, a[0].shape[-1])[::stride]))
        for n, m in linears.items()
    ]  # fmt: skip
    try:
        pairs = zip(inputs.run(), reference, strict=True)
        error = max(relative_error(out, ref) for out, ref in pairs)
    finally:
        for handle in handles:
            handle.remove()
    dtype = reference[0].dtype
    tolerance = lossless_tolerance(dtype)
    if not error <= tolerance:
        raise QBenchError(
            f"awq: scaling decoder block {inputs.index} changed its float output by {error:.2e} "
            f"(relative L2, allowed {tolerance:g} in {dtype}): the scaling is not lossless here"
        )
    return {name: torch.cat(rows)[:CLIP_TOKENS] for name, rows in seen.items()}


def search_scales(
    inputs: BlockInputs,
    inspected: _Inspected,
    readers: list[Target],
    x_mean: torch.Tensor,
    weights: WeightQuant,
    grid: int,
    duo_scaling: bool = False,
    replay: _Replay | None = None,
) -> torch.Tensor:
    """The scales s [in] whose Q(W diag(s)) diag(s)^-1 readers give the inspected module's
    output closest to its float output (mean squared error), over the grid of ratios (see the
    module docstring). `replay`: modules upstream of the readers, replaying their outputs."""
    matrices = [m for reader in readers for _, m in reader.input_matrices()]
    saved = [m.detach().clone() for m in matrices]
    w_mean = _weight_mean(saved, weights) if duo_scaling else None
    best, best_error = torch.ones_like(x_mean), float("inf")
    with replay.active() if replay is not None else contextlib.nullcontext():
        for step in range(grid):
            ratio = step / grid
            scales = x_mean.pow(ratio).clamp(min=1e-4)
            if w_mean is not None:
                scales = scales / w_mean.pow(1 - ratio).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for matrix, original in zip(matrices, saved, strict=True):
                s = scales.to(matrix.device, matrix.dtype)
                matrix.copy_(fake_quant(original * s, weights).div_(s))
            error = _inspected_error(inputs, inspected, replay)
            if error < best_error:
                best, best_error = scales, error
    for matrix, original in zip(matrices, saved, strict=True):
        matrix.copy_(original)
    return best


def _weight_mean(matrices: list[torch.Tensor], weights: WeightQuant) -> torch.Tensor:
    """Mean over output rows of |W| / max|W| per quantization group, per input column."""
    rows = torch.cat([m.float() for m in matrices])
    width = weights.group or rows.shape[1]
    groups = rows.abs().reshape(rows.shape[0], -1, width)
    return (groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(rows.shape).mean(0)


def _inspected_error(inputs: BlockInputs, inspected: _Inspected, replay: _Replay | None) -> float:
    """Mean squared error of the inspected module's outputs against their float values, the
    block run on each calibration batch that calls it, up to its last call there."""
    total, count = 0.0, 0
    for batch, expected in enumerate(inspected.expected):
        if not expected:
            continue
        if replay is not None:
            replay.rewind(batch)
        compare = _Comparison(expected)
        handle = inspected.module.register_forward_hook(compare)
        try:
            _run_until_enough(inputs, batch)
        finally:
            handle.remove()
        total, count = total + compare.total, count + compare.count
    return total / count


class _Comparison:
    """A forward hook summing the squared error of a module's calls in one batch against
    `expected` (their float outputs, in call order); raises _Enough after the last."""

    def __init__(self, expected: list[torch.Tensor]) -> None:
        self.expected, self.calls, self.total, self.count = expected, 0, 0.0, 0

    def __call__(self, _: nn.Module, __: tuple, y: object) -> None:
        reference = self.expected[self.calls]
        self.calls += 1
        self.total += (_first(y).float() - reference.float()).pow(2).sum().item()
        self.count += reference.numel()
        if self.calls == len(self.expected):
            raise _Enough


def scale_pair(up: Target, down: Target, scales: torch.Tensor) -> None:
    """up's output rows (and bias) / s, down's input columns * s (a gated MLP)."""
    s = scales.double()
    set_weight(up.module.weight, up.module.weight.double() / s.to(up.module.weight.device)[:, None])
    if up.module.bias is not None:
        set_weight(up.module.bias, up.module.bias.double() / s.to(up.module.bias.device))
    set_weight(down.module.weight, down.module.weight.double() * s.to(down.module.weight.device))


def _block_linears(block: BlockStructure) -> list[Target]:
    """Every nn.Linear the block's structure names, but queries and keys (and the readers
    inside a norm: GatedNorm's gate)."""
    targets = [t for g in block.norms for t in g.readers] + block.direct_readers
    targets += block.writers + block.post_normed + [d for _, d in block.gated_pairs]
    unique = {t.name: t for t in targets if isinstance(t.module, nn.Linear)}
    return [
        t for n, t in unique.items() if not any(k in n.rsplit(".", 1)[-1] for k in SKIPPED_IN_CLIP)
    ]


def search_clip(
    weight: torch.Tensor, x: torch.Tensor, weights: WeightQuant, grid: int, max_shrink: float
) -> torch.Tensor:
    """Per (output channel, group) the kept maximum |w| [out, groups, 1] minimizing the mean
    squared error of that group's partial products on the sampled inputs x [tokens, in]:
    mean over tokens of (x_g (q_g - w_g))^2, one batched product per group and step (BLAS);
    output channels in chunks of about CLIP_CHUNK products."""
    width = weights.group or weight.shape[1]
    xg = x.float().reshape(x.shape[0], -1, width).transpose(0, 1)  # [groups, tokens, width]
    chunk = max(1, CLIP_CHUNK // (xg.shape[0] * xg.shape[1]))
    return torch.cat(
        [_clip_rows(weight[i : i + chunk], xg, weights, grid, max_shrink)
         for i in range(0, weight.shape[0], chunk)]
    )  # fmt: skip


def _clip_rows(
    rows: torch.Tensor, xg: torch.Tensor, weights: WeightQuant, grid: int, max_shrink: float
) -> torch.Tensor:
    groups, width = xg.shape[0], xg.shape[2]
    w = rows.float().reshape(rows.shape[0], groups, width)  # [out, groups, width]
    original = w.abs().amax(dim=-1, keepdim=True)  # [out, groups, 1]
    best, best_error = original.clone(), torch.full_like(original, float("inf"))
    for step in range(int(max_shrink * grid)):
        maxima = original * (1 - step / grid)
        clipped = torch.clamp(w, -maxima, maxima)
        rounded = fake_quant(clipped.reshape(rows.shape), weights).reshape(w.shape)
        delta = rounded.sub_(w).permute(1, 2, 0)  # [groups, width, out]
        error = torch.bmm(xg, delta).square_().mean(dim=1).T[..., None]  # [out, groups, 1]
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, maxima, best)
    return best
