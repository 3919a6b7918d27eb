"""Perplexity throughput: qbench's `perplexity` vs lm-eval's `loglikelihood_rolling`, one run.

Both score the same text (tokenized by the checkpoint's tokenizer: the script checks that
lm-eval's encoding is the same token list) with the same in-memory model (lm-eval's HFLM
wraps it: no reload), the same window length and the same batch size, for the fp model and
W4A4 RTN under each --formats, through the eager reference and the compiled fast path.

The two conventions differ, so their perplexities differ a little:
- qbench (GPTQ-style): non-overlapping windows of seq_len tokens, the tail shorter than a
  window dropped, the first token of every window not scored: windows x (seq_len - 1) tokens;
- lm-eval's loglikelihood_rolling: every token scored, the first one after a prefix token
  (BOS, else EOS); each later window is seq_len tokens ending one token earlier than qbench's
  (its first token is the previous window's last, as context), and the tail is scored.
The "same windows" column is the check: lm-eval's own scoring (`_loglikelihood_tokens`, which
loglikelihood_rolling calls) fed qbench's windows, each window's first token as context; it
must reproduce qbench's perplexity: to the printed digits in fp, and to about 1e-5 relative
with 4-bit activations, because lm-eval feeds a window without its last token (which has no
target), so the matmuls have other shapes, differ in the last float bits, and a 4-bit
rounding can flip.

Throughput: scored tokens per second, median of --repeats runs, the two harnesses run one
after the other in each round; the fast path's first run (compilation) is reported apart,
with the number of graphs compiled by the timed runs (0: nothing recompiles per batch).

    OMP_NUM_THREADS=2 .venv/bin/python bench/perplexity_bench.py [--random-width 512]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import statistics

import torch
from common import add_model_arguments, describe, fast_quant, load_model, seconds, table
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from torch import nn
from torch._dynamo.utils import counters
from transformers import PreTrainedTokenizerBase

from qbench.api import quantize_
from qbench.data.sources import load_text
from qbench.eval.perplexity import Perplexity, perplexity, windows_of
from qbench.quant.quantizer import QuantizerConfig

FORMATS = {"int4": {"bits": 4}, "nvfp4": {"format": "nvfp4"}, "mxfp4": {"format": "mxfp4"}}


def bench_text(tokenizer: PreTrainedTokenizerBase, data: str, split: str, tokens: int) -> str:
    """The split's text, cut (at a character) to about `tokens` tokens."""
    text = load_text(data, split)
    total = len(tokenizer(text, verbose=False).input_ids)
    return text[: int(len(text) * min(1.0, tokens / total))]


class LmEvalRolling:
    """lm-eval's HFLM on `model`; the text as one loglikelihood_rolling request."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str,
                 seq_len: int, batch_size: int) -> None:  # fmt: skip
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                       max_length=seq_len)  # fmt: skip
        self.request = Instance("loglikelihood_rolling", {}, (text,), 0)
        self.tokens = len(self.lm.tok_encode(text))

    def perplexity(self) -> float:
        with contextlib.redirect_stderr(io.StringIO()):  # its inner progress bar ignores disable
            (loglikelihood,) = self.lm.loglikelihood_rolling([self.request], disable_tqdm=True)
        return math.exp(-loglikelihood / self.tokens)

    def same_windows(self, windows: torch.Tensor) -> float:
        """Perplexity of qbench's windows scored by lm-eval, first token of each as context."""
        requests = [(None, w[:1].tolist(), w[1:].tolist()) for w in windows]
        with contextlib.redirect_stderr(io.StringIO()):
            results = self.lm._loglikelihood_tokens(requests, disable_tqdm=True)
        return math.exp(-sum(ll for ll, _ in results) / (windows.numel() - len(windows)))


def measure(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str,
            args: argparse.Namespace) -> list[str]:  # fmt: skip
    """One table row: perplexities, throughputs and compile figures of `model`."""
    lm_eval = LmEvalRolling(model, tokenizer, text, args.seq_len, args.batch_size)
    result: list[Perplexity] = []

    def qbench_run() -> None:
        result[:] = [perplexity(model, tokenizer, text, args.seq_len, args.batch_size,
                                progress=False)]  # fmt: skip

    with torch.no_grad():
        first = seconds(qbench_run) + seconds(lm_eval.perplexity)  # compiles, if compiling
        graphs = counters["stats"]["unique_graphs"]
        times: dict[str, list[float]] = {"qbench": [], "lm-eval": []}
        for _ in range(args.repeats):
            times["qbench"].append(seconds(qbench_run))
            times["lm-eval"].append(seconds(lm_eval.perplexity))
        recompiled = counters["stats"]["unique_graphs"] - graphs
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
        same = lm_eval.same_windows(windows_of(ids, args.seq_len, None))
        lm_eval_ppl = lm_eval.perplexity()
    ours = result[0]
    qbench_rate = ours.predicted_tokens / statistics.median(times["qbench"])
    lm_eval_rate = lm_eval.tokens / statistics.median(times["lm-eval"])
    ratios = [
        (ours.predicted_tokens / q) / (lm_eval.tokens / e)
        for q, e in zip(times["qbench"], times["lm-eval"], strict=True)
    ]
    return [
        f"{ours.perplexity:.3f}",
        f"{lm_eval_ppl:.3f}",
        f"{same:.3f}",
        f"{qbench_rate:,.0f}",
        f"{lm_eval_rate:,.0f}",
        f"{statistics.median(ratios):.2f}",
        f"{first:.1f}",
        str(recompiled),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--data", default="embedded", help="text source (e.g. wikitext2)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokens", type=int, default=16384, help="about this many tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args()
    model, tokenizer = load_model(args)
    text = bench_text(tokenizer, args.data, args.split, args.tokens)
    ids = tokenizer(text, verbose=False).input_ids
    lm_eval_ids = HFLM(pretrained=model, tokenizer=tokenizer).tok_encode(text)
    print(describe(model))
    print(f"text: {args.data}/{args.split}, {len(ids)} tokens; lm-eval's encoding is "
          f"{'the same' if lm_eval_ids == ids else 'DIFFERENT'}")  # fmt: skip

    rows = [["fp", "-", *measure(model, tokenizer, text, args)]]
    for name in args.formats:
        fmt = FORMATS[name]
        config = QuantizerConfig(name=name, method="rtn", weights=fmt, activations=fmt)
        quantized = copy.deepcopy(model)
        quantize_(quantized, config)
        for mode, path in (("0", "reference"), ("1", "fast")):
            with fast_quant(mode):
                rows.append([f"W4A4 {name}", path, *measure(quantized, tokenizer, text, args)])
    header = ["model", "path", "qbench ppl", "lm-eval ppl", "lm-eval ppl, same windows",
              "qbench tok/s", "lm-eval tok/s", "qbench / lm-eval", "1st run s (qbench + lm-eval)",
              "graphs compiled after 1st run"]  # fmt: skip
    title = (f"Perplexity, seq_len {args.seq_len}, batch {args.batch_size}, "
             f"median of {args.repeats} runs")  # fmt: skip
    table(title, header, rows)


if __name__ == "__main__":
    main()
