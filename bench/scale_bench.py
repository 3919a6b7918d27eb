"""Scaling benchmarks, measured in one run (figures, not assertions):

1. depth: GPTQ and SmoothQuant calibration time on random Llamas of 4, 8 and 16 decoder
   blocks (same width, same calibration text), with the number of decoder-block forward calls
   each method makes (counted by hooks: one per block and calibration batch, the capture pass
   that stops at the last block included) and the ratios 16 / 4 of both. Linear in depth
   gives 4: both calibrate block by block on cached inputs (qbench.quant.blockwise); GPTQ
   calibrating block i by running blocks 0..i from the embeddings would give 16*17 / (4*5) =
   13.6 block forwards.
2. block: time of each method on one 7B-shaped decoder block (Llama-2-7B: hidden 4096, MLP
   11008, 32 heads) on this machine, wall and CPU seconds, its CPU time against RTN W4A4's and
   GPTQ W4A16's (the goals: the clip search under 5x RTN, AWQ under 2x GPTQ), and an estimate
   for a 32-block model: 32 x its time on one block (its own calibration forwards and hooks,
   rounding, transforms) + the forwards it runs through blocks before the one it calibrates
   (the block forwards counted on a narrow 32-block model, less 32 x those on one block) x a
   plain block forward's time. Embeddings and lm_head (vocabulary 2048 here) are negligible.
   Each time is the fastest of up to 3 runs, repeated while they took under 30 s together.
3. offload: peak resident memory (and time) of quantizing a checkpoint with half its decoder
   blocks and its embedding on disk (accelerate's offload; qbench onloads one block at a time)
   against quantizing the whole model, per method, each in a fresh process (the peak above
   the process's memory before loading), with the estimate "resident part + the largest
   region onloaded at once (a block; the embedding table for rotation) + cached calibration
   activations + the method's state (GPTQ: two blocks' Hessians)" beside it. With
   MALLOC_MMAP_THRESHOLD_=131072 in the environment (the children inherit it) the resident
   set follows the live tensors; glibc's default keeps freed buffers in its heap (the
   table's title says which was in effect).
4. sweep: with --path (a Hugging Face folder or a .gguf file, e.g. SmolLM2-135M's in
   ../shared/models), a sweep of fp and one cell per method through `qbench run`: each cell's
   quantization and total seconds (the records' quantize_s and wall_time_s), against the RTN
   W4A4 cell's.

The "before" figures of docs/speed.md come from this script run on main's code
(PYTHONPATH=<a checkout of main>): it uses the public API and the CLI only.

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale_bench.py [--only depth|block|offload|sweep]
        [--width 256] [--sequences 16 --seq-len 128] [--methods "gptq w4a16" ...]
        [--offload-width 1024 --offload-layers 8] [--path DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from common import describe, seconds, table
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from qbench.api import quantize_, quantizer
from qbench.checkpoints.catalog import PRESETS
from qbench.checkpoints.dispatch import default_device
from qbench.data.bpe import train_tokenizer
from qbench.data.calibration import CalibrationSpec
from qbench.data.sources import data_dir, embedded_rows
from qbench.quant.context import sample_windows

REPEATS, REPEAT_BUDGET_S = 3, 30.0


def methods(calibration: dict) -> dict[str, dict]:
    w4a4 = {"weights": {"bits": 4}, "activations": {"bits": 4}}
    return {
        "rtn w4a16 g128": {"method": "rtn", "weights": {"bits": 4, "group": 128}},
        "rtn w4a4": {"method": "rtn", **w4a4},
        "rtn w4a4 clip-search": {
            "method": "rtn",
            **w4a4,
            "weights": {"bits": 4, "clip_search": True},
        },
        "smoothquant w8a8": {
            "method": "smoothquant",
            "calibration": calibration,
            "weights": {"bits": 8},
            "activations": {"bits": 8},
        },
        "awq w4a16 g128": {
            "method": "awq",
            "calibration": calibration,
            "weights": {"bits": 4, "group": 128},
        },
        "awq w4a16 g64": {  # (SmolLM2's widths, 576 and 1536, are no multiple of 128)
            "method": "awq",
            "calibration": calibration,
            "weights": {"bits": 4, "group": 64},
        },
        "rotation w4a4": {"method": "rotation", **w4a4},
        "gptq w4a16": {"method": "gptq", "calibration": calibration, "weights": {"bits": 4}},
        "smoothquant + gptq w4a8": {
            "transforms": [{"transform": "smoothquant", "calibration": calibration}],
            "rounding": {"method": "gptq", "calibration": calibration},
            "weights": {"bits": 4},
            "activations": {"bits": 8},
        },
        "gptq + rotation w4a4": {
            "method": "gptq",
            "rotate": True,
            "calibration": calibration,
            **w4a4,
        },
        "bitsandbytes int8": {"method": "bitsandbytes", "scheme": "int8"},
        "bitsandbytes nf4": {"method": "bitsandbytes", "scheme": "nf4"},
        "quanto qint4": {"method": "quanto", "weight_qtype": "qint4"},
    }


def llama(hidden: int, mlp: int, heads: int, layers: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(default_device()).eval()


@dataclass
class Forwards:
    """Decoder-block forward calls (one per block and calibration batch) and their seconds,
    the calibration hooks inside them included."""

    count: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def block_forwards(model: nn.Module) -> Iterator[Forwards]:
    """Count and time the decoder blocks' forward calls inside the `with` block."""
    forwards, starts = Forwards(), []

    def before(*_: object) -> None:
        forwards.count += 1
        starts.append(time.perf_counter())

    def after(*_: object) -> None:
        forwards.seconds += time.perf_counter() - starts.pop()

    hooks = [hook for layer in model.model.layers for hook in (
        layer.register_forward_pre_hook(before), layer.register_forward_hook(after))]  # fmt: skip
    try:
        yield forwards
    finally:
        for hook in hooks:
            hook.remove()


