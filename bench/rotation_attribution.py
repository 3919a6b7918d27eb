"""Which rounded linears make W4 perplexity blow up after folding or rotating SmolLM2 (issue 17,
item 5; companion of bench/rotation_compare.py).

For the model as loaded, its folded copy (the study's `fold_norms`), the study's QuaRot and
qbench's rotation (each with the given seeds): every decoder linear's relative output error of
per-channel W4 RTN on held-out WikiText-2 test windows, at position 0 (the attention-sink token,
where the massive activation lives) and at positions >= 1; then perplexity with every decoder
linear rounded except one group kept in float (the groups whose position-0 error is largest),
which says how much of the damage each group carries.

    OMP_NUM_THREADS=1 QBENCH_DATA_DIR=/work/shared/data nice .venv/bin/python \\
        bench/rotation_attribution.py --gguf \\
        ../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf

Findings (SmolLM2-135M-Instruct Q4_1 GGUF, WikiText-2 test 4 x 256, per-channel W4 RTN on
every decoder linear, 2026-12; bench/rotation_compare.py for the first two):
- qbench's rotation and the study's QuaRot are the same transformation up to the Hadamard base
  (576: sylvester(16) x compressed-tensors(36) vs x Paley II(36); 1536: sylvester(128) x
  compressed-tensors(12) vs x Paley I(12); the random signs are the same draws per seed): both
  lossless (logits 1.5e-6 / 1.7e-6), the same per-linear W4 weight error (mean 0.1373 both),
  and qbench's `method: rotation` pipeline gives exactly the perplexity of its rotated model
  with the study's rtn (464.99 both, seed 0). Seeds 0-7: qbench 465.0, 196.3, 185.5, 196.0,
  210.4, 190.2, 265.2, 200.6; study 190.9, 208.8, 187.7, 164.5, 155.9, 157.9, 187.4, 184.3.
- The damage is the error on the sink token's input direction: every linear made exact on its
  own position-0 input direction (a float rank-1 term) gives original 82.2, folded 148.7,
  study seed 0 82.3, qbench seed 0 79.3 (seeds 4 / 6: study 68.3 / 67.1, qbench 80.1 / 71.9).
  From layer 12 on, 98.6% of position 0's residual energy is in channel 507, and the norms
  reading it shrink that channel: the post-attention norm's gamma[507] is below 1e-3 in layers
  1 and 11-26, the input norm's is 0.2-0.4 x the median |gamma| in layers 12-26. Folded, those
  columns are near zero; rotated, each matrix's rounding noise lands on that direction anyway,
  where the float signal is near zero: relative position-0 output errors v_proj 1.02, up_proj
  0.89 (0.44 and 0.17 unrotated).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from rotation_compare import linears, rounded_perplexity
from rotation_weights_study import (
    errors,
    fold_norms,
    inputs,
    perplexity,
    rotate,
    rtn,
    wikitext_ids,
    windows,
)
from torch import nn

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def output_errors(model: nn.Module, held_out: torch.Tensor) -> dict[str, dict[str, float]]:
    xs = {n.replace(".linear", ""): x for n, x in inputs(model, held_out).items()}
    return {n: errors(w.detach(), rtn(w.detach()), xs[n]) for n, w in linears(model).items()}


@torch.no_grad()
def perplexity_sink_exact(model: nn.Module, test: torch.Tensor, held_out: torch.Tensor) -> float:
    """Perplexity with every decoder linear W4 RTN plus a float rank-1 term that makes it exact
    on its own position-0 input direction u (from the first held-out window):
    Q(W) + (W - Q(W)) u u^T. Tells whether the error on the sink token's input is the damage."""
    xs = {n.replace(".linear", ""): x for n, x in inputs(model, held_out[:1]).items()}
    saved = {n: w.detach().clone() for n, w in linears(model).items()}
    for n, w in linears(model).items():
        u = xs[n][0, 0].double()
        u = u / u.norm()
        q = rtn(w).double()
        w.copy_(q + torch.outer((w.double() - q) @ u, u))
    try:
        return perplexity(model, test)
    finally:
        for n, w in linears(model).items():
            w.copy_(saved[n])


def spans(names: list[str]) -> dict[str, set[str]]:
    """Float groups across layers: q,k,v before / from layer 11 (where the massive activation
    starts), every v_proj, every gate/up."""

    def layer(n: str) -> int:
        return int(n.split(".")[2])

    qkv = [n for n in names if n.endswith(("q_proj", "k_proj", "v_proj"))]
    return {
        "q,k,v of layer 0": {n for n in qkv if layer(n) == 0},
        "q,k,v of layers 1-10": {n for n in qkv if 1 <= layer(n) <= 10},
        "q,k,v of layers 11-29": {n for n in qkv if layer(n) >= 11},
        "every v_proj": {n for n in names if n.endswith("v_proj")},
        "every gate,up": {n for n in names if n.endswith(("gate_proj", "up_proj"))},
    }


