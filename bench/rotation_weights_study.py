"""Why does rotation hurt 4-bit weights on SmolLM2? An independent QuaRot-style computation.

Issue 17, item 5. qbench measured on SmolLM2-135M-Instruct (GGUF Q4_1), WikiText-2 test, 4
windows of 256: fp 37.10, per-channel W4 RTN 76.8, the same after qbench's rotation 465.0.
QuaRot (Ashkboos et al. 2024) and QuIP# report rotations that help 4-bit weights. This script
recomputes the question without any qbench code (plain torch; transformers only to load the
model and tokenizer), so that a qbench bug and a property of the model can be told apart:

1. the model as loaded (`original`), its RMSNorm scales folded into the linears that read them
   (`folded`, QuaRot's first step: W <- W diag(gamma), gamma <- 1), and the folded model
   rotated as QuaRot rotates it (`rotated`): the residual stream by a random Hadamard Q
   (embeddings E Q, readers W Q, writers Q^T W), and an online Hadamard H before o_proj and
   down_proj (x -> x H, W <- W H). Hadamard matrices: Sylvester (x) Paley (576 = 16 x 36,
   Paley II q = 17; 1536 = 128 x 12, Paley I q = 11), built here; the float models must
   agree (perplexity and logits), which checks the construction.
2. per-channel symmetric W4 (scale absmax / 7, integers -8..7, round half to even; qbench's
   and QuaRot's `sym` weight quantizer), on every linear of the decoder blocks (lm_head and
   embeddings stay float), as: RTN; RTN with QuaRot's weight clip search (per row, ratios
   1, 0.99, ..., 0.21, minimizing sum |q(w) - w|^2.4, GPTQ's quant.py / QuaRot's
   WeightQuantizer with mse); GPTQ (Frantar et al. 2023: block 128, damp 1% of the mean
   diagonal, no act-order, Hessians of the unquantized model's inputs on calibration windows
   of WikiText-2 valid, one shot, not layer-sequential); and RTN with the super weight kept in
   float (subtracted before rotating and rounding, added back as a float rank-1 term).
3. per linear: the relative weight error ||Q(W) - W|| / ||W|| and the relative output error
   ||X (Q(W) - W)^T|| / ||X W^T|| on held-out inputs X of that model (the first windows of
   WikiText-2 test), split at position 0 (the attention-sink token, where the massive
   activation lives) and positions >= 1; the kurtosis and absmax / rms of every weight row.
4. perplexity of each model on WikiText-2 test (GPTQ's convention: lines joined with a blank
   line, tokenized once, non-overlapping windows).

With --qbench, the same model through qbench: qbench's perplexity of fp, W4 RTN and rotation
+ W4 RTN (qbench.quant), and the per-layer errors of qbench's rotated weights under this
script's quantizer, to compare with the independent rotation.

    OMP_NUM_THREADS=2 .venv/bin/python bench/rotation_weights_study.py \\
        --gguf ../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --windows 4 --seq-len 256 --qbench --out rotation_study.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

BITS, QMAX = 4, 7  # symmetric int4: -8..7, scale absmax / 7
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # write the residual stream
READERS = {"input_layernorm": ("q_proj", "k_proj", "v_proj"), "post_attention_layernorm": ()}


# ------------------------------------------------------------------ data and perplexity


def wikitext_ids(tokenizer, split: str) -> Tensor:
    """WikiText-2 raw `split`, GPTQ's convention: lines (blank ones as ""), joined with a blank
    line, tokenized once."""
    root = Path(os.environ.get("QBENCH_DATA_DIR", "../shared/data"))
    with (root / "wikitext-2-raw" / f"wiki.{split}.raw").open(encoding="utf-8", newline="\n") as f:
        rows = [line if line.strip() else "" for line in f]
    return tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]


def windows(ids: Tensor, seq_len: int, count: int, skip: int = 0) -> Tensor:
    """[count, seq_len]: non-overlapping windows from window `skip` on."""
    start = skip * seq_len
    return ids[start : start + count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, batch: Tensor) -> float:
    """exp(mean next-token NLL) over every window of `batch` ([n, seq_len])."""
    nll, tokens = 0.0, 0
    for rows in batch.split(4):
        logits = model(input_ids=rows).logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        tokens += rows[:, 1:].numel()
    return math.exp(nll / tokens)


# ------------------------------------------------------------------ Hadamard matrices


def sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley(order: int) -> Tensor | None:
    """A +-1 Hadamard matrix of `order` by Paley's construction I (q = order - 1 prime,
    3 mod 4) or II (q = order / 2 - 1 prime, 1 mod 4); None if neither applies."""
    for q, kind in ((order - 1, 1), (order // 2 - 1, 2)):
        if not _is_prime(q) or q % 4 != (3 if kind == 1 else 1) or (kind == 2 and order % 2):
            continue
        squares = {(x * x) % q for x in range(1, q)}
        chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
        index = torch.arange(q)
        jacobsthal = chi[(index[None, :] - index[:, None]) % q].double()
        core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        core[1:, 1:], core[0, 1:] = jacobsthal, 1.0
        if kind == 1:  # skew conference matrix S: H = I + S
            core[1:, 0] = -1.0
            return torch.eye(q + 1, dtype=torch.float64) + core
        core[1:, 0] = 1.0  # symmetric conference matrix C
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(core, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> Tensor:
    """An orthogonal n x n matrix: Sylvester(2^k) (x) Paley(m), divided by sqrt(n), where one
    exists; else Sylvester (x) a random orthogonal matrix of the odd part (float64)."""
    power = n & -n
    odd = n // power
    h = None
    if odd == 1:
        h = sylvester(n) / math.sqrt(n)
    order = 4 * odd
    while h is None and order <= n:
        base = paley(order) if n % order == 0 else None
        if base is not None:
            h = torch.kron(sylvester(n // order), base) / math.sqrt(n)
        order *= 2
    if h is None:
        q, r = torch.linalg.qr(torch.randn(odd, odd, dtype=torch.float64))
        base = (q * torch.sign(torch.diagonal(r))).contiguous()
        h = torch.kron(sylvester(power) / math.sqrt(power), base)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    return h


# ------------------------------------------------------------------ QuaRot, in place


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """W <- W diag(gamma) for every reader of an RMSNorm; gamma <- 1 (lm_head untied)."""
    head = model.lm_head
    if head.weight is model.model.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    for block in blocks(model):
        pairs = (
            (
                block.input_layernorm,
                [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj],
            ),
            (block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj]),
        )
        for norm, readers in pairs:
            for linear in readers:
                linear.weight.copy_((linear.weight.double() * norm.weight.double()).float())
            norm.weight.fill_(1.0)
    head.weight.copy_((head.weight.double() * model.model.norm.weight.double()).float())
    model.model.norm.weight.fill_(1.0)


@torch.no_grad()
def rotate(model: nn.Module, generator: torch.Generator) -> list[torch.utils.hooks.RemovableHandle]:
    """QuaRot's rotation of a folded Llama: residual stream by Q = diag(signs) H, an online
    Hadamard before every writer. Returns the online transforms' hooks."""
    hidden = model.config.hidden_size
    signs = torch.randint(0, 2, (hidden,), generator=generator).double() * 2 - 1
    q = signs[:, None] * hadamard(hidden)  # [hidden, hidden], orthogonal
    embed = model.model.embed_tokens.weight
    embed.copy_((embed.double() @ q).float())
    readers = [model.lm_head]
    handles = []
    for block in blocks(model):
        attention, mlp = block.self_attn, block.mlp
        readers += [
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            mlp.gate_proj,
            mlp.up_proj,
        ]
        for writer in (attention.o_proj, mlp.down_proj):
            h = hadamard(writer.in_features)
            w = writer.weight.double()
            writer.weight.copy_((q.T @ w @ h).float())  # y Q, input x H
            online = h.float()
            handles.append(writer.register_forward_pre_hook(lambda m, a, h=online: (a[0] @ h,)))
    for linear in readers:
        linear.weight.copy_((linear.weight.double() @ q).float())
    return handles


