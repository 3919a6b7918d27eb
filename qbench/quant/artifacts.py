"""What a step learned for a cell (SpinQuant's rotations), kept beside the cell's records so
that a rerun loads it instead of learning it again.

    results/<recipe>/learned/<key>.safetensors   the tensors (safetensors: nothing unpickled)
    results/<recipe>/learned/<key>.json          the sha256 of those bytes, what the key was
                                                 computed from, and what the step says of its
                                                 training (time, losses)

The key is the sha256 of everything the tensors depend on: the checkpoint's identity and
dtype (the store's), and what the step passes (its fields, the formats it trained against,
the transforms before it, the seed, the calibration text's fingerprint, package versions).
`load` reads the tensor file's bytes once, checks their sha256 against the record and parses
those same bytes: what is read is what was hashed. A record or tensor file that is missing,
altered or unparsable makes `load` raise StaleArtifact with the reason; the step then learns
again and `save` overwrites both files (atomically: qbench.files).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from qbench.files import (
    read_bytes_nofollow,
    read_text_nofollow,
    write_bytes_atomic,
    write_json_atomic,
)

LEARNED_FOLDER = "learned"  # results/<recipe>/learned
TENSORS_LIMIT = 16 << 30  # bytes; larger than any rotation qbench learns
RECORD_LIMIT = 16 << 20


class StaleArtifact(Exception):
    """A kept artifact that cannot be used (altered, truncated, unreadable): why."""


@dataclass(frozen=True)
class Learned:
    """Tensors read back (float64 as saved) with what their step said of their training."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class Artifacts:
    """A cell's store: `folder` (results/<recipe>/learned) and its checkpoint's identity and
    dtype, which every key holds."""

    folder: Path
    checkpoint: dict[str, Any]

    def key(self, determinants: dict[str, Any]) -> str:
        """sha256 (hex) of the checkpoint and the step's `determinants` (JSON-able)."""
        blob = json.dumps({"checkpoint": self.checkpoint, **determinants}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def paths(self, key: str) -> tuple[Path, Path]:
        """(tensor file, record) of `key`."""
        return self.folder / f"{key}.safetensors", self.folder / f"{key}.json"

    def load(self, key: str) -> Learned | None:
        """The tensors kept under `key`, None when nothing is; StaleArtifact (with the reason)
        when what is kept does not check out."""
        tensors_path, record_path = self.paths(key)
        try:
            record = json.loads(read_text_nofollow(record_path, RECORD_LIMIT))
            data = read_bytes_nofollow(tensors_path, TENSORS_LIMIT)
        except FileNotFoundError:
            if tensors_path.exists() or record_path.exists():
                raise StaleArtifact(f"{tensors_path.name} or its record is missing") from None
            return None
        except ValueError as error:
            raise StaleArtifact(f"{tensors_path.name}: unreadable ({error})") from None
        if not isinstance(record, dict) or record.get("key") != key:
            raise StaleArtifact(f"{record_path.name} is not the record of this key")
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.get("sha256"):
            raise StaleArtifact(
                f"{tensors_path.name} changed since it was written (sha256 {digest[:12]}..., "
                f"recorded {str(record.get('sha256'))[:12]}...)"
            )
        try:
            tensors = load_tensors(data)
        except Exception as error:  # a digest that matches bytes safetensors cannot parse
            raise StaleArtifact(f"{tensors_path.name}: not a safetensors file ({error})") from None
        return Learned(tensors, record.get("info", {}), tensors_path)

    def save(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        info: dict[str, Any],
        determinants: dict[str, Any],
    ) -> Path:
        """Write the tensors and their record under `key`; the tensor file's path."""
        data = save_tensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
        tensors_path, record_path = self.paths(key)
        write_bytes_atomic(tensors_path, data)
        write_json_atomic(
            record_path,
            {
                "key": key,
                "sha256": hashlib.sha256(data).hexdigest(),
                "determinants": {"checkpoint": self.checkpoint, **determinants},
                "info": info,
            },
        )
        return tensors_path
