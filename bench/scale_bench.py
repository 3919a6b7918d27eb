"""Scaling benchmarks, measured in one run (figures, not assertions):

1. depth: GPTQ and SmoothQuant calibration time on random Llamas of 4, 8 and 16 decoder
   blocks (same width, same calibration text), with the number of decoder-block forwards
   each method runs (counted by hooks: one per block and calibration batch) and the ratios
   16 / 4 of both. Linear in depth gives 4; GPTQ, which calibrates block i by running blocks
   0..i from the embeddings, gives 16*17 / (4*5) = 13.6 block forwards.
2. block: time of each method on one 7B-shaped decoder block (Llama-2-7B: hidden 4096, MLP
   11008, 32 heads) on this machine, and an estimate for a 32-block model:
   32 x (its time - its block forwards x one forward's time) + the block forwards it runs on
   32 blocks (counted on a narrow 32-block model) x one forward's time. Embeddings and lm_head
   (vocabulary 2048 here) are negligible.

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale_bench.py [--only depth|block]
        [--width 256] [--sequences 16 --seq-len 128]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from collections.abc import Iterator

import torch
from common import describe, seconds, table
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from qbench.checkpoints.load import device
from qbench.checkpoints.train import PRESETS, train_tokenizer
from qbench.data.calibration import CalibrationSpec, calibration_ids
from qbench.data.sources import embedded_rows
from qbench.quant import METHODS, quantize_


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
    return LlamaForCausalLM(config).to(device()).eval()


@contextlib.contextmanager
def block_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Count the decoder blocks' forward calls inside the block (one per block and batch)."""
    count = [0]
    hooks = [
        layer.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for layer in model.model.layers
    ]
    try:
        yield count
    finally:
        for hook in hooks:
            hook.remove()


def quantize(model: nn.Module, name: str, config: dict, tokenizer: PreTrainedTokenizerBase):
    """(seconds, block forwards) of quantizing a copy of `model` with `config`."""
    spec = METHODS.get(config["method"]).model_validate({"name": name.replace(" ", "-"), **config})
    work = copy.deepcopy(model)
    with block_forwards(work) as count:
        elapsed = seconds(lambda: quantize_(work, spec, tokenizer))
    return elapsed, count[0]


def depth_table(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> None:
    calibration = {"data": "embedded", "sequences": args.sequences, "seq_len": args.seq_len}
    chosen = {
        k: v for k, v in methods(calibration).items() if k in ("gptq w4a16", "smoothquant w8a8")
    }
    figures: dict[str, dict[int, tuple[float, int]]] = {name: {} for name in chosen}
    for layers in (4, 8, 16):
        model = llama(args.width, 3 * args.width, args.width // 64, layers, len(tokenizer))
        for name, config in chosen.items():
            figures[name][layers] = quantize(model, name, config, tokenizer)
    rows = []
    for name, by_depth in figures.items():
        (t4, p4), (t8, p8), (t16, p16) = (by_depth[d] for d in (4, 8, 16))
        rows.append(
            [
                name,
                f"{t4:.2f}",
                f"{t8:.2f}",
                f"{t16:.2f}",
                f"{t16 / t4:.1f}",
                f"{p4} / {p8} / {p16}",
                f"{p16 / p4:.1f}",
            ]
        )
    header = ["method", "4 blocks s", "8 blocks s", "16 blocks s", "time 16 / 4",
              "block forwards 4 / 8 / 16", "forwards 16 / 4"]  # fmt: skip
    title = (f"1. Calibration vs depth: width {args.width}, MLP {3 * args.width}, "
             f"{args.sequences} x {args.seq_len} calibration tokens (linear: 4.0)")  # fmt: skip
    table(title, header, rows)


def block_table(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> None:
    calibration = {"data": "embedded", "sequences": args.sequences, "seq_len": args.seq_len}
    model = llama(4096, 11008, 32, 1, len(tokenizer))
    print(describe(model))
    spec = CalibrationSpec.model_validate(calibration)
    batch = calibration_ids(tokenizer, spec)[: spec.batch_size].to(device())
    with torch.no_grad():
        forward = statistics.median(seconds(lambda: model(batch)) for _ in range(3))
    narrow = {layers: llama(64, 172, 4, layers, len(tokenizer)) for layers in (1, 32)}
    rows = []
    for name, config in methods(calibration).items():
        elapsed, passes = quantize(model, name, config, tokenizer)
        passes_32 = quantize(narrow[32], name, config, tokenizer)[1]
        estimate = 32 * (elapsed - passes * forward) + passes_32 * forward
        rows.append([name, f"{elapsed:.1f}", str(passes), str(passes_32),
                     f"{estimate:.0f} s = {estimate / 60:.1f} min"])  # fmt: skip
    header = ["method", "1 block s", "block forwards", "block forwards, 32 blocks",
              "estimate for 32 blocks"]  # fmt: skip
    title = (f"2. One 7B-shaped block (4096 / 11008 / 32 heads), {args.sequences} x "
             f"{args.seq_len} calibration tokens; one block forward on a batch of "
             f"{len(batch)}: {forward:.2f} s")  # fmt: skip
    table(title, header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["depth", "block"], help="one of the two parts")
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
