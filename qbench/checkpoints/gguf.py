"""GGUF checkpoints (llama.cpp's file format): read through transformers' GGUF support,
dequantized once into a Hugging Face folder cached by the file's sha256.

A recipe names a file (`gguf: PATH`) or a file of a hub repository (`hf: ID` with
`gguf_file: NAME`). At plan time `read_gguf` reads the file's header with the `gguf` package's
reader (architecture and the ggml type of every tensor) and refuses, in one line naming the file,
a tensor type the loader cannot dequantize; transformers refuses an architecture it cannot map
when the config is read (`gguf_config`). At load time `gguf_folder` has transformers load the
file with its weights dequantized into the checkpoint's dtype, and saves model and tokenizer (the
tokenizer comes from the file) as an ordinary HF folder under
$QBENCH_CACHE_DIR/checkpoints/gguf-<sha256[:16]>-<dtype>-<versions>, which every later cell and
run loads like a `path:` checkpoint.

The float weights of such a checkpoint are the file's dequantized values, not the weights it was
quantized from: `dequantized_from` names the quantized types ("Q4_1 / Q8_0"), which records
(the checkpoint identity's `gguf_types`) and leaderboards state.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from qbench.data.bpe import build_once
from qbench.environment import cache_dir, offline
from qbench.errors import QBenchError, describe

FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # ggml -> torch names


@dataclass(frozen=True)
class GgufContents:
    """What a GGUF file's header says: its llama.cpp architecture and {ggml type: tensors}."""

    path: Path
    architecture: str
    tensor_types: dict[str, int]

    @property
    def dtype(self) -> str:
        """The dtype `dtype: auto` loads it in (transformers' rule): the half type of a file
        of float tensors only (bfloat16 before float16), else float32."""
        types = set(self.tensor_types)
        if not types <= set(FLOAT_TYPES):
            return "float32"
        return next((FLOAT_TYPES[t] for t in ("BF16", "F16") if t in types), "float32")


def gguf_versions() -> dict[str, str]:
    """The libraries a dequantized folder depends on (its cache key holds them)."""
    return {"gguf": version("gguf"), "transformers": version("transformers")}


@functools.lru_cache(maxsize=16)
def _read(path: str, stamp: tuple[int, int, int]) -> GgufContents:
    from gguf import GGUFReader, dequantize

    try:
        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
    except Exception as error:  # the reader's errors for a bad file vary
        raise QBenchError(f"{path}: not a readable GGUF file ({describe(error)})") from None
    found: Counter[str] = Counter()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in found:  # the loader's own dequantizer, on the tensor's first row
            try:
                first_row = tensor.data[:1] if tensor.data.ndim > 1 else tensor.data
                dequantize(first_row, tensor.tensor_type)
            except NotImplementedError:
                raise QBenchError(
                    f"{path}: tensor {tensor.name} is of ggml type {kind}, which "
                    f"gguf {version('gguf')} (transformers' GGUF loader) cannot dequantize; "
                    "convert the file to a type it reads (F32, F16, Q8_0, Q4_K, ...)"
                ) from None
        found[kind] += 1
    return GgufContents(Path(path), architecture, dict(found.most_common()))


def read_gguf(path: Path) -> GgufContents:
    """The file's header (read once per file version and process); QBenchError naming the file
    for a file that is not GGUF or holds a tensor type transformers' loader cannot dequantize."""
    return _read(str(path.resolve()), _stamp(path))


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


# ggml's legacy block types: (bits, weights per block, what each block stores beside them)
BLOCK_GRIDS = {
    "Q4_0": (4, 32, "a scale"),
    "Q4_1": (4, 32, "a scale and a minimum"),
    "Q5_0": (5, 32, "a scale"),
    "Q5_1": (5, 32, "a scale and a minimum"),
    "Q8_0": (8, 32, "a scale"),
}


