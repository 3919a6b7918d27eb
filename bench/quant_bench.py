"""Quantizer benchmark, measured in one run on one model (a script, not a test).

Prints:
1. quantization time per method (W4A4) and the peak extra memory while quantizing (CPU:
   resident set size sampled every 2 ms; CUDA: max allocated), relative to the fp model's size;
2. forward time of each fake-quant format (weights and activations) relative to the fp model,
   through the eager reference and through the compiled fast path (qbench.quant.fused), with
   the fast path's first call (compilation) apart and the largest logit difference between
   the two paths;
3. one linear layer of the model's width (x [tokens, hidden] -> intermediate): fake-quant of
   x alone, eager vs compiled (the fused kernel), and the whole layer vs its fp matmul.

    OMP_NUM_THREADS=2 .venv/bin/python bench/quant_bench.py [--random-width 512] [--repeats 5]
        [--dtype bfloat16] [--only quantization forward layer] [--formats int4 nvfp4 ...]

Without a GPU everything runs on the CPU; with one, on CUDA (same script).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import statistics
import sys
import threading
import time

import psutil
import torch
from common import (
    add_model_arguments,
    describe,
    fast_quant,
    interleaved,
    load_model,
    median_ratio,
    seconds,
    table,
)
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

from qbench.api import quantize_, quantizer
from qbench.quant.formats import fused
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import ActivationQuant

FORMATS = {
    "int8": {"bits": 8},
    "int4": {"bits": 4},
    "fp8_e4m3": {"format": "fp8_e4m3"},
    "fp4_e2m1 g16": {"format": "fp4_e2m1", "group": 16},
    "mxfp4": {"format": "mxfp4"},
    "nvfp4": {"format": "nvfp4"},
}


TABLES = ["quantization", "forward", "layer"]


def methods(sequences: int) -> dict[str, dict]:
    calibration = {"data": "embedded", "sequences": sequences, "seq_len": 128}
    w4a4 = {"weights": {"bits": 4}, "activations": {"bits": 4}}
    return {
        "rtn": {"method": "rtn", **w4a4},
        "rtn clip-search": {"method": "rtn", **w4a4, "weights": {"bits": 4, "clip_search": True}},
        "smoothquant": {"method": "smoothquant", "calibration": calibration, **w4a4},
        "rotation": {"method": "rotation", **w4a4},
        "rotation + kv4": {"method": "rotation", **w4a4, "kv": {"bits": 4, "clip": 0.95}},
        "gptq": {"method": "gptq", "calibration": calibration, **w4a4},
        "gptq + rotation": {"method": "gptq", "rotate": True, "calibration": calibration, **w4a4},
    }


class PeakMemory:
    """Peak memory above the level at entry: CUDA max allocated, else sampled RSS."""

    def __enter__(self) -> PeakMemory:
        gc.collect()  # free what earlier measurements left, and give it back to the system
        if sys.platform == "linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.process, self.running = psutil.Process(), True
            self.start = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *_: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.start


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def quantized(model: nn.Module, config: dict, tokenizer: object) -> tuple[nn.Module, float]:
    spec = quantizer(name="bench", **config)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = copy.deepcopy(model)
    quantize_(result, spec, tokenizer)
    return result, time.perf_counter() - start


def quantization_table(model: nn.Module, tokenizer: object, sequences: int, size: int) -> None:
    """A method that raises gets its error in its row; the others are still measured."""
    rows = []
    for name, config in methods(sequences).items():
        try:
            with PeakMemory() as memory:
                _, elapsed = quantized(model, config, tokenizer)
        except Exception as error:  # a benchmark reports a broken method, it does not stop
            rows.append([name, f"FAILED: {type(error).__name__}: {str(error)[:120]}", "-", "-"])
            continue
        rows.append(
            [name, f"{elapsed:.2f}", f"{memory.extra / 2**20:.1f}", f"{memory.extra / size:.2f}"]
        )
    header = ["method", "time s", "peak extra MiB", "peak extra / fp size"]
    table("Quantization (W4A4; the peak includes the model copy being quantized)", header, rows)


@torch.no_grad()
def forward_table(model: nn.Module, ids: torch.Tensor, repeats: int, formats: list[str]) -> None:
    """Per format: fp, reference and fast forward times, measured round by round."""
    rows = []
    for name in formats:
        fmt = FORMATS[name]
        fake, _ = quantized(model, {"method": "rtn", "weights": fmt, "activations": fmt}, None)
        graphs = counters["stats"]["unique_graphs"]
        with fast_quant("1"):
            first = seconds(lambda fake=fake: fake(ids))  # compiles every linear shape
            fast_logits = fake(ids).logits
        compiled = counters["stats"]["unique_graphs"] - graphs
        with fast_quant("0"):
            gap = (fast_logits - fake(ids).logits).abs().max().item()
        times = interleaved(
            {
                "fp": lambda: model(ids),
                "reference": lambda fake=fake: _with_mode(fake, ids, "0"),
                "fast": lambda fake=fake: _with_mode(fake, ids, "1"),
            },
            repeats,
        )
        ms = {key: statistics.median(value) * 1e3 for key, value in times.items()}
        rows.append(
            [
                name,
                f"{ms['fp']:.1f}",
                f"{ms['reference']:.1f}",
                f"{ms['fast']:.1f}",
                f"{median_ratio(times['reference'], times['fp']):.2f}",
                f"{median_ratio(times['fast'], times['fp']):.2f}",
                f"{median_ratio(times['reference'], times['fast']):.2f}",
                f"{first:.1f} ({compiled} graphs)",
                f"{gap:.1e}" if gap else "0 (identical)",
            ]
        )
    header = ["format (W and A)", "fp ms", "reference ms", "fast ms", "reference / fp",
              "fast / fp", "reference / fast", "fast 1st call s", "max |Δ logit|"]  # fmt: skip
    title = f"Forward, batch {tuple(ids.shape)}, median of {repeats} rounds (1st call: compile)"
    table(title, header, rows)


@torch.no_grad()
def layer_table(
    config: object,
    tokens: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    formats: list[str],
) -> None:
    """One linear layer: fake-quant of its input alone and the whole layer, per format."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, config.hidden_size, generator=generator).to(device, dtype)
    weight = torch.randn(config.intermediate_size, config.hidden_size, generator=generator)
    weight = (weight / config.hidden_size**0.5).to(device, dtype)
    rows = []
    for name in formats:
        spec = ActivationQuant.model_validate(FORMATS[name])
        kernel = torch.compile(functools.partial(fake_quant, spec=spec), dynamic=False)
        kernel(x)  # compiles
        fused.quantized_linear(x, weight, None, spec)  # compiles
        times = interleaved(
            {
                "quant reference": lambda spec=spec: fake_quant(x, spec),
                "quant fused": lambda kernel=kernel: kernel(x),
                "fp": lambda: F.linear(x, weight),
                "reference": lambda spec=spec: F.linear(fake_quant(x, spec), weight),
                "fast": lambda spec=spec: fused.quantized_linear(x, weight, None, spec),
            },
            repeats,
        )
        ms = {key: statistics.median(value) * 1e3 for key, value in times.items()}
        rows.append(
            [
                name,
                f"{ms['quant reference']:.2f}",
                f"{ms['quant fused']:.2f}",
                f"{median_ratio(times['quant reference'], times['quant fused']):.1f}",
                f"{ms['fp']:.2f}",
                f"{median_ratio(times['reference'], times['fp']):.2f}",
                f"{median_ratio(times['fast'], times['fp']):.2f}",
            ]
        )
    header = ["format (A)", "fake-quant ref ms", "fused ms", "ref / fused", "fp matmul ms",
              "layer ref / fp", "layer fast / fp"]  # fmt: skip
    shape = f"x [{tokens}, {config.hidden_size}] -> {config.intermediate_size}"
    table(f"One linear layer, {shape}, median of {repeats} rounds", header, rows)


def _with_mode(model: nn.Module, ids: torch.Tensor, mode: str) -> object:
    with fast_quant(mode):
        return model(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per format")
    parser.add_argument("--batch", type=int, nargs=2, default=[8, 128], metavar=("N", "LEN"))
    parser.add_argument(
        "--only", nargs="+", choices=TABLES, default=TABLES, help="the tables to measure"
    )
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    args = parser.parse_args()
    model, tokenizer = load_model(args)
    size = model_bytes(model)
    print(f"{describe(model)}; {size / 2**20:.1f} MiB fp")
    if "quantization" in args.only:
        quantization_table(model, tokenizer, args.sequences, size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, args.batch, generator=generator)
    device = next(model.parameters()).device
    if "forward" in args.only:
        forward_table(model, ids.to(device), args.repeats, args.formats)
    if "layer" in args.only:
        layer_table(model.config, ids.numel(), args.repeats, device, model.dtype, args.formats)


if __name__ == "__main__":
    main()
