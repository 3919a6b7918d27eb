"""Calibration passes: the whole model over calibration batches (`forward_batches`), or
block by block (`BlockInputs`): each decoder block runs on cached inputs, O(L) block passes.

As QuaRot's and GPTQ's reference code and llmc's blockwise flow: one forward pass per
calibration batch records what every decoder block receives (the hidden states entering the
first block, and each block's other arguments: attention masks, RoPE tables, position ids,
ALiBi, ... exactly as the model passes them, so sliding-window and global layers keep their own
masks); the pass stops before the last block, or after it when observers ride on it
(SmoothQuant's ranges of the float model). Then block i runs on its inputs (the outputs of
the already processed block i - 1), a method observes and rounds it, and block i runs again to
produce block i + 1's inputs from the rounded block. Two block passes per block, where running
the model from its embeddings for every block takes L(L+1)/2. One capture serves every step of
a quantizer that calibrates on the same windows (`StepContext.block_inputs`): a later step
restarts at block 0 with a pass that stops where the blocks start. Where the model is
offloaded, the caller onloads each block while it works on it (qbench.quant.walk.onload); the
capture and the restart run the dispatched model as it is (accelerate's hooks load each
offloaded module for its forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from qbench.quant.walk.inventory import Inventory
from qbench.quant.walk.onload import input_device


@torch.no_grad()
def forward_batches(model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    """Forward `ids` [n, seq_len] through the whole model in batches of `batch_size` rows (no
    KV cache), for the hooks of whoever observes it."""
    device = input_device(model)
    for batch in ids.split(batch_size):
        model(input_ids=batch.to(device), use_cache=False)


class _Stop(Exception):
    """Raised where the capture pass has what it needs: the rest of the forward is not run."""


class BlockInputs:
    """The inputs of the current decoder block for every calibration batch.

    `hidden[b]`: the hidden states [batch, tokens, hidden] entering the current block for
    calibration batch b; `arguments[b][i]`: (positional arguments after the hidden states,
    keyword arguments) that block i received in batch b.

    The capture runs the model once per calibration batch. With `produces` ({module:
    callback(output)}, e.g. SmoothQuant's norm observers) hooked meanwhile it runs through the
    last block, so the observers see the float model's whole stream; otherwise it stops before
    the last block. `restart` goes back to block 0 for the next step of a quantizer (one
    capture per quantizer run: the blocks' arguments, masks and RoPE tables, do not depend on
    their weights).
    """

    def __init__(
        self,
        model: nn.Module,
        found: Inventory,
        ids: torch.Tensor,
        batch_size: int,
        produces: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None,
    ):
        self.model = model
        self.blocks = found.blocks
        self.batches = ids.split(batch_size)
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[list[tuple[tuple, dict]]] = []
        self.through_last = bool(produces)
        self.index = 0
        if not len(self.blocks):
            return
        handles = [
            block.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
            for i, block in enumerate(self.blocks)
        ]
        handles += [m.register_forward_hook(lambda _, __, y, f=f: f(y)) for m, f in
                    (produces or {}).items()]  # fmt: skip
        if produces:
            handles.append(self.blocks[len(self.blocks) - 1].register_forward_hook(_stop))
        try:
            for batch in self.batches:
                self.arguments.append([])
                self._forward(batch)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()  # an autograd graph would keep every block's activations alive
    def _forward(self, batch: torch.Tensor) -> None:
        with contextlib.suppress(_Stop):
            self.model(input_ids=batch.to(input_device(self.model)), use_cache=False)

    def _recorder(self, index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                self.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            rest = args[1:] if args else ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.arguments[-1].append((rest, kwargs))
            if index == len(self.blocks) - 1 and not self.through_last:
                raise _Stop

        return record

    @torch.no_grad()
    def restart(self) -> None:
        """Back to block 0, with its hidden states as the model computes them now (a pass
        that stops as block 0 starts: what precedes the blocks, e.g. a rotated embedding)."""

        def record(_: nn.Module, args: tuple, kwargs: dict) -> None:
            self.hidden.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        self.hidden = []
        handle = self.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            for batch in self.batches:
                self._forward(batch)
        finally:
            handle.remove()
        self.index = 0

    def run(self) -> Iterator[torch.Tensor]:
        """Run the current block on every batch (its hooks see the inputs); yield outputs."""
        block = self.blocks[self.index]
        for hidden, arguments in zip(self.hidden, self.arguments, strict=True):
            rest, kwargs = arguments[self.index]
            output = block(hidden, *rest, **kwargs)
            yield output[0] if isinstance(output, tuple) else output

    def release(self) -> None:
        """Drop the cached hidden states (`restart` computes block 0's again)."""
        self.hidden = []

    @torch.no_grad()
    def advance(self) -> None:
        """Replace the inputs by the current block's outputs and move to the next block."""
        self.hidden = list(self.run())
        self.index += 1


def _stop(*_: object) -> None:
    raise _Stop


@torch.no_grad()
def observe(
    inputs: BlockInputs,
    receives: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None,
    produces: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None,
) -> None:
    """Run the current block on its inputs once; each module of `receives` hands its first
    input, each of `produces` its output, to its callback (hooks removed afterwards)."""
    handles = [
        m.register_forward_pre_hook(lambda _, a, f=f: f(a[0])) for m, f in (receives or {}).items()
    ]
    handles += [
        m.register_forward_hook(lambda _, __, y, f=f: f(y)) for m, f in (produces or {}).items()
    ]
    try:
        for _ in inputs.run():
            pass
    finally:
        for handle in handles:
            handle.remove()
