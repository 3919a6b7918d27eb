"""Sweep benchmarks, measured in one run (figures, not assertions):

1. Peak memory of a local sweep of N = 1, 4, 8 quantizers of one checkpoint against the fp
   model's size: each sweep runs in a fresh process and reports its peak RSS above the RSS
   it had before the sweep (imports done), and the CUDA peak when a GPU is there. N = 0 (the
   fp cell alone: loading and evaluating) shows what loading itself costs. With one pristine
   copy and one working copy per cell, the peak should not grow with N.
2. Wall time of one sweep of 8 cells with the local executor and with the Ray executor on a
   local Ray instance (all CPUs here), with Ray's start-up time shown apart.

    .venv/bin/python bench/sweep_bench.py [--hidden 1024 --layers 8] [--only memory|executors]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QUANTIZERS = [
    "{name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}",
    "{name: w4a16-g128, method: rtn, weights: {bits: 4, group: 128}}",
    "{name: w4a4, method: rtn, weights: {bits: 4}, activations: {bits: 4}}",
    "{name: w4a8, method: rtn, weights: {bits: 4}, activations: {bits: 8}}",
    "{name: w6a6, method: rtn, weights: {bits: 6}, activations: {bits: 6}}",
    "{name: w3a16-g64, method: rtn, weights: {bits: 3, group: 64}}",
    "{name: w8a16, method: rtn, weights: {bits: 8}}",
    "{name: w2a16-g32, method: rtn, weights: {bits: 2, group: 32}}",
]


def make_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama (fp32) with a small BPE tokenizer, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.checkpoints.train import train_tokenizer
    from qbench.data.sources import embedded_rows

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4 // 128 * 128,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    train_tokenizer(embedded_rows("train")[:200], vocab_size=512).save_pretrained(folder)
    return folder


def write_recipe(path: Path, name: str, checkpoint: Path, quantizers: list[str], eval_: str):
    lines = [f"name: {name}", f"checkpoints: [{{name: model, path: {checkpoint}}}]"]
    lines += [f"quantizers: [{', '.join(quantizers)}]", f"eval: {eval_}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def memory_child(recipe: Path, results: Path) -> None:
    """Run one local sweep; print its peak memory above the pre-sweep RSS as JSON."""
    import psutil

    from qbench.sweep import plan_recipes, sweep

    planned = plan_recipes([recipe])
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    tally = sweep(planned, results, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    figures = {"before": before, "peak": peak, "cuda_peak": cuda, "cells": len(tally.ran)}
    print(json.dumps({**figures, "seconds": time.perf_counter() - start}))


def measure_memory(folder: Path, checkpoint: Path) -> None:
    model_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"\n1. Peak memory of a local sweep vs the fp model ({model_bytes / 2**20:.0f} MiB)")
    print("   N quantizers | cells | RSS before | peak RSS | peak - before | x fp model | CUDA")
    eval_ = "{perplexity: [{data: embedded, seq_len: 64, max_windows: 1}]}"
    for n in (0, 1, 4, 8):
        recipe = write_recipe(folder / f"mem{n}.yaml", f"mem{n}", checkpoint, QUANTIZERS[:n], eval_)
        command = [sys.executable, __file__, "--memory-child", str(recipe), str(folder / "res")]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        f = json.loads(out.strip().splitlines()[-1])
        above = f["peak"] - f["before"]
        cuda = f"{f['cuda_peak'] / 2**20:.0f} MiB" if f["cuda_peak"] is not None else "-"
        print(
            f"   {n:>12} | {f['cells']:>5} | {f['before'] / 2**20:>7.0f} MiB | "
            f"{f['peak'] / 2**20:>5.0f} MiB | {above / 2**20:>9.0f} MiB | "
            f"{above / model_bytes:>10.2f} | {cuda}"
        )


def measure_executors(folder: Path, checkpoint: Path) -> None:
    from qbench.executors import make_executor
    from qbench.store import load_table
    from qbench.sweep import plan_recipes, sweep

    eval_ = "{perplexity: [{data: embedded, seq_len: 128, max_windows: 16}]}"
    recipe = write_recipe(folder / "wall.yaml", "wall", checkpoint, QUANTIZERS[:7], eval_)
    planned = plan_recipes([recipe])
    print(f"\n2. One sweep of {len(planned[0].cells)} cells: local vs Ray ({os.cpu_count()} CPUs)")
    times = {}
    for executor in ("local", "ray"):
        start = time.perf_counter()
        tally = sweep(planned, folder / executor, make_executor(executor), progress=False)
        times[executor] = time.perf_counter() - start
        assert len(tally.ran) == 8 and not tally.failed
    cells = planned[0].cells
    local, ray = (
        {c.key: table.value(c, "perplexity.embedded") for c in cells}
        for table in (load_table(folder / run, cells) for run in ("local", "ray"))
    )
    worst = max(abs(ray[name] / value - 1) for name, value in local.items())
    print(f"   local: {times['local']:.1f} s; ray: {times['ray']:.1f} s (start-up included)")
    print(f"   ray / local wall time: {times['ray'] / times['local']:.2f}")
    print(f"   largest relative difference of a perplexity, ray vs local: {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="width of the memory model")
    parser.add_argument("--layers", type=int, default=8, help="layers of the memory model")
    parser.add_argument("--only", choices=["memory", "executors"], help="one of the two parts")
    parser.add_argument("--memory-child", nargs=2, metavar=("RECIPE", "RESULTS"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(Path(args.memory_child[0]), Path(args.memory_child[1]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"qbench sweep benchmark on {device}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="qbench-sweep-bench-") as tmp:
        folder = Path(tmp)
        if args.only != "executors":
            measure_memory(folder, make_checkpoint(folder / "big", args.hidden, args.layers))
        if args.only != "memory":
            measure_executors(folder, make_checkpoint(folder / "small", 256, 4))


if __name__ == "__main__":
    main()
