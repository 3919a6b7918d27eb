"""`qbench probe`: outlier diagnostics of one checkpoint, printed as a table and saved as JSON."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tabulate import tabulate

from qbench.checkpoints.load import checkpoint_config, load_checkpoint
from qbench.config import NAME_MAX
from qbench.data.synthetic import SPLITS as TASK_SPLITS
from qbench.errors import QBenchError, describe
from qbench.eval.diagnostics import Diagnostics, diagnose, layer_sqnr, probe_ids
from qbench.eval.specs import TASK_DATA, DiagnosticsSpec
from qbench.files import write_json_atomic
from qbench.quant.quantizer import QuantizerConfig
from qbench.recipe import CheckpointSpec, PerplexitySpec, Recipe, load_recipe
from qbench.registry import did_you_mean

SHORTHAND = re.compile(r"^w(\d+)a(\d+)$")  # w4a4: RTN, int weights per channel, acts per token


def checkpoint_in(recipe: Recipe, name: str) -> CheckpointSpec:
    """The recipe's checkpoint `name` (seeded ones are name@seed)."""
    names = [c.name for c in recipe.checkpoints]
    if name not in names:
        raise QBenchError(
            f"no checkpoint '{name}' in recipe {recipe.name}{did_you_mean(name, names)}; "
            f"known: {', '.join(names)}"
        )
    return recipe.checkpoints[names.index(name)]


def quantizer_named(name: str, recipe: Recipe | None) -> QuantizerConfig | None:
    """A recipe quantizer, 'none', or a shorthand wXaY for RTN (16 = left in float)."""
    if name == "none":
        return None
    known = {q.name: q for q in recipe.quantizers} if recipe else {}
    if name in known and not known[name].diagnosable:
        raise QBenchError(
            f"--quantizer '{name}': {known[name].rounding.method} keeps its weights packed in the "
            "library's own storage, which the probe's SQNR does not read; give wXaY or an "
            "RTN-family quantizer"
        )
    if name in known:
        return known[name]
    match = SHORTHAND.match(name)
    if match is None:
        raise QBenchError(
            f"--quantizer '{name}': give 'none', wXaY (e.g. w4a4, w8a16; RTN) "
            f"or one of the recipe's quantizers: {', '.join(known) or '(no recipe)'}"
        )
    weights, activations = (int(bits) for bits in match.groups())
    try:
        return QuantizerConfig(
            name=name,
            method="rtn",
            weights={"bits": weights} if weights < 16 else None,
            activations={"bits": activations} if activations < 16 else None,
        )
    except ValidationError as error:
        raise QBenchError(f"--quantizer '{name}': {describe(error)}") from None


def probe(
    checkpoint: CheckpointSpec,
    text: PerplexitySpec,
    spec: DiagnosticsSpec,
    quantizer: QuantizerConfig | None,
    out: Path,
) -> Diagnostics:
    """Load `checkpoint`, diagnose it on the start of `text`, write the JSON to `out`."""
    checkpoint_config(checkpoint)  # a bad config.json is one clear error, before loading
    model, tokenizer = load_checkpoint(checkpoint)
    ids = probe_ids(tokenizer, text, spec)
    sqnr = layer_sqnr(model, ids, quantizer) if quantizer else None
    diagnostics = diagnose(model, ids, sqnr, query_types=text.query_types(ids))
    write_json_atomic(
        out,
        {
            "checkpoint": checkpoint.model_dump(),
            "probe": {"text": text.describe(), **text.identity(), **spec.model_dump()},
            "quantizer": quantizer.model_dump() if quantizer else None,
            "summary": diagnostics.summary,
            "details": diagnostics.details,
        },
    )
    return diagnostics


def report(diagnostics: Diagnostics) -> str:
    """A per-layer table, the largest activations, the super-weight candidates and the
    summary, as text."""
    details, summary = diagnostics.details, diagnostics.summary
    rows = [_layer_row(layer, details["linears"]) for layer in details["layers"]]
    headers = ["layer", "max |h|", "median", "ratio", "top (pos, ch)", "first-token"]
    headers += ["heads > 0.5", "bias slot", "max kurtosis in", "min SQNR dB"]
    largest = [
        f"  {_number(a['value'])} at layer {a['layer']}, position {a['position']}, "
        f"channel {a['channel']}"
        for a in details["largest_activations"]
    ]
    candidates = [
        f"  ({s['layer']}, {s['row']}, {s['column']}) {s['module']}: W = {_number(s['weight'])}, "
        f"|input| {_number(s['input'])} at position {s['position']}, |output| "
        f"{_number(s['output'])}"
        for s in details["super_weights"][:3]
    ]
    return "\n".join(
        [
            tabulate(rows, headers, disable_numparse=True),
            "",
            "largest activations (value at layer, position, channel):",
            *largest,
            "",
            "super-weight candidates at the MLP output projections (layer, row, column):",
            *(candidates or ["  (no MLP output projection found)"]),
            "",
            "summary:",
            *(f"  {key}: {_number(value)}" for key, value in summary.items()),
        ]
    )


