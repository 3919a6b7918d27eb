"""qbench's rotation against the independent QuaRot of bench/rotation_weights_study.py, step by
step, on one model (issue 17, item 5).

One process, one load: the model as loaded, the script's folded model, the script's QuaRot
(fold + random Hadamard + online Hadamard before o_proj / down_proj) and qbench's
`qbench.quant.methods.rotation.rotate`. For each: float logits against the original (all must
be lossless), per-linear relative weight error ||Q(W) - W|| / ||W|| of per-channel symmetric W4
RTN (the study's `rtn`, and qbench's own `fake_quant` with `method: rotation`'s weight spec,
which must agree), and, with --perplexity, WikiText-2 test perplexity with every decoder linear
rounded. Also the folded norm scales' statistics and the folded layers with the largest error.

    OMP_NUM_THREADS=1 QBENCH_DATA_DIR=/work/shared/data nice .venv/bin/python \\
        bench/rotation_compare.py --gguf \\
        ../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --perplexity --out rotation_compare.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from rotation_weights_study import (
    fold_norms,
    perplexity,
    rotate,
    rtn,
    targets,
    wikitext_ids,
    windows,
)
from torch import nn


def linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every decoder linear's weight by its plain name (qbench's HadamardInput wrapper's
    `.linear` dropped, so both rotations' names match)."""
    return {n.replace(".linear", ""): m.weight for n, m in targets(model).items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def w4_errors(model: nn.Module) -> dict[str, float]:
    return {n: relative(rtn(w.detach()), w.detach()) for n, w in linears(model).items()}


@torch.no_grad()
def rounded_perplexity(
    model: nn.Module, test: torch.Tensor, keep: frozenset[str] = frozenset()
) -> float:
    """Perplexity with every decoder linear but those in `keep` per-channel W4 RTN (weights
    restored after)."""
    saved = {n: w.detach().clone() for n, w in linears(model).items()}
    for n, w in linears(model).items():
        if n not in keep:
            w.copy_(rtn(w))
    try:
        return perplexity(model, test)
    finally:
        for n, w in linears(model).items():
            w.copy_(saved[n])


def norm_stats(model: nn.Module) -> list[dict]:
    """Each block's RMSNorm scale: absmax, min |gamma|, max / median |gamma|, argmax."""
    rows = []
    for i, block in enumerate(model.model.layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            g = getattr(block, name).weight.detach().double().abs()
            rows.append(
                {
                    "layer": i,
                    "norm": name,
                    "max": g.max().item(),
                    "argmax": int(g.argmax()),
                    "min": g.min().item(),
                    "argmin": int(g.argmin()),
                    "median": g.median().item(),
                    "max_over_median": (g.max() / g.median()).item(),
                }
            )
    return rows


def column_dominance(w: torch.Tensor) -> tuple[float, int]:
    """Share of rows whose absmax sits in the most frequent argmax column, and that column."""
    arg = w.abs().argmax(dim=1)
    counts = torch.bincount(arg, minlength=w.shape[1])
    return (counts.max() / w.shape[0]).item(), int(counts.argmax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", default="0", help="rotation seeds, comma-separated")
    parser.add_argument("--perplexity", action="store_true")
    parser.add_argument(
        "--pipeline", action="store_true", help="also qbench's quantize_ (method: rotation)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from qbench.api import quantize_
    from qbench.api import quantizer as make_quantizer
    from qbench.checkpoints.load import load_checkpoint
    from qbench.quant.formats.fake import fake_quant
    from qbench.quant.methods.rotation import rotate as qbench_rotate
    from qbench.recipe import CheckpointSpec

    torch.manual_seed(0)
    original, tokenizer = load_checkpoint(CheckpointSpec(name="m", gguf=args.gguf), progress=False)
    test = windows(wikitext_ids(tokenizer, "test"), args.seq_len, args.windows)
    probe = test[:1]
    with torch.no_grad():
        reference = original(input_ids=probe).logits.double()

    def logits_error(model: nn.Module) -> float:
        with torch.no_grad():
            return relative(model(input_ids=probe).logits, reference)

    spec = make_quantizer(name="r", method="rotation", weights={"bits": 4}).weights
    out: dict = {"weight_spec": spec.label(), "models": {}}
    out["norms"] = norm_stats(original)

    def measure(name: str, model: nn.Module) -> None:
        errs = w4_errors(model)
        qb = {
            n: relative(fake_quant(w.detach().clone(), spec), w.detach())
            for n, w in linears(model).items()
        }
        entry = {
            "logits_error": logits_error(model),
            "w4_error": errs,
            "w4_error_qbench_fake_quant_max_diff": max(abs(qb[n] - errs[n]) for n in errs),
            "mean_w4_error": sum(errs.values()) / len(errs),
            "dominance": {n: column_dominance(w.detach()) for n, w in linears(model).items()},
        }
        if args.perplexity:
            entry["perplexity"] = rounded_perplexity(model, test)
            if name == "original":
                with torch.no_grad():
                    entry["perplexity_float"] = perplexity(model, test)
        out["models"][name] = entry
        print(
            f"{name:22} logits err {entry['logits_error']:.1e}  mean W4 err "
            f"{entry['mean_w4_error']:.4f}  (qbench fake_quant diff "
            f"{entry['w4_error_qbench_fake_quant_max_diff']:.1e})"
            + (f"  ppl {entry['perplexity']:.2f}" if "perplexity" in entry else ""),
            flush=True,
        )

    measure("original", original)
    folded = copy.deepcopy(original)
    fold_norms(folded)
    measure("folded", folded)
    for seed in [int(s) for s in args.seeds.split(",")]:
        ours = copy.deepcopy(folded)
        handles = rotate(ours, torch.Generator().manual_seed(seed))
        measure(f"script-quarot-s{seed}", ours)
        for handle in handles:
            handle.remove()
        del ours
        theirs = copy.deepcopy(original)
        qbench_rotate(theirs, generator=torch.Generator().manual_seed(seed))
        measure(f"qbench-rotation-s{seed}", theirs)
        del theirs
        if args.perplexity and args.pipeline:  # qbench's quantize_, method: rotation, W4
            piped = copy.deepcopy(original)
            rotation_w4 = make_quantizer(name="r", method="rotation", weights={"bits": 4})
            quantize_(piped, rotation_w4, tokenizer, seed=seed)
            value = perplexity(piped, test)
            out["models"][f"qbench-pipeline-s{seed}"] = {"perplexity": value}
            print(f"{'qbench-pipeline-s' + str(seed):22} ppl {value:.2f}", flush=True)
            del piped

    print("\nmean per-channel W4 relative weight error by linear kind")
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    print(f"{'model':22} " + " ".join(f"{k:>9}" for k in kinds))
    for name, entry in out["models"].items():
        if "w4_error" not in entry:
            continue
        cells = []
        for kind in kinds:
            values = [v for n, v in entry["w4_error"].items() if n.endswith(kind)]
            cells.append(f"{sum(values) / len(values):9.4f}")
        print(f"{name:22} " + " ".join(cells))
    folded_errors = out["models"]["folded"]["w4_error"]
    original_errors = out["models"]["original"]["w4_error"]
    print("\nfolded linears with the largest W4 error (original's error, dominant column share)")
    top = sorted(folded_errors, key=folded_errors.get, reverse=True)[:12]
    for n in top:
        share, column = out["models"]["folded"]["dominance"][n]
        print(
            f"  {n:42} {folded_errors[n]:.4f} (was {original_errors[n]:.4f}); "
            f"{share:.0%} of rows peak in column {column}"
        )
    print("\nnorm scales with the largest max/median |gamma|")
    for row in sorted(out["norms"], key=lambda r: -r["max_over_median"])[:8]:
        print(
            f"  layer {row['layer']:2} {row['norm']:25} max {row['max']:.3g} (ch {row['argmax']}) "
            f"median {row['median']:.3g} min {row['min']:.3g} (ch {row['argmin']}) "
            f"max/median {row['max_over_median']:.1f}"
        )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
