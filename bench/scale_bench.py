"""Scaling benchmarks, measured in one run (figures, not assertions):

1. depth: GPTQ and SmoothQuant calibration time on random Llamas of 4, 8 and 16 decoder
   blocks (same width, same calibration text), with the number of decoder-block forward calls
   each method makes (counted by hooks: one per block and calibration batch, the capture pass
   that stops at the last block included) and the ratios 16 / 4 of both. Linear in depth
   gives 4: both calibrate block by block on cached inputs (qbench.quant.blockwise); GPTQ
   calibrating block i by running blocks 0..i from the embeddings would give 16*17 / (4*5) =
   13.6 block forwards.
2. block: time of each method on one 7B-shaped decoder block (Llama-2-7B: hidden 4096, MLP
   11008, 32 heads) on this machine, and an estimate for a 32-block model: 32 x its time on
   one block (its own calibration forwards and hooks, rounding, transforms) + the forwards it
   runs through blocks before the one it calibrates (the block forwards counted on a narrow
   32-block model, less 32 x those on one block) x a plain block forward's time. Embeddings
   and lm_head (vocabulary 2048 here) are negligible.
Each time is the fastest of up to 3 runs, repeated while they took under 30 s together.

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale_bench.py [--only depth|block]
        [--width 256] [--sequences 16 --seq-len 128] [--methods "gptq w4a16" ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from common import describe, seconds, table
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from qbench.api import quantize_, quantizer
from qbench.checkpoints.catalog import PRESETS
from qbench.checkpoints.dispatch import default_device
from qbench.data.bpe import train_tokenizer
from qbench.data.calibration import CalibrationSpec
from qbench.data.sources import embedded_rows
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
        "rotation w4a4": {"method": "rotation", **w4a4},
        "gptq w4a16": {"method": "gptq", "calibration": calibration, "weights": {"bits": 4}},
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
) -> tuple[float, Forwards]:
    """(seconds, block forwards) of quantizing a copy of `model` with `config`: the fastest of
    up to REPEATS runs, repeated while they took less than REPEAT_BUDGET_S together (short
    runs are the ones that load from other processes distorts)."""
    spec = quantizer(name=name.replace(" ", "-").replace("+", "and"), **config)
    runs: list[tuple[float, Forwards]] = []
    while len(runs) < REPEATS and sum(t for t, _ in runs) < REPEAT_BUDGET_S:
        work = copy.deepcopy(model)
        with block_forwards(work) as forwards:
            runs.append((seconds(lambda work=work: quantize_(work, spec, tokenizer)), forwards))
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
            figures[name][layers] = quantize(model, name, config, tokenizer)
            print(f"  {name}, {layers} blocks: {figures[name][layers][0]:.1f} s", flush=True)
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
    rows = []
    for name, config in methods(calibration).items():
        if args.methods and name not in args.methods:
            continue
        elapsed, forwards = quantize(model, name, config, tokenizer)
        passes_32 = quantize(narrow, name, config, tokenizer)[1].count
        extra = passes_32 - 32 * forwards.count  # forwards through the blocks before block i
        estimate = 32 * elapsed + extra * plain
        print(f"  {name}: {elapsed:.1f} s", flush=True)
        rows.append([name, f"{elapsed:.1f}", f"{forwards.count} ({forwards.seconds:.1f} s)",
                     str(passes_32), f"{estimate:.0f} s = {estimate / 60:.1f} min"])  # fmt: skip
    header = ["method", "1 block s", "block forwards (their s)", "block forwards, 32 blocks",
              "estimate for 32 blocks"]  # fmt: skip
    title = (f"2. One 7B-shaped block (4096 / 11008 / 32 heads), {args.sequences} x "
             f"{args.seq_len} calibration tokens; a plain block forward on a batch of "
             f"{len(batch)} sequences: {plain:.2f} s")  # fmt: skip
    table(title, header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["depth", "block"], help="one of the two parts")
    parser.add_argument(
        "--methods", nargs="+", choices=list(methods({})), help="block: only these methods"
    )
    parser.add_argument("--width", type=int, default=256, help="hidden size of the depth models")
    parser.add_argument("--sequences", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    args = parser.parse_args()
    tokenizer = train_tokenizer(embedded_rows("train"), PRESETS.get("tiny").vocab_size)
    on = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"qbench scaling benchmark on {on}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.only != "block":
        depth_table(args, tokenizer)
    if args.only != "depth":
        block_table(args, tokenizer)


if __name__ == "__main__":
    main()
