"""GPTQ: round weights column by column, feeding each column's error back into the rest.

Per weight matrix, with H = 2/n sum x x^T over its calibration inputs: dampen H (+ damp * mean
diag H), take the upper Cholesky factor U of H^-1, and for each column j (optionally in
order of decreasing diag H, "act-order") round w_j, then subtract (w_j - q_j) / U_jj * U_j,k
from the later columns k; updates are applied lazily per block of `block_size` columns.
Group scales: `static_groups: true` (default; AutoGPTQ's / GPTQModel's name) takes every
group's scale from the original weight before any column is rounded, so act-order keeps the
groups contiguous in the original columns; `static_groups: false` is GPTQ's reference code:
a group's scale is computed when the column loop reaches its first column, from the weights
updated so far (by every earlier lazy block, as the reference reads them), and with
act-order the groups are consecutive columns in the permuted order.

With `rotate: true` in the `method: gptq` shorthand, QuaRot's rotation (a transform) comes
first. Decoder blocks are processed in order on cached inputs (qbench.quant.blockwise): block i's
Hessians come from its inputs as the already rounded blocks 0..i-1 produce them, as GPTQ does,
in two block passes per block. Every target of the inventory takes part: linears, routers
when asked, and each expert's slices of 3-D expert weights, whose Hessian is taken over the
tokens routed to that expert (an expert no calibration token reached is rounded to nearest,
and the cell's notes say how many); a state-space conv (`convs: true`) and a linear whose
parent applies its weight itself (Mamba-1's dt_proj) are rounded to nearest (noted too).
Weights a quantizer keeps in float (`keep_float.super_weights`) are held out: 0 while their
matrix is solved (no error of theirs feeds back), then put back. Targets outside the blocks
(lm_head when asked) see a full forward pass of the rounded model. Block 0's Hessians come
from the fp model alone, so (without rotation) the GPTQ cells of a checkpoint share them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from qbench.quant.formats.fake import fake_quant, int_clip
from qbench.quant.formats.integer import IntGrid, int_grid
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.walk.blockwise import forward_batches, observe
from qbench.quant.walk.experts import set_input_step
from qbench.quant.walk.inventory import Target, inventory
from qbench.quant.walk.linear import hold_out, round_target
from qbench.quant.walk.onload import onloaded
from qbench.quant.walk.select import WEIGHT_ONLY, quantized_targets

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.steps.gptq import GPTQ

Key = tuple[str, str]  # (target name, matrix label)


def gptq(context: StepContext, step: GPTQ) -> None:
    """GPTQ-round every target the quantizer selects, block by block on cached inputs (see
    the module docstring), each block onloaded meanwhile where the model is offloaded
    (qbench.quant.walk.onload); block 0's Hessians are shared by the cells of a checkpoint."""
    model, quantizer = context.model, context.quantizer
    calibration = step.calibration
    found = inventory(model)
    targets = quantized_targets(found, quantizer)
    if convs := {n: t for n, t in targets.items() if t.kind in WEIGHT_ONLY}:
        for name in convs:
            with onloaded(model, name):
                round_target(model, targets.pop(name), quantizer.weights, None)
        context.note(
            f"gptq: {len(convs)} depthwise conv1d weights (convs: true) rounded to nearest "
            "(a per-channel filter over a few taps has no input Hessian)",
            caveat=True,
        )
    inputs = context.block_inputs(calibration, "gptq") if len(found.blocks) else None
    unreached = []  # (target, matrix label) of expert slices no calibration token reached
    for i in range(len(found.blocks)):
        block = {n: t for n, t in found.in_block(i).items() if n in targets}

        def compute(block: dict[str, Target] = block) -> dict[Key, torch.Tensor]:
            return input_hessians(block, lambda: observe(inputs))

        with onloaded(model, found.block_path(i)):
            if i == 0:  # from the model as the transforms before left it: shared by cells alike
                key = ("gptq.hessians", tuple(block), calibration.model_dump_json())
                hessians = context.statistic(key, compute)
            else:
                hessians = compute()
            unreached += _round(context, step, block, hessians)
            del hessians  # (not alive while the next block's are summed)
            inputs.advance()
    if inputs is not None:
        inputs.release()
    rest = found.outside_blocks(targets)
    if rest:
        ids = context.calibration_ids(calibration, "gptq")
        run = lambda: forward_batches(model, ids, calibration.batch_size)  # noqa: E731
        hessians = input_hessians(rest, run)
        with onloaded(model, *rest):
            unreached += _round(context, step, rest, hessians)
    experts = [key for key in unreached if targets[key[0]].experts is not None]
    if experts:
        slices = sum(1 for t in targets.values() if t.experts for _ in t.matrices())
        context.note(
            f"gptq: {len(experts)} of {slices} expert matrices saw no calibration token: "
            "rounded to nearest",
            caveat=True,
        )
    if outside := [name for name, _ in unreached if targets[name].experts is None]:
        context.note(
            f"gptq: {len(outside)} linears whose weight their parent applies itself (e.g. "
            f"{outside[0]}: x @ W, not their forward) saw no input: rounded to nearest",
            caveat=True,
        )