def quantize(
    model: nn.Module, name: str, config: dict, tokenizer: PreTrainedTokenizerBase
) -> tuple[float, float, Forwards]:
    """(wall seconds, CPU seconds, block forwards) of quantizing a copy of `model` with
    `config`: the fastest of up to REPEATS runs, repeated while they took less than
    REPEAT_BUDGET_S together (short runs are the ones that load from other processes
    distorts)."""
    spec = quantizer(name=name.replace(" ", "-").replace("+", "and"), **config)
    runs: list[tuple[float, float, Forwards]] = []
    while len(runs) < REPEATS and sum(t for t, _, _ in runs) < REPEAT_BUDGET_S:
        work = copy.deepcopy(model)
        with block_forwards(work) as forwards:
            cpu = time.process_time()
            wall = seconds(lambda work=work: quantize_(work, spec, tokenizer))
            runs.append((wall, time.process_time() - cpu, forwards))
        del work
    return min(runs, key=lambda run: run[0])


def depth_table(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> None:
    calibration = {"data": "embedded", "sequences": args.sequences, "seq_len": args.seq_len}
    chosen = {
        k: v for k, v in methods(calibration).items() if k in ("gptq w4a16", "smoothquant w8a8")
    }
    figures: dict[str, dict[int, tuple[float, Forwards]]] = {name: {} for name in chosen}
    for layers in (4, 8, 16):
        model = llama(args.width, 3 * args.width, args.width // 64, layers, len(tokenizer))
        for name, config in chosen.items():
            if layers == 4:  # warm-up: first calls (tokenizing the text, kernels) not timed
                quantize(model, name, config, tokenizer)
            wall, _, forwards = quantize(model, name, config, tokenizer)
            figures[name][layers] = (wall, forwards)
            print(f"  {name}, {layers} blocks: {wall:.1f} s", flush=True)
    rows = []
    for name, by_depth in figures.items():
        (t4, f4), (t8, f8), (t16, f16) = (by_depth[d] for d in (4, 8, 16))
        rows.append(
            [
                name,
                f"{t4:.1f} / {t8:.1f} / {t16:.1f}",
                f"{t16 / t4:.1f}",
                f"{f4.count} / {f8.count} / {f16.count}",
                f"{f16.count / f4.count:.1f}",
                f"{f4.seconds:.1f} / {f8.seconds:.1f} / {f16.seconds:.1f}",
                f"{f16.seconds / f4.seconds:.1f}",
            ]
        )
    header = ["method", "time s (4 / 8 / 16 blocks)", "time 16 / 4", "block forwards",
              "forwards 16 / 4", "in block forwards s", "16 / 4"]  # fmt: skip
    title = (f"1. Calibration vs depth: width {args.width}, MLP {3 * args.width}, "
             f"{args.sequences} x {args.seq_len} calibration tokens (linear: 4.0)")  # fmt: skip
    table(title, header, rows)


def block_table(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> None:
    calibration = {"data": "embedded", "sequences": args.sequences, "seq_len": args.seq_len}
    model = llama(4096, 11008, 32, 1, len(tokenizer))
    print(describe(model))
    spec = CalibrationSpec.model_validate(calibration)
    batch = sample_windows(tokenizer, spec, seed=0)[: spec.batch_size].to(default_device())
    with torch.no_grad():
        plain = min(seconds(lambda: model(batch)) for _ in range(3))
    narrow = llama(128, 384, 2, 32, len(tokenizer))  # counts the block forwards of 32 blocks
    figures = {}
    for name, config in methods(calibration).items():
        if args.methods and name not in args.methods:
            continue
        wall, cpu, forwards = quantize(model, name, config, tokenizer)
        passes_32 = quantize(narrow, name, config, tokenizer)[2].count
        extra = passes_32 - 32 * forwards.count  # forwards through the blocks before block i
        figures[name] = (wall, cpu, forwards, passes_32, 32 * wall + extra * plain)
        print(f"  {name}: {wall:.1f} s ({cpu:.1f} s CPU)", flush=True)
    rows = []
    for name, (wall, cpu, forwards, passes_32, estimate) in figures.items():
        ratios = [f"{cpu / figures[r][1]:.2f}" if r in figures else "-" for r in RATIOS_TO]
        rows.append([name, f"{wall:.1f} ({cpu:.1f})", *ratios,
                     f"{forwards.count} ({forwards.seconds:.1f} s)", str(passes_32),
                     f"{estimate:.0f} s = {estimate / 60:.1f} min"])  # fmt: skip
    header = ["method", "1 block: wall s (CPU s)", *(f"CPU / {r}" for r in RATIOS_TO),
              "block forwards (their s)", "block forwards, 32 blocks",
              "estimate for 32 blocks"]  # fmt: skip
    title = (f"2. One 7B-shaped block (4096 / 11008 / 32 heads), {args.sequences} x "
             f"{args.seq_len} calibration tokens; a plain block forward on a batch of "
             f"{len(batch)} sequences: {plain:.2f} s")  # fmt: skip
    table(title, header, rows)
    for name, reference, goal in GOALS:
        if name in figures and reference in figures:
            ratio = figures[name][1] / figures[reference][1]
            print(f"goal: {name} under {goal}x {reference} (CPU time): {ratio:.2f}x")


RATIOS_TO = ("rtn w4a4", "gptq w4a16")
GOALS = (("rtn w4a4 clip-search", "rtn w4a4", 5), ("awq w4a16 g128", "gptq w4a16", 2))
OFFLOAD_METHODS = ("rtn w4a4", "smoothquant w8a8", "gptq w4a16", "rotation w4a4")


def half_on_disk(layers: int) -> dict[str, str]:
    """The embedding and the second half of the decoder blocks on disk, the rest on the CPU."""
    return {
        "model.embed_tokens": "disk",
        **{f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)},
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }


def offload_child(layout: str, checkpoint: str, method: str, calibration: dict) -> None:
    """Load `checkpoint` whole or half on disk, quantize it with `method`; print JSON: the
    process's RSS before loading and once loaded, its peak RSS while quantizing, its peak
    anonymous RSS (RssAnon sampled every 5 ms: memory not backed by a file, so without the
    pages of memory-mapped weights and offload files) and the same before loading, the bytes
    of the resident parameters, seconds."""
    import psutil
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before, before_anon = psutil.Process().memory_info().rss, _status_bytes("RssAnon")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory(prefix="offload-") as folder:
        config = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="meta").config
        device_map = half_on_disk(config.num_hidden_layers) if layout == "disk" else None
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, device_map=device_map, offload_folder=folder
        )
        resident = sum(p.numel() * 4 for p in model.parameters() if p.device.type != "meta")
        loaded = psutil.Process().memory_info().rss
        spec = quantizer(name="m", **methods(calibration)[method])
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
        cpu, start = time.process_time(), time.perf_counter()
        with _anonymous_peak() as anonymous:
            quantize_(model, spec, tokenizer)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        peak = _status_bytes("VmHWM")
    figures = {"before": before, "loaded": loaded, "peak": peak, "resident": resident,
               "before_anon": before_anon, "peak_anon": anonymous[0]}  # fmt: skip
    print(json.dumps({**figures, "seconds": wall, "cpu": cpu}))


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: peak resident since the last reset;
    RssAnon: anonymous resident memory now), in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