def grid_caveat(tensor_types: dict[str, int] | None) -> str | None:
    """Why weight-only quantization on the grid of the file's main block type (the type of
    most tensors among BLOCK_GRIDS) measures the file, not the method: e.g. Q4_1's weights lie
    on a 4-bit grid of groups of 32 with a scale and a minimum each, which a 4-bit asymmetric
    quantizer with group 32 finds again. None for a file without such a type."""
    kind = next((t for t in tensor_types or {} if t in BLOCK_GRIDS), None)
    if kind is None:
        return None
    bits, block, stored = BLOCK_GRIDS[kind]
    return (
        f"its {kind} tensors already lie on a {bits}-bit grid of groups of {block} ({stored} "
        f"per group), so weight-only quantization with {bits} or more bits and group {block} "
        "(or a divisor of it) rounds them back nearly losslessly by construction: such a cell "
        "measures the file's grid, not the method (read per-channel or larger groups)"
    )


def dequantized_from(tensor_types: dict[str, int] | None) -> str | None:
    """The quantized ggml types of a file, most tensors first ("Q4_1 / Q8_0"); None for a
    file of float tensors only (or no GGUF)."""
    quantized = [t for t in tensor_types or {} if t not in FLOAT_TYPES]
    return " / ".join(quantized) or None


def gguf_file(path: str) -> Path:
    """The checked local file of a `gguf:` checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise QBenchError(f"no such file '{path}' (relative to {Path.cwd()}); give a .gguf file")
    return file


def hub_gguf(repo: str, filename: str, commit: str) -> Path:
    """The local copy of `filename` of hub model `repo` at `commit` (downloaded once online;
    offline, the hub cache's). QBenchError when neither has it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=commit, local_files_only=offline()))
    except Exception as error:  # unreachable hub, absent file: the hub library's errors vary
        raise QBenchError(
            f"cannot get gguf_file '{filename}' of '{repo}' at {commit[:12]} ({describe(error)}); "
            "download it once online, or use gguf: <file>"
        ) from None


def gguf_config(path: Path) -> PretrainedConfig:
    """The model config transformers derives from the file's metadata (read once per file
    version and process); QBenchError naming the file and its architecture where transformers
    cannot map it."""
    return copy.deepcopy(_config(str(path.resolve()), _stamp(path)))


@functools.lru_cache(maxsize=16)
def _config(file: str, stamp: tuple[int, int, int]) -> PretrainedConfig:
    path = Path(file)
    contents = read_gguf(path)
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # "GGUF model with architecture ... is not supported yet."
        raise QBenchError(
            f"{path}: transformers {version('transformers')} cannot read GGUF architecture "
            f"'{contents.architecture}' ({describe(error)})"
        ) from None


def gguf_folder(path: Path, sha256: str, dtype: str, progress: bool = True) -> Path:
    """The HF folder of the file dequantized into `dtype`, converted first if not cached."""
    versions = json.dumps(gguf_versions(), sort_keys=True).encode()
    suffix = hashlib.sha256(versions).hexdigest()[:8]
    target = cache_dir() / "checkpoints" / f"gguf-{sha256[:16]}-{dtype}-{suffix}"
    return build_once(target, lambda out: _convert(path, sha256, dtype, out, progress))


def _convert(path: Path, sha256: str, dtype: str, out: Path, progress: bool) -> None:
    """Load the file through transformers (weights dequantized into `dtype`), and save a plain
    copy: the loaded model keeps transformers' GGUF quantizer, whose models refuse saving."""
    if progress:
        print(f"qbench: dequantizing {path} into {dtype}, once ({out.parent})", file=sys.stderr)
    contents = read_gguf(path)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    source = {
        "gguf": path.name,
        "sha256": sha256,
        "architecture": contents.architecture,
        "tensor_types": contents.tensor_types,
        "dtype": dtype,
        "versions": gguf_versions(),
    }
    (out / "gguf_source.json").write_text(json.dumps(source, indent=2))