def _round(
    context: StepContext,
    step: GPTQ,
    targets: dict[str, Target],
    hessians: dict[Key, torch.Tensor],
) -> list[Key]:
    """Round `targets` with their Hessians; the matrices that had none (rounded to nearest)."""
    weights = context.quantizer.weights
    unreached = []
    for name, target in targets.items():
        rounded = {}
        kept = context.float_weights.get(name, [])
        for label, matrix in target.matrices():
            hessian = hessians.get((name, label))
            if hessian is None:  # an expert no token reached, or a weight applied as x @ W
                unreached.append((name, label))
                rounded[label] = fake_quant(matrix.detach(), weights)
                continue

            def solve(w: torch.Tensor, h: torch.Tensor = hessian) -> torch.Tensor:
                return gptq_round(
                    w, h, weights, step.damp, step.block_size, step.act_order, step.static_groups
                )

            rounded[label] = hold_out(matrix, kept, solve) if kept else solve(matrix.detach())
        round_target(context.model, target, weights, context.quantizer.activations, rounded, kept)
    return unreached


@torch.no_grad()
def input_hessians(
    targets: dict[str, Target], run: Callable[[], object]
) -> dict[Key, torch.Tensor]:
    """H = 2/n sum x x^T (float64) of every matrix's inputs while `run()` runs; experts get one
    per expert slice over the tokens routed to it; slices no token reached get none (n counts
    the nonzero rows: Llama 4's experts receive every token, zero where it is not routed;
    GPTQ's rounding does not depend on H's scale)."""
    sums: dict[Key, torch.Tensor] = {}
    counts: dict[Key, int] = {}

    def add(key: Key, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[key] = sums.get(key, 0) + x.T @ x
        counts[key] = counts.get(key, 0) + (x != 0).any(-1).sum()  # no sync per call

    handles = []
    for name, target in targets.items():
        if target.experts is None:
            hook = lambda _, args, n=name: add((n, "weight"), args[0])  # noqa: E731
            handles.append(target.module.register_forward_pre_hook(hook))
            continue
        for parameter in target.experts.parameters:

            def step(x: torch.Tensor, e: int, n: str = name, p: str = parameter) -> torch.Tensor:
                add((n, f"{p}[{e}]"), x)
                return x

            set_input_step(target.module, parameter, "observe", step)
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        for target in targets.values():
            for parameter in target.experts.parameters if target.experts else ():
                set_input_step(target.module, parameter, "observe", None)
    return {key: 2 * total / counts[key] for key, total in sums.items() if counts[key]}


def column_grid(columns: torch.Tensor, spec: WeightQuant) -> IntGrid:
    """The grid of a [out, k] slice of a weight: one per row, or one for all (granularity
    tensor), with the spec's clip (searched when `clip_search`) and scale rule."""
    rows = columns.reshape(1, -1) if spec.granularity == "tensor" else columns
    return int_grid(rows, spec.bits, spec.symmetric, int_clip(rows, spec), spec.scale_rule)


def weight_grids(weight: torch.Tensor, spec: WeightQuant) -> tuple[list[IntGrid], int]:
    """(grids, columns per grid): one per group, or one for all columns."""
    width = spec.group or weight.shape[1]
    grids = [column_grid(weight[:, i : i + width], spec) for i in range(0, weight.shape[1], width)]
    return grids, width


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightQuant,
    damp: float,
    block_size: int,
    act_order: bool,
    static_groups: bool = True,
) -> torch.Tensor:
    """The GPTQ-rounded weight [out, in] (float32) for inputs with Hessian `hessian` [in, in].

    `static_groups` (with spec.group): see the module docstring.
    """
    w = weight.double().clone()
    dynamic = spec.group is not None and not static_groups
    grids, width = ([], spec.group) if dynamic else weight_grids(w, spec)
    h = hessian.clone().to(w.device)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = (
        torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    ).to(w.device)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        block = w[:, i1:i2].clone()
        errors = torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            column = block[:, i]
            if dynamic and (i1 + i) % width == 0:  # GPTQ's reference reads W, not the block
                grid = column_grid(w[:, i1 + i : i1 + i + width], spec)
            elif not dynamic:
                grid = grids[int(order[i1 + i]) // width]
            q[:, i1 + i] = grid.round(column)
            errors[:, i] = (column - q[:, i1 + i]) / u[i1 + i, i1 + i]
            block[:, i:] -= errors[:, i : i + 1] @ u[i1 + i : i1 + i + 1, i1 + i : i2]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return q[:, torch.argsort(order)].float()