def _layer_row(layer: dict[str, Any], linears: dict[str, dict[str, Any]]) -> list[str]:
    own = [s for name, s in linears.items() if f".layers.{layer['layer']}." in name]
    kurtosis = [s["input_kurtosis"] for s in own if s["input_kurtosis"] is not None]
    sqnr = [s["sqnr_db"] for s in own if s["sqnr_db"] is not None]
    heads = layer.get("first_token_mass")
    scores = layer.get("sink_score")
    slot = layer.get("bias_slot_mass")
    return [
        str(layer["layer"]),
        _number(layer["max"]),
        _number(layer["median"]),
        _number(layer["ratio"]),
        ", ".join(f"({t['position']}, {t['dim']})" for t in layer["top"]),
        _number(sum(heads) / len(heads)) if heads else "-",
        f"{sum(s > 0.5 for s in scores)} of {len(scores)}" if scores else "-",
        _number(sum(slot) / len(slot)) if slot else "-",
        _number(max(kurtosis)) if kurtosis else "-",
        _number(min(sqnr)) if sqnr else "-",
    ]


def _overridden(settings: DiagnosticsSpec, **options: int | str | None) -> DiagnosticsSpec:
    """`settings` with the options given on the command line."""
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return DiagnosticsSpec(**(settings.model_dump() | given))
    except ValidationError as error:
        problems = [f"--{e['loc'][0].replace('_', '-')}: {e['msg']}" for e in error.errors()]
        raise QBenchError("; ".join(problems)) from None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def probe_command(
    path: str | None,
    recipe_path: Path | None,
    checkpoint: str | None,
    quantizer: str,
    data: str | None,
    split: str | None,
    samples: int | None,
    seq_len: int | None,
    out: Path | None,
    results: Path,
    windows: str | None = None,
) -> int:
    """Resolve the CLI's options, probe, print the report and where the JSON went."""
    if (path is None) == (recipe_path is None) or (recipe_path is None) != (checkpoint is None):
        raise QBenchError("give --path DIR, or --recipe FILE with --checkpoint NAME")
    recipe = load_recipe(recipe_path) if recipe_path else None
    if recipe is not None:
        spec = checkpoint_in(recipe, checkpoint)
        text = _text_option(data, split, recipe.eval.perplexity[0])
        settings = recipe.eval.diagnostics or DiagnosticsSpec()
        folder = results / recipe.name / "probe"
    else:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).name).lstrip("._-")[:NAME_MAX]
        source = {"gguf" if path.endswith(".gguf") else "path": path}
        spec = CheckpointSpec(name=name or "checkpoint", **source)
        text = _text_option(data, split, PerplexitySpec(data="embedded", split="test"))
        settings = DiagnosticsSpec()
        folder = results / "probe"
    settings = _overridden(settings, samples=samples, seq_len=seq_len, windows=windows)
    if text.data == TASK_DATA and settings.seq_len != text.seq_len:
        raise QBenchError(
            f"--seq-len: {settings.seq_len}, but the task's sequences are {text.seq_len} tokens; "
            "leave it out, so each window is one sequence with BOS first"
        )
    if text.data == TASK_DATA and settings.windows == "document":
        raise QBenchError(
            "--windows document: a task's windows are its sequences, each with BOS first; "
            "leave it out (stream)"
        )
    rounding = quantizer_named(quantizer, recipe)
    out = out or folder / f"{spec.name}--{quantizer}.json"
    diagnostics = probe(spec, text, settings, rounding, out)
    where = "document starts" if settings.windows == "document" else "the stream"
    print(
        f"{spec.name}: {settings.samples} x {settings.seq_len} tokens of {text.describe()} "
        f"(windows from {where}); SQNR under {quantizer}"
    )
    print(report(diagnostics))
    print(f"written: {out}")
    return 0


def _text_option(data: str | None, split: str | None, default: PerplexitySpec) -> PerplexitySpec:
    """The text named by --data / --split (a registered source), else `default`."""
    if data is None and split is None:
        return default
    if data is None and default.data == TASK_DATA:  # the recipe's task, another split
        if split not in TASK_SPLITS:
            raise QBenchError(f"--split: '{split}': a task's splits are {', '.join(TASK_SPLITS)}")
        return default.model_copy(update={"split": split})
    fields = {"data": data} if data else default.model_dump(exclude_none=True)
    try:
        return PerplexitySpec(**fields | ({"split": split} if split else {}))
    except ValidationError as error:
        problems = [e["msg"].removeprefix("Value error, ") for e in error.errors()]
        raise QBenchError(f"--data / --split: {'; '.join(problems)}") from None
