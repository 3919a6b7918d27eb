"""Run calibration text through a model, batch by batch, for the hooks of whoever observes it."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def forward_batches(model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    """Forward `ids` [n, seq_len] in batches of `batch_size` rows (no KV cache)."""
    device = next(model.parameters()).device
    for batch in ids.split(batch_size):
        model(input_ids=batch.to(device), use_cache=False)