def groups(names: list[str]) -> dict[str, set[str]]:
    """Candidate float groups: each kind over all layers, and each layer's attention / MLP."""
    found: dict[str, set[str]] = {}
    for kind in KINDS:
        found[f"all {kind}"] = {n for n in names if n.endswith(kind)}
    found["all q,k,v"] = {n for n in names if n.endswith(("q_proj", "k_proj", "v_proj"))}
    layers = sorted({int(n.split(".")[2]) for n in names})
    for i in layers:
        found[f"layer {i} q,k,v"] = {
            n for n in names if f".layers.{i}." in n and n.endswith(("q_proj", "k_proj", "v_proj"))
        }
        found[f"layer {i} mlp"] = {n for n in names if f".layers.{i}.mlp." in n}
        found[f"layer {i} o_proj"] = {n for n in names if f".layers.{i}.self_attn.o_proj" in n}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--top", type=int, default=6, help="float groups tried per model")
    parser.add_argument(
        "--sink-exact-only", action="store_true", help="only perplexity_sink_exact per model"
    )
    parser.add_argument("--no-spans", action="store_true", help="skip the float-span runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from qbench.checkpoints.load import load_checkpoint
    from qbench.quant.methods.rotation import rotate as qbench_rotate
    from qbench.recipe import CheckpointSpec

    torch.manual_seed(0)
    original, tokenizer = load_checkpoint(CheckpointSpec(name="m", gguf=args.gguf), progress=False)
    ids = wikitext_ids(tokenizer, "test")
    test = windows(ids, args.seq_len, args.windows)
    held_out = windows(ids, args.seq_len, args.held_out, skip=args.windows)
    folded = copy.deepcopy(original)
    fold_norms(folded)
    models: dict[str, nn.Module] = {"original": original, "folded": folded}
    for seed in [int(s) for s in args.seeds.split(",")]:
        ours = copy.deepcopy(folded)
        rotate(ours, torch.Generator().manual_seed(seed))  # online hooks stay on this copy
        models[f"script-s{seed}"] = ours
        theirs = copy.deepcopy(original)
        qbench_rotate(theirs, generator=torch.Generator().manual_seed(seed))
        models[f"qbench-s{seed}"] = theirs
    out: dict = {}
    if args.sink_exact_only:
        for name, model in models.items():
            value = perplexity_sink_exact(model, test, held_out)
            out[name] = {"sink_exact": value}
            print(f"{name:14} W4 RTN, position-0 input direction exact: {value:.2f}", flush=True)
            if name == "original" or args.no_spans:
                continue
            names = list(linears(model))
            for label, keep in spans(names).items():
                value = rounded_perplexity(model, test, frozenset(keep))
                out[name][label] = value
                print(f"{name:14}   {label} in float: {value:.2f}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(out, indent=1))
        return
    print("mean relative output error of W4 RTN by kind: position 0 / positions >= 1")
    print(f"{'model':14} " + " ".join(f"{k:>13}" for k in KINDS))
    for name, model in models.items():
        errs = output_errors(model, held_out)
        out[name] = {"layers": errs}
        cells = []
        for kind in KINDS:
            rows = [e for n, e in errs.items() if n.endswith(kind)]
            pos0 = sum(e["output_pos0"] for e in rows) / len(rows)
            rest = sum(e["output_rest"] for e in rows) / len(rows)
            cells.append(f"{pos0:6.3f}/{rest:6.3f}")
        print(f"{name:14} " + " ".join(f"{c:>13}" for c in cells), flush=True)
    for name in models:
        errs = out[name]["layers"]
        top = sorted(errs, key=lambda n: errs[n]["output_pos0"], reverse=True)[:8]
        print(f"\n{name}: largest position-0 output errors")
        for n in top:
            e = errs[n]
            print(f"  {n:42} pos0 {e['output_pos0']:.3f} rest {e['output_rest']:.3f}")
    print("\nperplexity, all decoder linears W4 RTN but one group in float")
    for name, model in models.items():
        errs = out[name]["layers"]
        candidates = groups(list(errs))
        score = {
            g: max(errs[n]["output_pos0"] for n in members)
            for g, members in candidates.items()
            if g.startswith("layer")
        }
        tried = ["all q,k,v", "all down_proj", "all o_proj"]
        tried += sorted(score, key=score.get, reverse=True)[: args.top]
        out[name]["perplexity"] = {"none": rounded_perplexity(model, test)}
        line = f"{name:14} none {out[name]['perplexity']['none']:.1f}"
        for group in tried:
            value = rounded_perplexity(model, test, frozenset(candidates[group]))
            out[name]["perplexity"][group] = value
            line += f"; {group} {value:.1f}"
        print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
