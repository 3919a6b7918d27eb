"""Integer round-to-nearest fake quantization, one scale (and zero point) per row."""

from __future__ import annotations

import torch


def quantize_int(rows: torch.Tensor, bits: int, symmetric: bool, clip: float) -> torch.Tensor:
    """Fake-quantize each row of a 2-D float tensor to `bits`-bit integers.

    Symmetric: s = clip * max|x| / (2^(b-1) - 1), q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1).
    Asymmetric: the row's range [min(x, 0), max(x, 0)], shrunk by `clip`, maps onto
    [0, 2^b - 1] with an integer zero point. Rounding is half-to-even (torch.round).
    A row of zeros stays zero.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = clip * rows.abs().amax(dim=1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(rows / scale), -qmax - 1, qmax) * scale
    qmax = 2**bits - 1
    low = clip * rows.amin(dim=1, keepdim=True).clamp(max=0)
    high = clip * rows.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(rows / scale) + zero, 0, qmax) - zero) * scale
