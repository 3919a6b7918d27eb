"""Calibration passes: the whole model over calibration batches (`forward_batches`), or
block by block (`BlockInputs`): each decoder block runs on cached inputs, O(L) block passes.

As QuaRot's and GPTQ's reference code and llmc's blockwise flow: one forward pass per
calibration batch records what every decoder block receives (the hidden states entering the
first block, and each block's other arguments: attention masks, RoPE tables, position ids,
ALiBi, ... exactly as the model passes them, so sliding-window and global layers keep their own
masks); the pass stops before the last block. Then block i runs on its inputs (the outputs of
the already processed block i - 1), a method observes and rounds it, and block i runs again to
produce block i + 1's inputs from the rounded block. Two block passes per block, where running
the model from its embeddings for every block takes L(L+1)/2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from qbench.quant.walk.inventory import Inventory


@torch.no_grad()
def forward_batches(model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    """Forward `ids` [n, seq_len] through the whole model in batches of `batch_size` rows (no
    KV cache), for the hooks of whoever observes it."""
    device = next(model.parameters()).device
    for batch in ids.split(batch_size):
        model(input_ids=batch.to(device), use_cache=False)


class _Stop(Exception):
    """Raised in the last block's pre-hook: the rest of the forward pass is not needed."""


class BlockInputs:
    """The inputs of the current decoder block for every calibration batch.

    `hidden[b]`: the hidden states [batch, tokens, hidden] entering the current block for
    calibration batch b; `arguments[b][i]`: (positional arguments after the hidden states,
    keyword arguments) that block i received in batch b.
    """

    def __init__(self, model: nn.Module, found: Inventory, ids: torch.Tensor, batch_size: int):
        self.blocks = found.blocks
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[list[tuple[tuple, dict]]] = []
        device = next(model.parameters()).device
        for batch in ids.split(batch_size):
            self.arguments.append([])
            handles = [
                block.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                for i, block in enumerate(self.blocks)
            ]
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
        self.index = 0

    def _recorder(self, index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                self.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            rest = args[1:] if args else ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.arguments[-1].append((rest, kwargs))
            if index == len(self.blocks) - 1:
                raise _Stop

        return record

    def run(self) -> Iterator[torch.Tensor]:
        """Run the current block on every batch (its hooks see the inputs); yield outputs."""
        block = self.blocks[self.index]
        for hidden, arguments in zip(self.hidden, self.arguments, strict=True):
            rest, kwargs = arguments[self.index]
            output = block(hidden, *rest, **kwargs)
            yield output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def advance(self) -> None:
        """Replace the inputs by the current block's outputs and move to the next block."""
        self.hidden = list(self.run())
        self.index += 1


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
