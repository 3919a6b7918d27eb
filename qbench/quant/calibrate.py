"""Run calibration text through a model and hand each watched module's inputs to a callback."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def observe_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    ids: torch.Tensor,
    batch_size: int,
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Forward `ids` [n, seq_len] in batches; call observe(name, input as [tokens, features])."""
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, name=name: observe(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, module in modules.items()
    ]
    device = next(model.parameters()).device
    try:
        for batch in ids.split(batch_size):
            model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
