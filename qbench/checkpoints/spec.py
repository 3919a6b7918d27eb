"""What a recipe says of a checkpoint, and what its result key holds of its content (no torch:
a recipe is validated without importing the model libraries, except where a `random:` config
must be built to be checked)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from qbench.checkpoints.catalog import PRESETS, variant_options
from qbench.config import Count, Seed, StrictModel, check_name
from qbench.data.sources import text_source
from qbench.data.synthetic import TaskField, TaskSource
from qbench.errors import QBenchError
from qbench.registry import did_you_mean

REVISION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
HUB_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")


_ABSENT_IF_NONE = Field(default=None, exclude_if=lambda value: value is None)


class CheckpointIdentity(BaseModel):
    """What a checkpoint's result key holds of its content; stored in every record.

    train: the training-config digest (`train:`); random: the digest of a random checkpoint's
    resolved config, seed, planted channel, tokenizer corpus and library versions (`random:`);
    hf / revision / commit: the hub id, the revision the recipe names and the commit it
    resolved to (`hf:`); files: the sha256 of each file that determines the model or its
    tokenizer (`path:`; see IDENTITY_FILES); gguf: the sha256 of a GGUF file (`gguf:`, or `hf:`
    with `gguf_file:`, beside hf / revision / commit), gguf_types: its tensors per ggml type
    (what its float weights were dequantized from).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: str | None = _ABSENT_IF_NONE
    random: str | None = _ABSENT_IF_NONE
    hf: str | None = _ABSENT_IF_NONE
    revision: str | None = _ABSENT_IF_NONE
    commit: str | None = _ABSENT_IF_NONE
    files: dict[str, str] | None = _ABSENT_IF_NONE
    gguf: str | None = _ABSENT_IF_NONE
    gguf_types: dict[str, int] | None = _ABSENT_IF_NONE


class MassiveChannel(StrictModel):
    """One residual channel scaled up in the input embedding (a planted massive activation)."""

    dim: int = Field(ge=0)
    scale: float


class RandomSpec(BaseModel):
    """A random checkpoint: a config file and/or a model_type, config fields inline, a seed.

    Keys other than the four below are config fields of the model type, checked against its
    transformers config class (an unknown field is an error with a "did you mean").
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    config: str | None = None  # a config.json, relative to the working directory
    model_type: str | None = None  # default: the config file's
    seed: Seed = 0
    massive_channel: MassiveChannel | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The config fields given inline."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _checked(self) -> RandomSpec:
        """Without a config file everything is known now: build the config (no weights)."""
        from qbench.checkpoints.random import config_class, random_config  # transformers

        if self.model_type is not None:
            config_class(self.model_type)
        if self.config is None:
            try:
                random_config(self)
            except QBenchError as error:
                raise ValueError(str(error)) from None
        return self


def _in_registry(registry: Any, name: str) -> str:
    try:
        registry.get(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    return name


class TrainSpec(StrictModel):
    """A checkpoint trained here, cached by a hash of its full config: on the text of
    `corpus`, or with `task:` on a synthetic task over it (qbench.data.synthetic; `task:
    bigram-backcopy` or `task: {name: bigram-backcopy, vocabulary: ..., vocab_size: ...,
    triggers: ...}`), whose sequences are the preset's seq_len long."""

    preset: str = "tiny"
    variant: str = "baseline"
    corpus: str = "embedded"
    seed: Seed = 0
    steps: Count | None = None
    task: TaskField | None = None

    def task_source(self) -> TaskSource | None:
        """The task's held-out data as perplexity data (None without a task)."""
        if self.task is None:
            return None
        return TaskSource(self.task, self.corpus, PRESETS.get(self.preset).seq_len)

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
        """A registered text source with a train split, or a folder of .txt files."""
        try:
            source = text_source(corpus)
        except QBenchError as error:
            raise ValueError(str(error)) from None
        if "train" not in source.splits:
            raise ValueError(f"'{corpus}' has no train split; use a corpus with one")
        return corpus


