"""Checkpoints from the hub, a local HF directory, trained here, or random from a config,
and their identity.

Errors say what is wrong with the checkpoint's source; the planner prefixes the
file and the field (e.g. `checkpoints[1].path`).
"""

from __future__ import annotations

import hashlib
import re
import sys
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
from qbench.checkpoints.dispatch import default_device, input_device, offloaded_modules
from qbench.checkpoints.random import random_checkpoint, random_config, random_digest
from qbench.checkpoints.train import (
    TrainConfig,
    cache_dir,
    model_config,
    train_config,
    trained_checkpoint,
)
from qbench.errors import QBenchError, describe, warn
from qbench.eval.tasks import offline
from qbench.files import read_text_nofollow, write_json_atomic
from qbench.quant.walk.inventory import linear_conv1d
from qbench.recipe import CheckpointSpec

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

# Config fields that are sizes: a positive integer wherever a config has them.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


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


def check_sizes(config: PretrainedConfig, where: str) -> None:
    """Every size field the (text) config has is a positive integer, else a QBenchError."""
    text = config.get_text_config()
    for name in SIZE_FIELDS:
        value = getattr(text, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise QBenchError(f"{where}: {name}: must be a positive integer, got {value!r}")


_ABSENT_IF_NONE = Field(default=None, exclude_if=lambda value: value is None)


class CheckpointIdentity(BaseModel):
    """What a checkpoint's result key holds of its content; stored in every record.

    train: the training-config digest (`train:`); random: the digest of a random checkpoint's
    resolved config, seed, planted channel, tokenizer corpus and library versions (`random:`);
    hf / revision / commit: the hub id, the revision the recipe names and the commit it
    resolved to (`hf:`); files: the sha256 of each file that determines the model or its
    tokenizer (`path:`; see IDENTITY_FILES).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: str | None = _ABSENT_IF_NONE
    random: str | None = _ABSENT_IF_NONE
    hf: str | None = _ABSENT_IF_NONE
    revision: str | None = _ABSENT_IF_NONE
    commit: str | None = _ABSENT_IF_NONE
    files: dict[str, str] | None = _ABSENT_IF_NONE


def checkpoint_identity(spec: CheckpointSpec) -> CheckpointIdentity:
    """The checkpoint's content identity (reading files and refs, never loading weights).

    Raises QBenchError for a missing directory or an `hf:` revision neither the hub nor the
    local cache can resolve to a commit.
    """
    if spec.train is not None:
        return CheckpointIdentity(train=spec_train_config(spec).digest())
    if spec.random is not None:
        return CheckpointIdentity(random=random_digest(spec.random, random_config(spec.random)))
    if spec.hf is not None:
        revision = spec.revision or "main"
        return CheckpointIdentity(
            hf=spec.hf, revision=revision, commit=hub_commit(spec.hf, revision)
        )
    return CheckpointIdentity(files=directory_digests(local_dir(spec)))


def identity_files(directory: Path) -> list[Path]:
    """The files of a model directory that determine its model and tokenizer, sorted."""
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and (path.name in IDENTITY_FILES or path.name.endswith(IDENTITY_SUFFIXES))
    )


def directory_digests(directory: Path) -> dict[str, str]:
    """{file name: sha256} of the directory's identity files (whole contents), each hashed once
    per (resolved path, size, mtime, ctime, inode, device) and remembered in
    $QBENCH_CACHE_DIR/file-digests.json."""
    known = _read_digest_cache()
    digests, changed = {}, False
    for path in identity_files(directory):
        resolved = path.resolve()
        stamp = _stamp(resolved)
        entry = known.get(str(resolved))
        if entry is None or entry.stamp != stamp:
            entry = DigestEntry(stamp=stamp, sha256=_sha256(resolved))
            if _stamp(resolved) == stamp:  # not rewritten while we read it
                known[str(resolved)], changed = entry, True
        digests[path.name] = entry.sha256
    if changed:
        write_json_atomic(_digest_cache_path(), {k: v.model_dump() for k, v in known.items()})
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
    """The remembered digests; an unreadable cache is ignored (and rewritten) with a warning."""
    path = _digest_cache_path()
    try:
        return _DIGEST_CACHE.validate_json(read_text_nofollow(path, DIGEST_CACHE_LIMIT))
    except FileNotFoundError:
        return {}
    except ValueError as error:  # a ValidationError too
        warn(f"{path}: ignored ({describe(error)}); file digests are recomputed")
        return {}


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


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
    if not offloaded_modules(model):  # an offloaded Conv1D's hook holds its [in, out] weight
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


def load_identified(
    spec: CheckpointSpec, identity: CheckpointIdentity, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the checkpoint exactly as planned: an `hf:` checkpoint at the planned commit, a
    `path:` checkpoint only while its files still have the planned digests (QBenchError
    naming the changed files otherwise)."""
    if identity.files is not None:
        now = directory_digests(local_dir(spec))
        changed = sorted(
            n for n in now.keys() | identity.files.keys() if now.get(n) != identity.files.get(n)
        )
        if changed:
            raise QBenchError(
                f"checkpoint '{spec.name}': {', '.join(changed)} changed in '{spec.path}' since "
                "the plan; rerun to plan (and key) the new files"
            )
    return load_checkpoint(spec, progress, commit=identity.commit)
