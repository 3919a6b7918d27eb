"""Helpers shared by the benchmark scripts: the model to measure, timing, tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from qbench.checkpoints.catalog import PRESETS
from qbench.checkpoints.dispatch import default_device
from qbench.checkpoints.load import DTYPES, load_checkpoint
from qbench.data.bpe import train_tokenizer
from qbench.data.sources import embedded_rows
from qbench.quant.formats.fused import MODE_VARIABLE
from qbench.recipe import CheckpointSpec


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", help="a local HF checkpoint (default: the trained tiny preset)")
    parser.add_argument(
        "--random-width",
        type=int,
        help="instead: a randomly initialised Llama of this hidden size (MLP 3x, heads of 64) "
        "with the tiny preset's tokenizer, e.g. 512 (about 27M parameters with 8 layers)",
    )
    parser.add_argument("--layers", type=int, default=8, help="layers of --random-width")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype")


def load_model(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model the arguments name, in eval mode on the default device (CUDA if any)."""
    if args.random_width:
        # the tiny preset's tokenizer (the same training run), without training the model
        tokenizer = train_tokenizer(embedded_rows("train"), PRESETS.get("tiny").vocab_size)
        width = args.random_width
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=3 * width,
            num_hidden_layers=args.layers,
            num_attention_heads=width // 64,
            num_key_value_heads=max(1, width // 128),
            max_position_embeddings=2048,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(default_device(), DTYPES[args.dtype]).eval()
        return model, tokenizer
    spec = {"path": args.path} if args.path else {"train": {"preset": "tiny"}}
    checkpoint = CheckpointSpec(name="bench", dtype=args.dtype, **spec)
    return load_checkpoint(checkpoint, progress=False)


def describe(model: PreTrainedModel) -> str:
    params = sum(p.numel() for p in model.parameters())
    on = "cuda, " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    cfg = model.config
    return (
        f"model: {cfg.model_type}, {params / 1e6:.1f}M parameters (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers), {next(model.parameters()).dtype}; "
        f"{on}, {torch.get_num_threads()} threads"
    )


@contextlib.contextmanager
def fast_quant(mode: str) -> Iterator[None]:
    """QBENCH_FAST_QUANT set to `mode` ('0': reference, '1': fast path) inside the block."""
    saved = os.environ.get(MODE_VARIABLE)
    os.environ[MODE_VARIABLE] = mode
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(MODE_VARIABLE)
        else:
            os.environ[MODE_VARIABLE] = saved


def seconds(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions run one after another in each round,
    so that load from other processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