SOURCES = ("hf", "path", "gguf", "train", "random")
GGUF_FILE_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*\.gguf")


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: Any) -> Any:
    """A strategy name, or module name -> GPU index, "cuda[:i]", "cpu" or "disk"."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        hint = did_you_mean(device_map, list(DEVICE_MAP_STRATEGIES))
        raise ValueError(
            f"'{device_map}' is no device_map strategy{hint}; use "
            f"{', '.join(DEVICE_MAP_STRATEGIES)} or a mapping of module names to devices"
        )
    for module, where in device_map.items() if isinstance(device_map, dict) else ():
        gpu = isinstance(where, int) and not isinstance(where, bool) and where >= 0
        named = isinstance(where, str) and re.fullmatch(r"cpu|disk|cuda(:\d+)?", where)
        if not (gpu or named):
            raise ValueError(
                f"'{module}': {where!r} is not a device; use a GPU index (0, 1, ...), "
                "cuda:<i>, cpu or disk"
            )
    return device_map


class CheckpointSpec(StrictModel):
    """One model: a hub id, a local HF directory, a GGUF file, trained here, or random (exactly
    one).

    `gguf: PATH` (a llama.cpp .gguf file) and `hf: ID` with `gguf_file: NAME` (a file of that
    hub repository) are dequantized once into the checkpoint's dtype (qbench.checkpoints.gguf);
    their identity is the file's sha256.

    `seeds: [0, 1, 2]` (train: and random: only) stands for one checkpoint per seed, named
    `<name>@<seed>` and grouped under `<name>`; leaderboards aggregate a group over its
    members. `group:` puts checkpoints given one by one into a group.
    `dtype: auto` is the checkpoint's own (config.json's dtype / torch_dtype), resolved at plan
    time. `device_map` (accelerate, through transformers) spreads the model over GPUs and
    offloads to "cpu" / "disk" (`offload_folder`); inputs go to the first module's device.
    """

    name: str
    hf: str | None = None
    revision: str | None = None
    path: str | None = None
    gguf: str | None = None
    gguf_file: str | None = None  # with hf: a .gguf file of the repository
    train: TrainSpec | None = None
    random: RandomSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device_map: Annotated[str | dict[str, int | str] | None, BeforeValidator(_check_device_map)] = (
        None
    )
    offload_folder: str | None = None
    trust_remote_code: StrictBool = False  # only a YAML true runs a checkpoint's own code
    group: str | None = None
    seeds: list[Seed] | None = Field(default=None, min_length=1)

    _name = field_validator("name", "group")(check_name)

    @field_validator("hf")
    @classmethod
    def _hub_id(cls, repo: str) -> str:
        """A name the hub accepts (huggingface_hub's validate_repo_id): [namespace/]name, each
        1-96 letters, digits, '_', '-', '.', not starting or ending with '-' or '.', without
        '--' or '..'."""
        parts = repo.split("/")
        if len(parts) > 2 or not all(HUB_NAME.fullmatch(p) and "--" not in p and ".." not in p
                                     for p in parts):  # fmt: skip
            raise ValueError(
                f"{repo!r} is not a hub model id ([namespace/]name: letters, digits, '_', '-', "
                "'.'); for a local directory use path:"
            )
        return repo

    @field_validator("revision")
    @classmethod
    def _safe_revision(cls, revision: str) -> str:
        if not REVISION_PATTERN.fullmatch(revision) or ".." in revision:
            raise ValueError(f"{revision!r} is not a branch, tag or commit name")
        return revision

    @field_validator("gguf_file")
    @classmethod
    def _safe_gguf_file(cls, name: str) -> str:
        if not GGUF_FILE_PATTERN.fullmatch(name) or ".." in name:
            raise ValueError(f"{name!r} is not a .gguf file name of a repository")
        return name

    @property
    def source_field(self) -> str:
        """Which of hf / path / train / random this checkpoint comes from."""
        return next(k for k in SOURCES if getattr(self, k) is not None)

    @property
    def is_gguf(self) -> bool:
        """A GGUF file's checkpoint (`gguf:`, or `hf:` with `gguf_file:`)."""
        return self.gguf is not None or self.gguf_file is not None

    @property
    def seeded(self) -> TrainSpec | RandomSpec | None:
        """The part of the spec that takes a seed (train: or random:), if any."""
        return self.train if self.train is not None else self.random

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointSpec:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of hf:, path:, gguf:, train:, random: (got {given or 'none'})"
            )
        if self.revision is not None and self.hf is None:
            raise ValueError("revision: applies to hf: checkpoints only")
        if self.gguf_file is not None and self.hf is None:
            raise ValueError("gguf_file: applies to hf: checkpoints only (a local file: gguf:)")
        if self.seeds is not None:
            if self.seeded is None:
                raise ValueError(
                    "seeds: applies to train: and random: checkpoints; group others with group:"
                )
            if "seed" in self.seeded.model_fields_set:
                raise ValueError(f"give seeds: or {self.source_field}.seed, not both")
            if len(set(self.seeds)) < len(self.seeds):
                raise ValueError(f"seeds: {self.seeds} lists a seed twice")
        return self

    @model_validator(mode="after")
    def _offload_folder(self) -> CheckpointSpec:
        to_disk = isinstance(self.device_map, dict) and "disk" in self.device_map.values()
        if to_disk and self.offload_folder is None:
            raise ValueError("device_map offloads to disk: give offload_folder: <directory>")
        if self.offload_folder is not None and self.device_map is None:
            raise ValueError("offload_folder: applies with a device_map only")
        return self

    def expand(self) -> list[CheckpointSpec]:
        """This checkpoint, or one per seed of `seeds` (named name@seed, grouped by name)."""
        if self.seeds is None:
            return [self]
        return [
            self.model_copy(
                update={
                    "name": f"{self.name}@{seed}",
                    "group": self.group or self.name,
                    "seeds": None,
                    self.source_field: self.seeded.model_copy(update={"seed": seed}),
                }
            )
            for seed in self.seeds
        ]
