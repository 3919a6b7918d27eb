"""Online Hadamard benchmark, measured in one run (a script, not a test).

Prints, per width, the time of x @ M for a batch of token vectors with M applied as qbench's
online rotations do (fast Walsh-Hadamard transform for the power-of-two factor, a dense
product for the base factor) against the dense n x n product, their ratio, and the largest
difference between the two.

    OMP_NUM_THREADS=2 .venv/bin/python bench/hadamard_bench.py [--tokens N] [--widths ...]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import seconds

from qbench.quant.formats.hadamard import HadamardTransform


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    fn()  # warm-up
    return statistics.median(seconds(fn) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 768, 4096, 11008, 14336])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on = device if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"x: [{args.tokens}, n] float32 ({on})\n")
    print("| n | factorization | fast ms | dense ms | dense / fast | max abs diff |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for n in args.widths:
        rotation = HadamardTransform(n).to(device)
        dense = rotation.matrix().float()
        x = torch.randn(args.tokens, n, device=device)
        fast_s = median_seconds(lambda r=rotation, x=x: r(x))
        dense_s = median_seconds(lambda x=x, m=dense: x @ m)
        diff = (rotation(x) - x @ dense).abs().max().item()
        print(
            f"| {n} | {rotation.factorization} | {fast_s * 1e3:.2f} | {dense_s * 1e3:.2f} | "
            f"{dense_s / fast_s:.2f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