# ------------------------------------------------------------------ quantizers


def rtn(w: Tensor, clip: Tensor | float = 1.0) -> Tensor:
    """Per-row symmetric int4 fake quantization, scale clip * absmax / 7."""
    scale = (clip * w.abs().amax(dim=1, keepdim=True) / QMAX).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -QMAX - 1, QMAX) * scale


def clip_search(w: Tensor, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> Tensor:
    """Per-row clip ratio minimizing sum |rtn(w) - w|^norm (GPTQ's / QuaRot's mse search)."""
    best = torch.full((w.shape[0], 1), float("inf"), dtype=w.dtype)
    ratio = torch.ones_like(best)
    for step in range(int(max_shrink * grid)):
        clip = 1 - step / grid
        error = (rtn(w, clip) - w).abs().pow(norm).sum(1, keepdim=True)
        better = error < best
        best, ratio = torch.where(better, error, best), torch.where(better, clip, ratio)
    return ratio


def gptq(w: Tensor, hessian: Tensor, block: int = 128, damp: float = 0.01) -> Tensor:
    """GPTQ (Frantar et al.; float32 as its reference code) with a per-row symmetric int4 grid
    (absmax / 7) fixed before the sweep."""
    w = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale = (w.abs().amax(dim=1, keepdim=True) / QMAX).clamp_min(1e-12)
    q = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        chunk, errors = w[:, start:end].clone(), torch.zeros_like(w[:, start:end])
        hinv = inverse[start:end, start:end]
        for i in range(end - start):
            column = chunk[:, i]
            rounded = torch.clamp(torch.round(column[:, None] / scale), -QMAX - 1, QMAX) * scale
            q[:, start + i] = rounded[:, 0]
            error = (column - rounded[:, 0]) / hinv[i, i]
            chunk[:, i:] -= error[:, None] * hinv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return q


# ------------------------------------------------------------------ measuring


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of the decoder blocks, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@contextmanager
def captured(model: nn.Module, record: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Each target linear's input (after any online transform), handed to `record`."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0].detach()))
        for n, m in targets(model).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def hessians(model: nn.Module, batch: Tensor, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    """2 X^T X / tokens of the input of every target `keep` accepts, on `batch` (GPTQ's H)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: Tensor) -> None:
        if not keep(name):
            return
        x = x.flatten(0, -2).double()
        sums[name] = sums.get(name, 0) + 2 * x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    with captured(model, record):
        for rows in batch.split(2):
            model(input_ids=rows)
    return {n: (s / counts[n]).float() for n, s in sums.items()}


@torch.no_grad()
def inputs(model: nn.Module, batch: Tensor) -> dict[str, Tensor]:
    """Every target's input [windows, seq_len, in] on `batch` (held-out windows)."""
    found: dict[str, Tensor] = {}
    with captured(model, lambda name, x: found.__setitem__(name, x.clone())):
        model(input_ids=batch)
    return found


def row_stats(w: Tensor) -> dict[str, float]:
    """Mean over rows of absmax / rms and of the row's kurtosis (what per-channel RTN sees)."""
    w = w.double()
    rms = w.pow(2).mean(1).sqrt().clamp_min(1e-30)
    centered = w - w.mean(1, keepdim=True)
    kurt = centered.pow(4).mean(1) / centered.pow(2).mean(1).pow(2).clamp_min(1e-60)
    return {
        "absmax_over_rms": (w.abs().amax(1) / rms).mean().item(),
        "kurtosis": kurt.mean().item(),
    }


def errors(w: Tensor, q: Tensor, x: Tensor) -> dict[str, float]:
    """Relative weight error and output error (all, position 0, positions >= 1) on x."""
    w, q, x = w.double(), q.double(), x.double()
    y, dy = x @ w.T, x @ (q - w).T

    def rel(a: Tensor, b: Tensor) -> float:
        return (a.norm() / b.norm().clamp_min(1e-30)).item()

    return {
        "weight": rel(q - w, w),
        "output": rel(dy, y),
        "output_pos0": rel(dy[:, 0], y[:, 0]),
        "output_rest": rel(dy[:, 1:], y[:, 1:]),
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": sum(values) / len(values),
        "median": ordered[len(values) // 2],
        "max": ordered[-1],
    }


# ------------------------------------------------------------------ the study


def load(args: argparse.Namespace):
    if args.gguf:
        path = Path(args.gguf)
        kwargs = {"gguf_file": path.name}
        source = path.parent
    else:
        kwargs, source = {}, Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(source, **kwargs)


def super_weight(model: nn.Module, batch: Tensor) -> tuple[int, int, int, float]:
    """Yu et al.'s super weight: the down_proj whose largest |input| x |output| spike is the
    largest, at (row of the output spike, column of the input spike)."""
    spikes = {}
    handles = []
    for i, block in enumerate(blocks(model)):

        def hook(module, args, output, i=i):
            x, y = args[0].abs().flatten(0, -2), output.abs().flatten(0, -2)
            spikes[i] = (
                x.amax(0).max().item() * y.amax(0).max().item(),
                int(y.amax(0).argmax()),
                int(x.amax(0).argmax()),
            )

        handles.append(block.mlp.down_proj.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=batch[:1])
    for handle in handles:
        handle.remove()
    layer = max(spikes, key=lambda i: spikes[i][0])
    _, row, column = spikes[layer]
    return layer, row, column, blocks(model)[layer].mlp.down_proj.weight[row, column].item()


@torch.no_grad()
def study_variant(
    name: str,
    model: nn.Module,
    data: dict[str, Tensor],
    sw: tuple,
    term: Callable[[float, int, int], Tensor],
    detail: set[int],
    full: bool,
) -> dict:
    """The quantizers on one float model: per-layer errors (RTN on every linear; clip search
    and GPTQ on the linears of the `detail` blocks, or of all with `full`) and perplexities
    (RTN and RTN with the super weight in float; clip search and GPTQ too with `full`)."""
    start = time.perf_counter()
    linears = targets(model)
    float_weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    xs = inputs(model, data["held_out"])

    def detailed(n: str) -> bool:
        return full or int(n.split(".")[2]) in detail

    hs = hessians(model, data["calibration"], detailed)
    layer, row, column, value = sw
    sw_name = f"model.layers.{layer}.mlp.down_proj"
    quantized: dict[str, dict[str, Tensor]] = {"rtn": {}, "sw_float": {}, "clip": {}, "gptq": {}}
    for n, w in float_weights.items():
        quantized["rtn"][n] = rtn(w)
        quantized["sw_float"][n] = quantized["rtn"][n]
        if detailed(n):
            quantized["clip"][n] = rtn(w, clip_search(w))
            quantized["gptq"][n] = gptq(w, hs[n]).float()
    w = float_weights[sw_name]  # the super weight in float: its rank-1 term out of the rounding
    quantized["sw_float"][sw_name] = rtn(w - term(value, row, column)) + term(value, row, column)
    result = {"variant": name, "layers": {}, "perplexity": {}}
    for n, w in float_weights.items():
        result["layers"][n] = {
            **row_stats(w),
            **{k: errors(w, q[n], xs[n]) for k, q in quantized.items() if n in q},
        }
    if name == "original":
        result["perplexity"]["float"] = perplexity(model, data["test"])
    for key, weights in quantized.items():
        if len(weights) < len(linears):  # clip search and GPTQ on some blocks only
            continue
        for n, m in linears.items():
            m.weight.copy_(weights[n])
        result["perplexity"][key] = perplexity(model, data["test"])
        print(f"  {name} {key}: perplexity {result['perplexity'][key]:.2f}", flush=True)
    for n, m in linears.items():
        m.weight.copy_(float_weights[n])
    result["seconds"] = time.perf_counter() - start
    print(f"  {name}: {result['seconds']:.0f} s", flush=True)
    return result


def qbench_part(args: argparse.Namespace, test: Tensor, held_out: Tensor) -> dict:
    """The same model through qbench: its perplexities, and the per-layer errors of qbench's
    rotated weights under this script's quantizer."""
    from qbench.api import quantize_
    from qbench.checkpoints.load import load_checkpoint
    from qbench.quant import quantizer as make_quantizer
    from qbench.quant.methods.rotation import rotate as qbench_rotate
    from qbench.recipe import CheckpointSpec

    spec = CheckpointSpec(name="m", **({"gguf": args.gguf} if args.gguf else {"path": args.model}))
    out = {"perplexity": {}}
    for name, fields in (
        ("fp", None),
        ("w4-rtn", {"method": "rtn", "weights": {"bits": 4}}),
        ("rotation-w4-rtn", {"method": "rotation", "weights": {"bits": 4}}),
    ):
        torch.manual_seed(args.seed)
        model, tokenizer = load_checkpoint(spec, progress=False)
        if fields is not None:
            quantize_(model, make_quantizer(name=name, **fields), tokenizer, seed=args.seed)
        out["perplexity"][name] = perplexity(model, test)
        print(f"  qbench {name}: perplexity {out['perplexity'][name]:.2f}", flush=True)
    torch.manual_seed(args.seed)
    model, _ = load_checkpoint(spec, progress=False)
    qbench_rotate(model)
    weights = {n: m.weight.detach().clone() for n, m in targets(model).items()}
    xs = inputs(model, held_out)
    out["layers"] = {
        n: {**row_stats(w), "rtn": errors(w, rtn(w), xs[n])} for n, w in weights.items()
    }
    return out


def report(results: dict) -> None:
    """Per-layer error summaries (mean / median / max over the linears measured) and
    perplexities."""
    print("\nper-layer relative errors of per-channel W4 (mean / median / max over linears)")
    columns = ("weight", "output", "output_pos0", "output_rest")
    print(f"{'variant':10} {'quantizer':8} {'linears':>7} " + " ".join(f"{c:>20}" for c in columns))
    for variant in results["variants"]:
        for key in ("rtn", "clip", "gptq", "sw_float"):
            layers = [layer[key] for layer in variant["layers"].values() if key in layer]
            if not layers:
                continue
            cells = []
            for metric in columns:
                s = summary([layer[metric] for layer in layers])
                cells.append(f"{s['mean']:.3f}/{s['median']:.3f}/{s['max']:.3f}")
            line = f"{variant['variant']:10} {key:8} {len(layers):>7} "
            print(line + " ".join(f"{c:>20}" for c in cells))
    for variant in results["variants"]:
        stats = [layer["absmax_over_rms"] for layer in variant["layers"].values()]
        kurt = [layer["kurtosis"] for layer in variant["layers"].values()]
        print(
            f"{variant['variant']:10} weight rows: absmax/rms mean {sum(stats) / len(stats):.2f}, "
            f"kurtosis mean {sum(kurt) / len(kurt):.2f}"
        )
    print("\nperplexities")
    for variant in results["variants"]:
        values = ", ".join(f"{k} {v:.2f}" for k, v in variant["perplexity"].items())
        print(f"{variant['variant']:10} {values}")
    if "qbench" in results:
        q = results["qbench"]
        print("qbench     " + ", ".join(f"{k} {v:.2f}" for k, v in q["perplexity"].items()))
        for metric in ("weight", "output"):
            s = summary([layer["rtn"][metric] for layer in q["layers"].values()])
            print(
                f"qbench's rotated weights, RTN {metric} error: mean {s['mean']:.3f}, "
                f"median {s['median']:.3f}, max {s['max']:.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="a .gguf file")
    source.add_argument("--model", help="a Hugging Face model folder")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=8, help="WikiText-2 valid windows")
    parser.add_argument("--held-out", type=int, default=2, help="test windows for layer errors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--detail-blocks", default="0,11,29", help="blocks whose linears get clip search and GPTQ"
    )
    parser.add_argument(
        "--full", action="store_true", help="clip search and GPTQ everywhere, with perplexities"
    )
    parser.add_argument("--qbench", action="store_true", help="compare with qbench's rotation")
    parser.add_argument("--out", type=Path, help="JSON with every figure")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = load(args)
    test_ids = wikitext_ids(tokenizer, "test")
    test = windows(test_ids, args.seq_len, args.windows)
    held_out = windows(test_ids, args.seq_len, args.held_out, skip=args.windows)
    calibration = windows(wikitext_ids(tokenizer, "valid"), args.seq_len, args.calibration)
    data = {"test": test, "held_out": held_out, "calibration": calibration}
    sw = super_weight(model, test)
    print(f"super weight (layer, row, column, value): {sw}", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "super_weight": sw}
    detail = {int(i) for i in args.detail_blocks.split(",") if i}
    with torch.no_grad():
        reference = model(input_ids=test[:1]).logits.double()

    def moved() -> float:
        with torch.no_grad():
            logits = model(input_ids=test[:1]).logits.double()
        return ((logits - reference).norm() / reference.norm()).item()

    def one_weight(value: float, row: int, column: int) -> Tensor:
        term = torch.zeros_like(blocks(model)[sw[0]].mlp.down_proj.weight)
        term[row, column] = value
        return term

    results["variants"] = [
        study_variant("original", model, data, sw, one_weight, detail, args.full)
    ]
    fold_norms(model)
    results["folded_logits_relative_error"] = moved()
    results["variants"].append(study_variant("folded", model, data, sw, one_weight, set(), False))
    handles = rotate(model, torch.Generator().manual_seed(args.seed))
    results["rotated_logits_relative_error"] = moved()
    print(
        f"float models' logits against the original (relative L2): folded "
        f"{results['folded_logits_relative_error']:.1e}, rotated "
        f"{results['rotated_logits_relative_error']:.1e}",
        flush=True,
    )
    term = rotated_term(args.seed, model.config)
    results["variants"].append(study_variant("rotated", model, data, sw, term, detail, args.full))
    for handle in handles:
        handle.remove()
    if args.qbench:
        results["qbench"] = qbench_part(args, test, held_out)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def rotated_term(seed: int, config) -> Callable[[float, int, int], Tensor]:
    """value * (Q^T e_row)(e_column^T H) with the Q `rotate` drew from `seed` (its first
    draw: the residual signs) and the down_proj's online H."""
    generator = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    signs = torch.randint(0, 2, (hidden,), generator=generator).double() * 2 - 1
    q = signs[:, None] * hadamard(hidden)
    h = hadamard(config.intermediate_size)

    def term(value: float, row: int, column: int) -> Tensor:
        return (value * torch.outer(q[row], h[column])).float()

    return term


if __name__ == "__main__":
    main()
