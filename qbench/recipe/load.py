"""Reading a recipe file: a bounded YAML loader (yaml's safe loader, with libyaml where built).

At most MAX_RECIPE_BYTES, MAX_DEPTH levels of nesting, MAX_NODES nodes (an alias or merge key
counts as the nodes it stands for, so a "billion laughs" or merge-key bomb is refused before
it is built), MAX_ALIASES aliases and MAX_MERGE_KEYS merge keys; a key given twice in one
mapping is an error (checked in linear time). Every error names the file and the field path.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qbench.files import utf8_text
from qbench.recipe.errors import RecipeError, causes, describe_error
from qbench.recipe.schema import Recipe

MAX_RECIPE_BYTES = 256 << 10
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_ALIASES = 256
MAX_MERGE_KEYS = 256


_LIBYAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where built
_MERGE = "tag:yaml.org,2002:merge"


class _RecipeLoader(_LIBYAML):
    """yaml's safe loader that rejects a key given twice in one mapping (explicit keys; a
    `<<: *anchor` merge may be overridden by them), in linear time."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # a list or mapping used as a key
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                ) from None
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass
class _Open:
    """A collection being streamed: its anchor, the node count at its start, its kind."""

    anchor: str | None
    start: int
    mapping: bool
    items: int = 0


def _check_bounds(text: str) -> str | None:
    """The first limit the YAML exceeds (a one-line problem with its line), or None.

    Streams the parser's events (no tree is built, no recursion), so the check is linear in
    the text and stops at the first excess: an alias counts as the nodes of its anchor, which
    is what constructing it would expand to.
    """
    sizes: dict[str, int] = {}
    stack: list[_Open] = []
    nodes = aliases = merges = 0
    for event in yaml.parse(text, Loader=_LIBYAML):
        if not isinstance(event, yaml.NodeEvent | yaml.CollectionEndEvent):
            continue
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionEndEvent):
            closed = stack.pop()
            if closed.anchor is not None:
                sizes[closed.anchor] = nodes - closed.start
            continue
        parent = stack[-1] if stack else None
        is_key = parent is not None and parent.mapping and parent.items % 2 == 0
        if parent is not None:
            parent.items += 1
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            nodes += sizes.get(event.anchor, 1)
        else:
            nodes += 1
        if isinstance(event, yaml.ScalarEvent):
            merges += is_key and event.value == "<<" and event.implicit[0]
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            stack.append(_Open(event.anchor, nodes - 1, isinstance(event, yaml.MappingStartEvent)))
        for count, limit, what in (
            (len(stack), MAX_DEPTH, "nesting depth"),
            (nodes, MAX_NODES, "number of nodes (aliases and merges expanded)"),
            (aliases, MAX_ALIASES, "number of aliases"),
            (merges, MAX_MERGE_KEYS, "number of merge keys (<<)"),
        ):
            if count > limit:
                return f"line {line}: the {what} exceeds {limit}; a recipe needs far fewer"
    return None


def _read_recipe(path: Path) -> str:
    """The recipe file's text: a regular UTF-8 file of at most MAX_RECIPE_BYTES."""
    try:
        if path.is_dir():
            raise RecipeError(f"{path}: a directory, not a recipe file")
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
            raise RecipeError(f"{path}: not a regular file; give a recipe (.yaml) file")
        with path.open("rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; not a recipe")
    try:
        return utf8_text(data)
    except ValueError as error:
        raise RecipeError(f"{path}: {error}; save the recipe as UTF-8") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one line: 'line L, column C: context: problem'."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f"{error.context}: " if error.context else ""
    return f"{where}{context}{error.problem}"


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise RecipeError naming the file and field."""
    path = Path(path)
    text = _read_recipe(path)
    try:
        problem = _check_bounds(text)
        if problem is not None:
            raise RecipeError(f"{path}: {problem}")
        data = yaml.load(text, Loader=_RecipeLoader)  # a safe loader
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name:, checkpoints:, eval:")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        problems = (describe_error(e, data) for e in causes(error.errors()))
        raise RecipeError("\n".join(f"{path}: {p}" for p in problems)) from None
