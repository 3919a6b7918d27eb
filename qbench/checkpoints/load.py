"""Checkpoints from the hub, a local HF directory, a GGUF file, trained here, or random from a
config, and their identity.

Errors say what is wrong with the checkpoint's source; the planner prefixes the
file and the field (e.g. `checkpoints[1].path`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qbench.checkpoints import model as _family  # noqa: F401  (registers model_type "qbench")
from qbench.checkpoints.dispatch import default_device, input_device
from qbench.checkpoints.gguf import gguf_config, gguf_file, gguf_folder, hub_gguf, read_gguf
from qbench.checkpoints.limits import check_sizes
from qbench.checkpoints.random import random_checkpoint, random_config, random_digest
from qbench.checkpoints.spec import CheckpointIdentity, CheckpointSpec
from qbench.checkpoints.train import TrainConfig, model_config, train_config, trained_checkpoint
from qbench.environment import cache_dir, offline
from qbench.errors import QBenchError, describe, warn
from qbench.files import read_text_nofollow, regular_file_problem, write_json_atomic
from qbench.quant.walk.inventory import linear_conv1d

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The files of a model directory that its identity (and so its result keys) covers: weights,
# config, generation config, tokenizer files, and code a checkpoint may run (trust_remote_code).
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
IDENTITY_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".index.json",  # sharded weights
    ".model",  # sentencepiece
    ".tiktoken",
    ".py",  # remote code
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILE_LIMIT = 256 << 20  # bytes of a config, tokenizer or code file (weights: any size)


def local_dir(spec: CheckpointSpec) -> Path:
    """The checked local directory of a `path:` checkpoint: every file of its identity
    (IDENTITY_FILES, IDENTITY_SUFFIXES) a regular file, config, tokenizer and code files at
    most MODEL_FILE_LIMIT bytes (a FIFO would block the load, a device never end)."""
    directory = Path(spec.path).expanduser()
    if not directory.is_dir():
        raise QBenchError(f"no such directory '{spec.path}' (relative to {Path.cwd()})")
    for path in sorted(directory.iterdir()):
        if _identity_name(path.name) and not path.is_dir():
            limit = 1 << 62 if path.name.endswith(WEIGHT_SUFFIXES) else MODEL_FILE_LIMIT
            if problem := regular_file_problem(path, limit):
                raise QBenchError(f"'{path}': {problem}; a model directory holds regular files")
    if not (directory / "config.json").is_file():
        raise QBenchError(f"'{spec.path}' has no config.json; give a Hugging Face model directory")
    return directory


def _identity_name(name: str) -> bool:
    return name in IDENTITY_FILES or name.endswith(IDENTITY_SUFFIXES)


def spec_train_config(spec: CheckpointSpec) -> TrainConfig:
    t = spec.train
    return train_config(t.preset, t.variant, t.corpus, t.seed, t.steps, t.task)


def checkpoint_config(spec: CheckpointSpec, commit: str | None = None) -> PretrainedConfig:
    """The model config, without loading (or training) any weights; sizes checked.

    `commit`: the hub commit to read an `hf:` config at (its identity's), instead of whatever
    `spec.revision` names now. Raises QBenchError naming config.json for a config transformers
    cannot read, or with a size field that is not a positive integer.
    """
    if spec.train is not None:
        return model_config(spec_train_config(spec))
    if spec.random is not None:
        return random_config(spec.random)
    if spec.is_gguf:
        config = gguf_config(gguf_path(spec, commit))
        check_sizes(config, f"{gguf_path(spec, commit)} config")
        return config
    source = local_dir(spec) if spec.path else spec.hf
    try:
        config = AutoConfig.from_pretrained(
            source, revision=commit or spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as error:  # transformers' errors for a bad or absent config vary
        if spec.path:
            raise QBenchError(
                f"cannot read {Path(source) / 'config.json'}: {describe(error)}"
            ) from None
        raise QBenchError(
            f"cannot load '{spec.hf}' from the hub or its local cache ({type(error).__name__}); "
            "where the hub is unreachable, download it elsewhere and use path: <directory>"
        ) from None
    check_sizes(config, f"{Path(source) / 'config.json'}" if spec.path else f"'{spec.hf}' config")
    return config


def checkpoint_identity(spec: CheckpointSpec) -> CheckpointIdentity:
    """The checkpoint's content identity (reading files and refs, never loading weights).

    Raises QBenchError for a missing directory or an `hf:` revision neither the hub nor the
    local cache can resolve to a commit.
    """
    if spec.train is not None:
        return CheckpointIdentity(train=spec_train_config(spec).digest())
    if spec.random is not None:
        return CheckpointIdentity(random=random_digest(spec.random, random_config(spec.random)))
    hub = {}
    if spec.hf is not None:
        revision = spec.revision or "main"
        hub = {"hf": spec.hf, "revision": revision, "commit": hub_commit(spec.hf, revision)}
        if spec.gguf_file is None:
            return CheckpointIdentity(**hub)
    if spec.is_gguf:
        path = gguf_path(spec, hub.get("commit"))
        types = read_gguf(path).tensor_types
        return CheckpointIdentity(**hub, gguf=file_digest(path), gguf_types=types)
    return CheckpointIdentity(files=directory_digests(local_dir(spec)))


def gguf_path(spec: CheckpointSpec, commit: str | None = None) -> Path:
    """The local GGUF file of a `gguf:` checkpoint, or of an `hf:` one's `gguf_file` at
    `commit` (default: the commit `spec.revision` names now)."""
    if spec.gguf is not None:
        return gguf_file(spec.gguf)
    commit = commit or hub_commit(spec.hf, spec.revision or "main")
    return hub_gguf(spec.hf, spec.gguf_file, commit)


def identity_files(directory: Path) -> list[Path]:
    """The files of a model directory that determine its model and tokenizer, sorted."""
    found = (path for path in directory.iterdir() if path.is_file() and _identity_name(path.name))
    return sorted(found)


def directory_digests(directory: Path) -> dict[str, str]:
    """{file name: sha256} of the directory's identity files (whole contents), through the
    digest cache of `_digests`."""
    return _digests(identity_files(directory))


def file_digest(path: Path) -> str:
    """The sha256 of one file, through the digest cache of `_digests`."""
    return _digests([path])[path.name]


def _digests(paths: list[Path]) -> dict[str, str]:
    """{file name: sha256} of `paths`. A file owned by this user and writable by no one else is
    hashed once per (resolved path, size, mtime, ctime, inode, device), remembered in
    $QBENCH_CACHE_DIR/file-digests.json (itself trusted only when this user owns it and no one
    else may write it); any other file is hashed at every plan, since whoever may write it, or
    the cache, could pair new bytes with an old digest."""
    known = _read_digest_cache()
    digests, changed = {}, False
    for path in paths:
        resolved = path.resolve()
        stamp = _stamp(resolved)
        trusted = _own_file(resolved.stat())
        entry = known.get(str(resolved)) if trusted else None
        if entry is None or entry.stamp != stamp:
            entry = DigestEntry(stamp=stamp, sha256=_sha256(resolved))
            if trusted and _stamp(resolved) == stamp:  # not rewritten while we read it
                known[str(resolved)], changed = entry, True
        digests[path.name] = entry.sha256
    if changed:
        entries = {k: v.model_dump() for k, v in known.items()}
        write_json_atomic(_digest_cache_path(), entries, mode=0o600)  # this user's alone
    return digests


class DigestEntry(BaseModel):
    """A file's sha256 and the stat fields it was computed under."""

    model_config = ConfigDict(extra="forbid")

    stamp: list[int]  # size, mtime_ns, ctime_ns, inode, device
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


_DIGEST_CACHE = TypeAdapter(dict[str, DigestEntry])
DIGEST_CACHE_LIMIT = 64 << 20  # bytes
ANNOUNCE_HASH_BYTES = 1 << 30  # files this large get a line when first hashed


def _digest_cache_path() -> Path:
    return cache_dir() / "file-digests.json"


def _read_digest_cache() -> dict[str, DigestEntry]:
    """The remembered digests; an unreadable cache, or one another user owns or may write, is
    ignored (and rewritten) with a warning."""
    path = _digest_cache_path()
    try:
        text = read_text_nofollow(path, DIGEST_CACHE_LIMIT)
        if not _own_file(path.stat()):
            raise ValueError("owned by another user or writable by others, so not trusted")
        return _DIGEST_CACHE.validate_json(text)
    except FileNotFoundError:
        return {}
    except ValueError as error:  # a ValidationError too
        warn(f"{path}: ignored ({describe(error)}); file digests are recomputed")
        return {}


def _own_file(status: os.stat_result) -> bool:
    """Owned by this process's user, and writable by neither its group nor others."""
    return status.st_uid == os.geteuid() and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _stamp(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev]


def _sha256(path: Path) -> str:
    size = path.stat().st_size
    if size >= ANNOUNCE_HASH_BYTES:  # about a second per GiB: say why planning waits
        print(f"qbench: sha256 of {path} ({size / 2**30:.1f} GiB), once", file=sys.stderr)
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_commit(repo: str, revision: str) -> str:
    """The commit hash `revision` (a branch, tag or commit) of hub model `repo` names now: from
    the hub when online, else from the local cache's refs/ (as transformers resolves it
    offline). QBenchError when neither knows it."""
    if COMMIT.fullmatch(revision):
        return revision
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            return HfApi().model_info(repo, revision=revision, timeout=30).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise QBenchError(
                f"the hub has no revision '{revision}' of '{repo}' ({describe(error)})"
            ) from None
        except Exception:  # unreachable hub: the local cache may know it
            pass
    cached = cached_commit(repo, revision)
    if cached is None:
        raise QBenchError(
            f"cannot resolve revision '{revision}' of '{repo}' to a commit: the hub is "
            f"unreachable or off and the local cache ({hub_cache_dir()}) has no such ref; "
            "download it once online, or use path: <directory>"
        )
    return cached


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_commit(repo: str, revision: str) -> str | None:
    """The commit the local hub cache's refs/<revision> of `repo` holds, if its snapshot is
    there."""
    from huggingface_hub.file_download import repo_folder_name

    folder = hub_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        commit = read_text_nofollow(folder / "refs" / revision, 100).strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT.fullmatch(commit) and (folder / "snapshots" / commit).is_dir() else None


def checkpoint_dtype(spec: CheckpointSpec, config: PretrainedConfig) -> str:
    """The dtype the checkpoint loads in: `spec.dtype`, or for `auto` the config's own.

    A trained checkpoint is float32 (the trainer's). Raises QBenchError when `auto` finds no
    dtype in config.json or one qbench does not evaluate in.
    """
    if spec.dtype != "auto":
        return spec.dtype
    if spec.train is not None:
        return "float32"
    if spec.is_gguf:
        return read_gguf(gguf_path(spec)).dtype
    dtype = config.dtype
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if name not in DTYPES:
        found = f"names {name}" if name else "names no dtype (torch_dtype / dtype)"
        raise QBenchError(
            f"dtype auto: the checkpoint's config {found}; give dtype: {' | '.join(DTYPES)}"
        )
    return name


def load_checkpoint(
    spec: CheckpointSpec, progress: bool = True, commit: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model (eval mode) and tokenizer; train or build a random one first if needed.

    Without a device_map the model goes to the default device (CUDA if any); with one,
    accelerate places (and offloads) its modules and the model is not moved. `commit`: the hub
    commit to load for an `hf:` checkpoint (its planned identity), instead of whatever
    `spec.revision` names now.
    """
    revision = commit or spec.revision
    if spec.train is not None:
        source = str(trained_checkpoint(spec_train_config(spec), progress))
    elif spec.random is not None:
        source = str(random_checkpoint(spec.random, progress))
    else:
        source = str(local_dir(spec)) if spec.path else spec.hf
    dtype = spec.dtype
    if dtype == "auto":  # planned cells name the resolved dtype; a direct call resolves it here
        dtype = checkpoint_dtype(spec, checkpoint_config(spec, commit))
    hub = {"revision": revision, "local_files_only": offline()}  # offline: the hub cache only
    if spec.is_gguf:  # its dequantized folder, like path:
        path = gguf_path(spec, commit)
        source, hub = str(gguf_folder(path, file_digest(path), dtype, progress)), {}
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=DTYPES[dtype],
        trust_remote_code=spec.trust_remote_code,
        device_map=spec.device_map,
        offload_folder=spec.offload_folder,
        **hub,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=spec.trust_remote_code, **hub
    )
    linear_conv1d(model)  # GPT-2's [in, out] Conv1D as nn.Linear: one layout to quantize
    if spec.device_map is None:
        model.to(default_device())
    check_causal(model.eval())
    return model, tokenizer


CAUSAL_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # half precision: 1e-3


@torch.no_grad()
def check_causal(model: PreTrainedModel) -> None:
    """QBenchError when a token's logits depend on later tokens: an encoder loaded as a causal
    LM (BERT without is_decoder), whose perplexity would read the future. Two forward passes of
    16 fixed tokens whose last 8 differ: the first 8 positions' logits must agree within
    CAUSAL_TOLERANCE of the model's dtype (relative to their largest magnitude)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 8:] = (ids[0, 8:] + 1) % vocab
    device = input_device(model)
    before = model(input_ids=ids.to(device)).logits[:, :8].double()
    if not before.isfinite().all():
        return  # the cell's non-finite perplexity says what is wrong
    after = model(input_ids=changed.to(device)).logits[:, :8].double()
    moved = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    dtype = next(model.parameters()).dtype
    if not moved <= CAUSAL_TOLERANCE.get(dtype, 1e-3):
        raise QBenchError(
            f"{model.config.model_type}: the logits of earlier tokens change with later tokens "
            f"(by {moved:.1e} relative): not a causal language model, so its perplexity would "
            "read the future; qbench measures decoders (for BERT-like models: is_decoder: true)"
        )


@dataclass(frozen=True)
class Stamps:
    """The stat stamps (size, mtime, ctime, inode, device) of a `path:` checkpoint's identity
    files, taken before it loads: `check` after the load (and after each cell, since weights
    may be memory-mapped) proves that the bytes read are the bytes the plan hashed."""

    spec: CheckpointSpec
    stamps: dict[str, list[int]]

    @classmethod
    def take(cls, spec: CheckpointSpec) -> Stamps:
        return cls(spec, _directory_stamps(local_dir(spec)))

    def check(self, when: str) -> None:
        """QBenchError naming the files that changed (or appeared, or went) `when`."""
        try:
            now = _directory_stamps(local_dir(self.spec))
        except QBenchError:
            now = {}
        names = now.keys() | self.stamps.keys()
        changed = sorted(n for n in names if now.get(n) != self.stamps.get(n))
        if changed:
            raise QBenchError(
                f"checkpoint '{self.spec.name}': {', '.join(changed)} changed in "
                f"'{self.spec.path}' {when}: what was read may not be what the plan hashed; "
                "rerun to plan (and key) the files as they are"
            )


def _directory_stamps(directory: Path) -> dict[str, list[int]]:
    return {path.name: _stamp(path.resolve()) for path in identity_files(directory)}


def load_identified(
    spec: CheckpointSpec, identity: CheckpointIdentity, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Stamps | None]:
    """Load the checkpoint exactly as planned: an `hf:` checkpoint at the planned commit, a
    `path:` or GGUF checkpoint only while its files still have the planned digests, and a
    `path:` one unchanged until the load returns (QBenchError naming the changed files
    otherwise). Returns the model, the tokenizer and, for `path:`, the files' stamps (check
    them after using the model: qbench.runner)."""
    if identity.gguf is not None:
        path = gguf_path(spec, identity.commit)
        if file_digest(path) != identity.gguf:
            raise QBenchError(
                f"checkpoint '{spec.name}': {path} changed since the plan; rerun to plan (and "
                "key) the new file"
            )
    stamps = None
    if identity.files is not None:
        stamps = Stamps.take(spec)  # before the digests: a later change shows in check()
        now = directory_digests(local_dir(spec))
        changed = sorted(
            n for n in now.keys() | identity.files.keys() if now.get(n) != identity.files.get(n)
        )
        if changed:
            raise QBenchError(
                f"checkpoint '{spec.name}': {', '.join(changed)} changed in '{spec.path}' since "
                "the plan; rerun to plan (and key) the new files"
            )
    model, tokenizer = load_checkpoint(spec, progress, commit=identity.commit)
    if stamps is not None:
        stamps.check("while it loaded")
    return model, tokenizer, stamps
