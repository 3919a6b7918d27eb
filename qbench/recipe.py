"""The recipe: a YAML file validated into typed models at load time.

Every error names the file and the field path, e.g.
`recipes/x.yaml: quantizers[2].weights.bits: must be between 2 and 8`.
"""

from __future__ import annotations

import functools
import operator
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from qbench.checkpoints.model import variant_options
from qbench.checkpoints.train import PRESETS
from qbench.config import StrictModel
from qbench.data.sources import TEXT_SOURCES
from qbench.errors import QBenchError
from qbench.quant import METHODS

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecipeError(QBenchError):
    """A recipe that cannot run; the message names the file and the field."""


def _check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"'{name}' must be letters, digits, '.', '_' or '-' (it names files)")
    return name


def _in_registry(registry: Any, name: str) -> str:
    try:
        registry.get(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    return name


class TrainSpec(StrictModel):
    """A checkpoint trained here, cached by a hash of its full config."""

    preset: str = "tiny"
    variant: str = "baseline"
    corpus: str = "embedded"
    seed: int = 0
    steps: int | None = Field(default=None, ge=1)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        return _in_registry(PRESETS, preset)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str) -> str:
        variant_options(variant)  # raises ValueError naming the known variants
        return variant

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, corpus: str) -> str:
        source = TEXT_SOURCES.get(_in_registry(TEXT_SOURCES, corpus))
        if "train" not in source.splits:
            raise ValueError(f"'{corpus}' has no train split; use a corpus with one")
        return corpus


class CheckpointSpec(StrictModel):
    """One model: a hub id, a local HF directory, or trained here (exactly one)."""

    name: str
    hf: str | None = None
    revision: str | None = None
    path: str | None = None
    train: TrainSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    _name = field_validator("name")(_check_name)

    @property
    def source_field(self) -> str:
        """Which of hf / path / train this checkpoint comes from."""
        return next(k for k in ("hf", "path", "train") if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointSpec:
        given = [k for k in ("hf", "path", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hf:, path:, train: (got {given or 'none'})")
        if self.revision is not None and self.hf is None:
            raise ValueError("revision: applies to hf: checkpoints only")
        return self


class PerplexitySpec(StrictModel):
    """GPTQ-style token perplexity on one split of a text source."""

    data: str
    split: str = "test"
    seq_len: int = Field(default=2048, ge=2)
    batch_size: int = Field(default=8, ge=1)
    max_windows: int | None = Field(default=None, ge=1)
    name: str | None = None

    @field_validator("data")
    @classmethod
    def _known_data(cls, data: str) -> str:
        return _in_registry(TEXT_SOURCES, data)

    @model_validator(mode="after")
    def _known_split(self) -> PerplexitySpec:
        splits = TEXT_SOURCES.get(self.data).splits
        if self.split not in splits:
            raise ValueError(
                f"split '{self.split}' is not one of {self.data}'s splits: {', '.join(splits)}"
            )
        return self

    @property
    def column(self) -> str:
        """The key under metrics.perplexity and the leaderboard column."""
        return self.name or self.data


class EvalSpec(StrictModel):
    perplexity: list[PerplexitySpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_columns(self) -> EvalSpec:
        _reject_duplicates([p.column for p in self.perplexity], "perplexity", "give each a name:")
        return self


def _known_method(data: Any) -> Any:
    if isinstance(data, dict):
        _in_registry(METHODS, data.get("method", "(missing)"))
    return data


Quantizer = Annotated[
    functools.reduce(operator.or_, (METHODS.get(m) for m in METHODS)),
    Field(discriminator="method"),
    BeforeValidator(_known_method),
]


class Recipe(StrictModel):
    """Checkpoints x quantizers, evaluated as `eval` says."""

    name: str
    seed: int = 0
    checkpoints: list[CheckpointSpec] = Field(min_length=1)
    quantizers: list[Quantizer] = Field(default_factory=list)
    eval: EvalSpec

    _name = field_validator("name")(_check_name)

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        _reject_duplicates([c.name for c in self.checkpoints], "checkpoint", "rename one")
        names = [q.name for q in self.quantizers]
        if "fp" in names:
            raise ValueError("quantizer name 'fp' is reserved for the unquantized reference")
        _reject_duplicates([_check_name(n) for n in names], "quantizer", "rename one")
        return self


def _reject_duplicates(names: list[str], what: str, fix: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise ValueError(f"duplicate {what} name(s) {sorted(seen)}: {fix}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", node.start_mark
                )
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise RecipeError naming the file and field."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name:, checkpoints:, eval:")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError("\n".join(f"{path}: {_describe(e)}" for e in error.errors())) from None


def field_path(loc: tuple[Any, ...]) -> str:
    """('quantizers', 2, 'rtn', 'weights') -> 'quantizers[2].weights' (union tags dropped)."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif not (i and isinstance(loc[i - 1], int) and part in METHODS):
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _describe(error: dict[str, Any]) -> str:
    where = field_path(error["loc"])
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"