@contextlib.contextmanager
def _anonymous_peak() -> Iterator[list[int]]:
    """[the largest RssAnon seen], sampled every 5 ms by a thread while the block runs."""
    import threading

    peak, done = [_status_bytes("RssAnon")], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _status_bytes("RssAnon"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def offload_table(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> None:
    calibration = {"data": "embedded", "sequences": args.sequences, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as folder:
        width, layers = args.offload_width, args.offload_layers
        model = llama(width, width * 11 // 4 // 128 * 128, width // 64, layers, 32000)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        total = sum(p.numel() * 4 for p in model.parameters())
        block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
        embedding = model.model.embed_tokens.weight.numel() * 4
        linears = [m for m in model.model.layers[0].modules() if isinstance(m, nn.Linear)]
        hessians = sum(m.in_features**2 * 8 for m in linears)  # GPTQ's, float64, one block
        del model
        activations = 2 * args.sequences * args.seq_len * width * 4  # a block's inputs, outputs
        rows = []
        for method in OFFLOAD_METHODS:
            found = {
                layout: _run_child(["--offload-child", layout, folder, method], calibration)
                for layout in ("whole", "disk")
            }
            whole, disk = (found[k]["peak"] - found[k]["before"] for k in ("whole", "disk"))
            anon = {k: found[k]["peak_anon"] - found[k]["before_anon"] for k in found}
            # the region onloaded at once: a block, or the embedding table rotation rewrites;
            # GPTQ's Hessians of two blocks (block 0's are kept for the checkpoint's cells)
            region = embedding if method.startswith("rotation") else block
            state = 2 * hessians if method.startswith("gptq") else 0
            estimate = found["disk"]["resident"] + region + activations + state
            rows.append([method, f"{whole / MIB:.0f} ({found['whole']['cpu']:.1f} s CPU)",
                         f"{disk / MIB:.0f} ({found['disk']['cpu']:.1f} s CPU)",
                         f"{disk / whole:.2f}", f"{anon['whole'] / MIB:.0f}",
                         f"{anon['disk'] / MIB:.0f}", f"{anon['disk'] / anon['whole']:.2f}",
                         f"{found['disk']['resident'] / MIB:.0f}",
                         f"{estimate / MIB:.0f}", f"{disk / estimate:.2f}"])  # fmt: skip
            shares = f"{whole / MIB:.0f} / {disk / MIB:.0f} MiB"
            anonymous = f"{anon['whole'] / MIB:.0f} / {anon['disk'] / MIB:.0f} MiB"
            print(f"  {method}: whole / half on disk {shares}; anonymous {anonymous}")
    header = ["method", "whole: peak MiB (CPU s)", "half on disk: peak MiB (CPU s)",
              "disk / whole", "whole: peak anonymous MiB", "half on disk: peak anonymous MiB",
              "anonymous disk / whole", "resident part MiB",
              "estimate: resident + largest region + activations + state, MiB",
              "peak / estimate (half on disk)"]  # fmt: skip
    title = (f"3. Quantizing with half the blocks and the embedding on disk: random Llama, "
             f"hidden {width}, {layers} blocks, vocabulary 32000, {total / MIB:.0f} MiB in "
             f"fp32 (one block {block / MIB:.0f} MiB), {args.sequences} x {args.seq_len} "
             f"calibration tokens ({activations / MIB:.0f} MiB of block inputs and outputs); "
             "peak RSS while quantizing, above the process's RSS before loading; peak anonymous "
             "RSS (not file-backed: no mapped weight or offload pages), the same; glibc's "
             f"mmap threshold: {ALLOCATOR})")  # fmt: skip
    table(title, header, rows)


# MALLOC_MMAP_THRESHOLD_=131072 fixes glibc's threshold: every buffer of 128 KiB or more is
# mapped and returned at free, so RSS follows the live tensors; by default the threshold rises
# to the largest buffer freed, and freed activations and weight copies stay in the heap.
ALLOCATOR = (
    f"fixed at {os.environ['MALLOC_MMAP_THRESHOLD_']} bytes (MALLOC_MMAP_THRESHOLD_)"
    if "MALLOC_MMAP_THRESHOLD_" in os.environ
    else "glibc's default (dynamic)"
)


def _run_child(arguments: list[str], calibration: dict) -> dict:
    command = [sys.executable, __file__, *arguments, "--calibration", json.dumps(calibration)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


SWEEP_METHODS = ("rtn w4a4", "rtn w4a4 clip-search", "smoothquant w8a8", "awq w4a16 g64",
                 "rotation w4a4", "gptq w4a16", "gptq + rotation w4a4")  # fmt: skip


def sweep_table(args: argparse.Namespace) -> None:
    """fp and one cell per method on the checkpoint at --path, run by `qbench run`."""
    from qbench.cli import main as qbench
    from qbench.record import Record

    calibration = {"data": "embedded", "sequences": args.sequences, "seq_len": args.seq_len}
    chosen = {k: v for k, v in methods(calibration).items() if k in SWEEP_METHODS}
    root = data_dir()
    text = "wikitext2" if root is not None and (root / "wikitext-2-raw").is_dir() else "embedded"
    evaluation = f"{{perplexity: [{{data: {text}, seq_len: 512, max_windows: 8}}]}}"
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as folder:
        for name, config in chosen.items():
            entry = json.dumps({"name": name.replace(" ", "-").replace("+", "and"), **config})
            recipe = Path(folder) / "sweep.yaml"
            source = "gguf" if args.path.suffix == ".gguf" else "path"
            recipe.write_text(
                f"name: sweep\ncheckpoints: [{{name: model, {source}: {args.path}}}]\n"
                f"quantizers: [{entry}]\neval: {evaluation}\n"
            )
            cpu = time.process_time()
            qbench(["run", str(recipe), "--results", str(Path(folder) / "results"),
                    "--no-progress"])  # fmt: skip
            cpu = time.process_time() - cpu
            for path in (Path(folder) / "results" / "sweep" / "runs").glob("*.json"):
                record = Record.model_validate_json(path.read_text())
                figures.setdefault(record.quantizer.name, (record, cpu))
            print(f"  {name}: {cpu:.1f} s CPU", flush=True)
    rtn = figures.get("rtn-w4a4")
    for name, (record, cpu) in figures.items():
        if record.metrics is None:  # refused or failed: its reason instead of figures
            reason = record.error.message[:120] if record.error else ""
            rows.append([name, record.status, "-", "-", reason, f"{cpu:.1f}"])
            continue
        quantize_s = record.quantize_s or 0.0
        ratio = f"{record.wall_time_s / rtn[0].wall_time_s:.2f}" if rtn else "-"
        rows.append([name, f"{quantize_s:.1f}", f"{record.wall_time_s:.1f}", ratio,
                     f"{record.metrics.perplexity[text]:.2f}", f"{cpu:.1f}"])  # fmt: skip
    header = ["cell", "quantize s", "cell s", "cell / rtn w4a4 cell", f"{text} ppl",
              "CPU s of its `qbench run` (load included)"]  # fmt: skip
    title = (f"4. A sweep of {args.path}: {args.sequences} x {args.seq_len} calibration "
             f"tokens, perplexity on 8 windows of 512 tokens of {text}")  # fmt: skip
    table(title, header, rows)


MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["depth", "block", "offload", "sweep"],
                        help="one of the parts (default: depth, block, offload)")  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", choices=list(methods({})), help="block: only these methods"
    )
    parser.add_argument("--width", type=int, default=256, help="hidden size of the depth models")
    parser.add_argument("--sequences", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    parser.add_argument("--offload-width", type=int, default=1024, help="offload: hidden size")
    parser.add_argument("--offload-layers", type=int, default=8, help="offload: decoder blocks")
    parser.add_argument("--path", type=Path, help="sweep: a Hugging Face folder or a .gguf file")
    parser.add_argument("--offload-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offload_child:
        offload_child(*args.offload_child, args.calibration)
        return
    tokenizer = train_tokenizer(embedded_rows("train"), PRESETS.get("tiny").vocab_size)
    on = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"qbench scaling benchmark on {on}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.only in (None, "depth"):
        depth_table(args, tokenizer)
    if args.only in (None, "block"):
        block_table(args, tokenizer)
    if args.only in (None, "offload"):
        offload_table(args, tokenizer)
    if args.only == "sweep":
        if args.path is None:
            parser.error("--only sweep needs --path DIR")
        sweep_table(args)


if __name__ == "__main__":
    main()
