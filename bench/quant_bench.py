"""Quantizer benchmark, measured in one run on one model (a script, not a test).

Prints: quantization time per method; forward time of each fake-quant format (weights and
activations) relative to the float model; peak extra memory while quantizing (CPU: resident
set size sampled every 2 ms; CUDA: max allocated) relative to the float model's size.

    OMP_NUM_THREADS=2 .venv/bin/python bench/quant_bench.py [--path DIR] [--sequences N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time

import psutil
import torch
from torch import nn

from qbench.checkpoints.load import load_checkpoint
from qbench.quant import METHODS, quantize_
from qbench.recipe import CheckpointSpec

FORMATS = {
    "int8": {"bits": 8},
    "int4": {"bits": 4},
    "fp8_e4m3": {"format": "fp8_e4m3"},
    "fp4_e2m1 g16": {"format": "fp4_e2m1", "group": 16},
    "mxfp4": {"format": "mxfp4"},
    "nvfp4": {"format": "nvfp4"},
}


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


@torch.no_grad()
def forward_seconds(model: nn.Module, ids: torch.Tensor, repeats: int = 5) -> float:
    model(ids)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quantized(model: nn.Module, config: dict, tokenizer: object) -> tuple[nn.Module, float]:
    spec = METHODS.get(config["method"]).model_validate({"name": "bench", **config})
    torch.manual_seed(0)
    start = time.perf_counter()
    result = quantize_(copy.deepcopy(model), spec, tokenizer)
    return result, time.perf_counter() - start


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", help="a local HF checkpoint (default: the tiny trained one)")
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    args = parser.parse_args()
    spec = {"path": args.path} if args.path else {"train": {"preset": "tiny"}}
    model, tokenizer = load_checkpoint(CheckpointSpec(name="bench", **spec), progress=False)
    model.eval()
    size = model_bytes(model)
    ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator())
    on = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"model: {model.config.model_type}, {size / 2**20:.2f} MiB fp ({on})")

    rows = []
    for name, config in methods(args.sequences).items():
        with PeakMemory() as memory:
            _, seconds = quantized(model, config, tokenizer)
        rows.append(
            [name, f"{seconds:.2f}", f"{memory.extra / 2**20:.1f}", f"{memory.extra / size:.2f}"]
        )
    table("Quantization (W4A4)", ["method", "time s", "peak extra MiB", "peak / fp size"], rows)

    fp_time = forward_seconds(model, ids)
    rows = [["fp", f"{fp_time * 1e3:.1f}", "1.00"]]
    for name, fmt in FORMATS.items():
        fake, _ = quantized(model, {"method": "rtn", "weights": fmt, "activations": fmt}, None)
        seconds = forward_seconds(fake, ids)
        rows.append([name, f"{seconds * 1e3:.1f}", f"{seconds / fp_time:.2f}"])
    table(f"Forward, batch {tuple(ids.shape)}", ["format (W and A)", "ms", "× fp"], rows)


if __name__ == "__main__":
    main()
