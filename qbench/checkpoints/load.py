"""Checkpoints from the hub, a local HF directory, trained here, or random from a config.

Errors say what is wrong with the checkpoint's source; the planner prefixes the
file and the field (e.g. `checkpoints[1].path`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qbench.checkpoints import model as _family  # noqa: F401  (registers model_type "qbench")
from qbench.checkpoints.random import random_checkpoint, random_config, random_digest
from qbench.checkpoints.train import TrainConfig, model_config, train_config, trained_checkpoint
from qbench.errors import QBenchError
from qbench.recipe import CheckpointSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def local_dir(spec: CheckpointSpec) -> Path:
    """The checked local directory of a `path:` checkpoint."""
    directory = Path(spec.path).expanduser()
    if not directory.is_dir():
        raise QBenchError(f"no such directory '{spec.path}' (relative to {Path.cwd()})")
    if not (directory / "config.json").is_file():
        raise QBenchError(f"'{spec.path}' has no config.json; give a Hugging Face model directory")
    return directory


def spec_train_config(spec: CheckpointSpec) -> TrainConfig:
    t = spec.train
    return train_config(t.preset, t.variant, t.corpus, t.seed, t.steps)


def checkpoint_config(spec: CheckpointSpec) -> PretrainedConfig:
    """The model config, without loading (or training) any weights."""
    if spec.train is not None:
        return model_config(spec_train_config(spec))
    if spec.random is not None:
        return random_config(spec.random)
    source = local_dir(spec) if spec.path else spec.hf
    try:
        return AutoConfig.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as error:
        if spec.path:
            raise QBenchError(f"cannot read the config in '{spec.path}': {error}") from None
        raise QBenchError(
            f"cannot load '{spec.hf}' from the hub or its local cache ({type(error).__name__}); "
            "where the hub is unreachable, download it elsewhere and use path: <directory>"
        ) from None


def checkpoint_identity(spec: CheckpointSpec) -> dict[str, str]:
    """What identifies the weights in cache keys: train / random hash, file fingerprint, hub id."""
    if spec.train is not None:
        return {"train": spec_train_config(spec).digest()}
    if spec.random is not None:
        return {"random": random_digest(spec.random, random_config(spec.random))}
    if spec.hf is not None:
        return {"hf": spec.hf, "revision": spec.revision or "main"}
    return {"path_fingerprint": directory_fingerprint(local_dir(spec))}


def directory_fingerprint(directory: Path) -> str:
    """A cheap content fingerprint: config.json, and each weight file's size, head and tail."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(0, size - (1 << 20)))
            tail = handle.read()
        digest.update(f"{file.name}:{size}".encode() + head + tail)
    return digest.hexdigest()[:16]


def checkpoint_dtype(spec: CheckpointSpec, config: PretrainedConfig) -> str:
    """The dtype the checkpoint loads in: `spec.dtype`, or for `auto` the config's own.

    A trained checkpoint is float32 (the trainer's). Raises QBenchError when `auto` finds no
    dtype in config.json or one qbench does not evaluate in.
    """
    if spec.dtype != "auto":
        return spec.dtype
    if spec.train is not None:
        return "float32"
    dtype = config.dtype
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if name not in DTYPES:
        found = f"names {name}" if name else "names no dtype (torch_dtype / dtype)"
        raise QBenchError(
            f"dtype auto: the checkpoint's config {found}; give dtype: {' | '.join(DTYPES)}"
        )
    return name


def load_checkpoint(
    spec: CheckpointSpec, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model (eval mode) and tokenizer; train or build a random one first if needed.

    Without a device_map the model goes to the default device (CUDA if any); with one,
    accelerate places (and offloads) its modules and the model is not moved.
    """
    if spec.train is not None:
        source = str(trained_checkpoint(spec_train_config(spec), progress))
    elif spec.random is not None:
        source = str(random_checkpoint(spec.random, progress))
    else:
        source = str(local_dir(spec)) if spec.path else spec.hf
    dtype = spec.dtype if spec.dtype != "auto" else checkpoint_dtype(spec, checkpoint_config(spec))
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=spec.revision,
        dtype=DTYPES[dtype],
        trust_remote_code=spec.trust_remote_code,
        device_map=spec.device_map,
        offload_folder=spec.offload_folder,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if spec.device_map is None:
        model.to(device())
    return model.eval(), tokenizer
