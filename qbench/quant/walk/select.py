"""Which targets a quantizer rounds: target kinds (the inventory's) and module-name patterns.

Patterns follow compressed-tensors' `match_named_modules(model, targets, ignore)` convention
for names: `re:<regex>` is a regular expression matched at the start of the module's dotted
path (`re.match`), anything else a glob over the whole path (`fnmatch`, e.g.
`model.layers.*.mlp.down_proj`). A target is rounded when its kind is targeted (lm_head,
routers and embeddings only when asked), it matches one of `targets` (when given) and none of
`ignore`. This module imports no torch: recipes are validated with it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.walk.inventory import Inventory, Target

Kind = Literal["attention", "mlp", "experts", "router", "norm", "lm_head", "other"]
KINDS: tuple[Kind, ...] = ("attention", "mlp", "experts", "router", "norm", "lm_head", "other")
REGEX_PREFIX = "re:"


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid module-name pattern (an empty one, a bad regex), or None."""
    if not pattern or pattern == REGEX_PREFIX:
        return "an empty pattern matches nothing: give a module path, a glob or re:<regex>"
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as error:
            return f"{pattern!r} is not a regular expression: {error}"
    return None


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted module path `name` matches one of `patterns` (module docstring)."""
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            if re.match(pattern[len(REGEX_PREFIX) :], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def selected(name: str, targets: list[str] | None, ignore: list[str]) -> bool:
    """Whether the patterns keep module `name`: in `targets` (None: every name), not ignored."""
    return (targets is None or matches(name, targets)) and not matches(name, ignore)


def quantized_targets(found: Inventory, quantizer: QuantizerConfig) -> dict[str, Target]:
    """The targets of `found` that `quantizer` rounds: of a targeted kind
    (`QuantizerConfig.targeted_kinds`) and kept by its `targets:` / `ignore:` patterns."""
    kinds = quantizer.targeted_kinds()
    return {
        name: t
        for name, t in found.targets.items()
        if t.kind in kinds and selected(name, quantizer.targets, quantizer.ignore)
    }


def left_out(found: Inventory, quantizer: QuantizerConfig) -> dict[str, Target]:
    """The targets of a targeted kind that the quantizer's patterns leave in float."""
    kinds = quantizer.targeted_kinds()
    return {
        name: t
        for name, t in found.targets.items()
        if t.kind in kinds and not selected(name, quantizer.targets, quantizer.ignore)
    }
