"""Why a quantizer cannot run on a model, decided before any model work: the one check the
planner (on a checkpoint's skeleton, no weights) and `quantize_` / `QuantizerConfig.apply` (on
the model itself) share, so a quantizer the runner refuses is refused through the API too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qbench.quant.formats.spec import KVQuant, divides_error
from qbench.quant.walk.select import quantized_targets

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.walk.inventory import Inventory


def refusal_of(
    quantizer: QuantizerConfig,
    where: str,
    checkpoint: str,
    config: Any,
    found: Inventory,
    context: tuple[int, str] | None = None,
) -> str | None:
    """Why `quantizer` (named `where` in messages, e.g. "quantizers[2] 'w4a4'") cannot run on
    `checkpoint` (its name) with config `config` (a transformers PretrainedConfig, or None for
    a bare module tree) and inventory `found`, as a line naming the field: a step's
    calibration windows longer than the `context` ((tokens, what says so); default: the
    config's max_position_embeddings), a KV group that does not divide head_dim, a group or
    block that does not divide a target's width, or what the method itself cannot do on this
    architecture (`QuantizerConfig.refusal`). None: it can run."""
    text = text_config(config)
    limit = getattr(text, "max_position_embeddings", None)
    context = context or ((limit, "max_position_embeddings") if limit is not None else None)
    for field, calibration in quantizer.calibrations() if context is not None else ():
        if calibration.seq_len > context[0]:
            field = "calibration" if quantizer.method else field  # as the recipe wrote it
            return (
                f"{where}.{field}.seq_len: {calibration.seq_len} exceeds checkpoint "
                f"'{checkpoint}''s {context[1]} {context[0]}; use seq_len <= {context[0]}"
            )
    if (
        quantizer.kv is not None
        and text is not None
        and (problem := _kv_misfit(quantizer.kv, text))
    ):
        return f"{where}.kv.{problem} of checkpoint '{checkpoint}'"
    if misfit := next(_misfits(quantizer, found), None):
        field, layer, problem, fix = misfit
        return f"{where}.{field}: {problem} of layer {layer} in checkpoint '{checkpoint}'; {fix}"
    if problem := quantizer.refusal(found):
        kind = f" ({text.model_type})" if text is not None else ""
        return f"{where} ({quantizer.method}) on checkpoint '{checkpoint}'{kind}: {problem}"
    return None


def text_config(config: Any) -> Any:
    """The text model's config of a (possibly composite) config; None stays None."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _misfits(quantizer: QuantizerConfig, found: Inventory) -> Iterator[tuple[str, str, str, str]]:
    """(field path, layer, problem, fix) for each target input width `quantizer` cannot
    quantize: its weight / activation formats, then the method's own fields."""
    widths = {
        f"{name}.{param}" if target.experts else name: width
        for name, target in quantized_targets(found, quantizer).items()
        for param, width in target.input_widths().items()
    }
    embeddings = {}
    if quantizer.embeddings and found.embeddings:
        table = next(iter(found.embeddings.items()))
        embeddings = {table[0]: table[1].weight.shape[1]}
    roles = {"weights": widths | embeddings, "activations": widths}
    for role, layers in roles.items():
        spec = getattr(quantizer, role)
        for layer, width in layers.items() if spec is not None else ():
            if problem := divides_error(spec, width):
                field, text, fix = problem
                yield f"{role}.{field}", layer, text, fix
    for layer, width in widths.items():
        if problem := quantizer.width_error(width):
            field, text, fix = problem
            yield field, layer, text, fix


def kv_widths(text: Any) -> set[int]:
    """The widths of the keys and values per head of a text config: head_dim, or MLA's key and
    value widths."""
    if getattr(text, "qk_rope_head_dim", None) and getattr(text, "v_head_dim", None):
        return {text.qk_nope_head_dim + text.qk_rope_head_dim, text.v_head_dim}
    width = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {width}


def _kv_misfit(kv: KVQuant, text: Any) -> str | None:
    """'field: problem' when the KV groups or blocks do not divide the key/value width."""
    for width in sorted(kv_widths(text)):
        if kv.block is not None and width % kv.block:
            what = (
                f"group {kv.group} does"
                if kv.group
                else f"{kv.format}'s {kv.block}-element blocks do"
            )
            return (
                f"{'group' if kv.group else 'format'}: {what} not divide head_dim {width}; use a "
                f"group that divides {width}, or no group (one scale per token and head)"
            )
    return None
