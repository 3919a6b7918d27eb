"""Sweep benchmarks, measured in one run (figures, not assertions):

1. Peak memory of a local sweep of N = 1, 4, 8 quantizers of one checkpoint against the fp
   model's size: each sweep runs in a fresh process and reports its peak RSS above the RSS
   it had before the sweep (imports done), and the CUDA peak when a GPU is there. N = 0 (the
   fp cell alone: loading and evaluating) shows what loading itself costs. Cells quantize the
   loaded model in place and the worker restores it from a file (qbench.quant.restore), so the
   peak should stay near one model whatever N (the goal: 1.3x the fp model).
2. Wall time of one sweep of 8 cells with the local executor and with the Ray executor on a
   local Ray instance (all CPUs here), with Ray's start-up time shown apart.
3. With --recipe: the peak memory of that recipe's sweep (run in a fresh process into
   --results) against its first checkpoint's size, and the sweep's wall time. It runs a copy
   written into --results without the quantizers whose library is not installed (one line
   each); --scale-down makes that copy CPU-sized (random checkpoints 2 layers x 128 wide in
   float32, fewer windows, documents and calibration sequences).

    .venv/bin/python bench/sweep_bench.py [--hidden 1024 --layers 8] [--only memory|executors]
    .venv/bin/python bench/sweep_bench.py --recipe RECIPE --results DIR [--scale-down]
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
import yaml

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

    from qbench.data.bpe import train_tokenizer
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

    from qbench.executors import make_executor
    from qbench.sweep import plan_recipes, sweep

    planned = plan_recipes([recipe])
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    tally = sweep(planned, results, make_executor("local"), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    figures = {"before": before, "peak": peak, "cuda_peak": cuda, "cells": len(tally.ran)}
    figures |= {"failed": [job.label for job in tally.failed], "model": first_model_bytes(planned)}
    print(json.dumps({**figures, "seconds": time.perf_counter() - start}))


def first_model_bytes(planned: list) -> int:
    """Bytes of the first checkpoint's parameters in the dtype it loads in (meta device)."""
    from transformers import AutoModelForCausalLM

    from qbench.checkpoints.load import DTYPES, checkpoint_config

    spec = planned[0].cells[0].checkpoint  # dtype resolved by the plan
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            checkpoint_config(spec),
            dtype=DTYPES[spec.dtype],
            trust_remote_code=spec.trust_remote_code,
        )
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_memory_child(recipe: Path, results: Path) -> dict:
    command = [sys.executable, __file__, "--memory-child", str(recipe), str(results)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the sweep of {recipe} stopped (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_columns(f: dict) -> str:
    """RSS above the pre-sweep level and CUDA max allocated, each against the model's size."""
    above = f["peak"] - f["before"]
    cuda = "-"
    if f["cuda_peak"] is not None:
        cuda = f"{f['cuda_peak'] / 2**20:.0f} MiB = {f['cuda_peak'] / f['model']:.2f}x"
    return (
        f"{f['before'] / 2**20:>7.0f} MiB | {f['peak'] / 2**20:>5.0f} MiB | "
        f"{above / 2**20:>9.0f} MiB | {above / f['model']:>10.2f} | {cuda}"
    )


MEMORY_HEADER = "RSS before | peak RSS | peak - before | x fp model | CUDA max allocated"


def measure_memory(folder: Path, checkpoint: Path) -> None:
    model_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"\n1. Peak memory of a local sweep vs the fp model ({model_bytes / 2**20:.0f} MiB)")
    print(f"   N quantizers | cells | {MEMORY_HEADER}")
    eval_ = "{perplexity: [{data: embedded, seq_len: 64, max_windows: 1}]}"
    for n in (0, 1, 4, 8):
        recipe = write_recipe(folder / f"mem{n}.yaml", f"mem{n}", checkpoint, QUANTIZERS[:n], eval_)
        f = run_memory_child(recipe, folder / "res")
        print(f"   {n:>12} | {f['cells']:>5} | {memory_columns(f)}")


# --scale-down: the shape every random checkpoint takes, and caps on the evaluation's work
CPU_SHAPE = dict(
    num_hidden_layers=2,
    hidden_size=128,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=4096,
)


def adapted(recipe: Path, out: Path, scale_down: bool) -> Path:
    """A copy of `recipe` in `out` without the quantizers whose library is not installed (one
    line each), and with --scale-down CPU-sized (see CPU_SHAPE) and named <name>-cpu."""
    data = yaml.safe_load(recipe.read_text())
    kept = []
    for quantizer in data.get("quantizers", []):
        missing = missing_library(quantizer)
        if missing:
            print(f"skipped quantizer {quantizer['name']}: {missing} is not installed")
        else:
            kept.append(quantizer)
    data["quantizers"] = kept
    if scale_down:
        scale(data)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{data['name']}.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def missing_library(quantizer: dict) -> str | None:
    """The distribution a library-backed quantizer (recipe fields) needs, when it is not
    installed."""
    from importlib.metadata import PackageNotFoundError, version

    from qbench.api import quantizer as validated

    package = getattr(validated(**quantizer).rounding, "PACKAGE", None)  # LibraryStep's
    if package is None:
        return None
    try:
        version(package)
    except PackageNotFoundError:
        return package
    return None


def scale(data: dict) -> None:
    """CPU-sized in place: random checkpoints CPU_SHAPE in float32, fewer windows, documents
    and calibration sequences; named <name>-cpu."""
    data["name"] = f"{data['name']}-cpu"
    for checkpoint in data["checkpoints"]:
        if "random" in checkpoint:
            checkpoint["random"] |= CPU_SHAPE
            checkpoint["dtype"] = "float32"
    for spec in data["eval"]["perplexity"]:
        spec |= {"seq_len": min(spec.get("seq_len", 2048), 256), "max_windows": 4}
    data["eval"]["tasks"] = [
        (t if isinstance(t, dict) else {"name": t}) | {"limit": 20}
        for t in data["eval"].get("tasks", [])
    ]
    for quantizer in data["quantizers"]:
        if "calibration" in quantizer:
            quantizer["calibration"] = quantizer["calibration"] | {"sequences": 4, "seq_len": 128}


def measure_recipe(recipe: Path, results: Path, scale_down: bool) -> None:
    """The peak memory of one recipe's sweep against its first checkpoint's size."""
    recipe = adapted(recipe, results, scale_down)
    print(f"measuring {recipe}" + (" (scaled down for the CPU)" if scale_down else ""))
    f = run_memory_child(recipe, results)
    print(f"\n3. Sweep of {recipe}: {f['cells']} cells in {f['seconds']:.0f} s, model "
          f"{f['model'] / 2**20:.0f} MiB (parameters, in the dtype it loads in)")  # fmt: skip
    print(f"   {MEMORY_HEADER}\n   {memory_columns(f)}")
    for label in f["failed"]:
        print(f"   FAILED cell: {label} (its record under {results} says why)")


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
    parser.add_argument("--recipe", type=Path, help="measure this recipe's sweep instead")
    parser.add_argument("--results", type=Path, help="its results folder (with --recipe)")
    parser.add_argument("--scale-down", action="store_true", help="a CPU-sized copy (--recipe)")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(Path(args.memory_child[0]), Path(args.memory_child[1]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"qbench sweep benchmark on {device}, torch {torch.__version__}")
    if args.recipe:
        if args.results is None:
            parser.error("--recipe needs --results DIR")
        measure_recipe(args.recipe, args.results, args.scale_down)
        return
    with tempfile.TemporaryDirectory(prefix="qbench-sweep-bench-") as tmp:
        folder = Path(tmp)
        if args.only != "executors":
            measure_memory(folder, make_checkpoint(folder / "big", args.hidden, args.layers))
        if args.only != "memory":
            measure_executors(folder, make_checkpoint(folder / "small", 256, 4))


if __name__ == "__main__":
    main()
