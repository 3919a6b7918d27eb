"""Restore, don't copy: a loaded model quantized in place, cell after cell, and put back.

A sweep evaluates one checkpoint under many quantizers. Deep-copying the model for each cell
holds two models at once (and more while a method works); instead the worker keeps the
loaded model's weights once, on disk, and each cell quantizes the loaded model itself.
`Pristine` then undoes the cell:

- the module tree: every module's children, parameters, buffers, hooks and instance
  attributes as they were (the methods replace linears by QuantLinear, wrap writers in an
  online Hadamard, swap norms, install KV steps and expert input steps, give a LayerNorm's
  readers a bias, untie lm_head); every config object's attributes (attention and experts
  implementations, tie_word_embeddings);
- the weights: every parameter and buffer read back from a safetensors file written once
  when the model was loaded, straight into the tensors' storage (`readinto`, tensor by
  tensor through a small buffer for GPU tensors), so neither the page cache nor a second
  copy counts in the process's memory.

For this to hold memory at about one model, the methods round weights in place (QuantLinear
keeps the linear's Parameter; experts and routers are rounded slice by slice): the snapshot
then refers to the very tensors the quantized model uses. A module whose weights a library
replaced (bitsandbytes, quanto) is put back with its original Parameter objects, which the
restore refills.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# safetensors dtype names (the file's header) of the dtypes qbench models use
_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
}


@dataclass
class _ModuleState:
    module: nn.Module
    children: dict
    parameters: dict
    buffers: dict
    attributes: dict  # plain attributes (a None that a module later replaced included)
    pre_hooks: dict
    hooks: dict


class Pristine:
    """The loaded model's state, to put it back after each quantized cell.

    `folder`: where the weights file goes (deleted by `close`). Raises ValueError for a model
    holding a dtype safetensors cannot store.
    """

    def __init__(self, model: nn.Module, folder: Path) -> None:
        self.model = model
        self.modules = [_snapshot(m) for m in model.modules()]
        self.configs = {id(c): (c, dict(vars(c))) for c in _configs(model)}
        handle, name = tempfile.mkstemp(dir=folder, prefix="pristine-", suffix=".safetensors")
        os.close(handle)
        self.path = Path(name)
        self.names = _tensor_names(model)  # storage key -> every name sharing it
        save_file({key: t.detach().cpu().contiguous() for key, t in self._tensors().items()},
                  str(self.path))  # fmt: skip
        self.offsets = _offsets(self.path)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """One tensor per storage (tied weights once), by its first name."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named |= dict(self.model.named_buffers(remove_duplicate=False))
        return {key: named[key] for key in self.names}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the module tree, configs and every weight back as they were at load."""
        for state in self.modules:
            _put_back(state)
        for config, attributes in self.configs.values():
            for extra in set(vars(config)) - set(attributes):
                delattr(config, extra)
            vars(config).update(attributes)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named |= dict(self.model.named_buffers(remove_duplicate=False))
        with open(self.path, "rb", buffering=0) as file:
            for key in self.names:
                start, end, shape, dtype = self.offsets[key]
                target = named[key]
                if target.shape != shape or target.dtype != dtype:  # a library freed it
                    target.data = torch.empty(shape, dtype=dtype, device=target.device)
                _read_into(file, start, end, target)

    def close(self) -> None:
        """Delete the weights file."""
        self.path.unlink(missing_ok=True)


_TABLES = {"_modules", "_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks"}


def _snapshot(module: nn.Module) -> _ModuleState:
    return _ModuleState(
        module,
        dict(module._modules),
        dict(module._parameters),
        dict(module._buffers),
        {k: v for k, v in vars(module).items() if k not in _TABLES},
        dict(module._forward_pre_hooks),
        dict(module._forward_hooks),
    )


def _put_back(state: _ModuleState) -> None:
    module = state.module
    for extra in set(vars(module)) - state.attributes.keys() - _TABLES:
        delattr(module, extra)
    vars(module).update(state.attributes)  # e.g. kv_transform = None, which a module replaced
    for table, saved in (
        (module._modules, state.children),
        (module._parameters, state.parameters),
        (module._buffers, state.buffers),
        (module._forward_pre_hooks, state.pre_hooks),
        (module._forward_hooks, state.hooks),
    ):
        table.clear()
        table.update(saved)


def _configs(model: nn.Module) -> list[object]:
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "__dict__"):
            found[id(config)] = config
            for sub in vars(config).values():  # text / vision sub-configs
                if hasattr(sub, "to_dict") and hasattr(sub, "__dict__"):
                    found[id(sub)] = sub
    return list(found.values())


def _tensor_names(model: nn.Module) -> dict[str, list[str]]:
    """{first name: [names]} per distinct tensor (tied weights share one entry)."""
    groups: dict[int, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if tensor is None:
            continue
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot keep {name}: dtype {tensor.dtype} has no safetensors name")
        groups.setdefault(id(tensor), []).append(name)
    return {names[0]: names for names in groups.values()}


def _offsets(path: Path) -> dict[str, tuple[int, int, torch.Size, torch.dtype]]:
    """{name: (start, end, shape, dtype)} of every tensor in a safetensors file (byte offsets
    from the start of the file), read from its JSON header."""
    dtypes = {v: k for k, v in _DTYPES.items()}
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    base = 8 + length
    return {
        name: (
            base + entry["data_offsets"][0],
            base + entry["data_offsets"][1],
            torch.Size(entry["shape"]),
            dtypes[entry["dtype"]],
        )
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _read_into(file, start: int, end: int, target: torch.Tensor) -> None:
    """Read bytes [start, end) of `file` into `target`'s storage (through a CPU buffer when
    the tensor lives on another device)."""
    file.seek(start)
    if target.device.type == "cpu" and target.is_contiguous():
        view = memoryview(target.detach().reshape(-1).view(torch.uint8).numpy())
        file.readinto(view)
        return
    buffer = torch.empty(end - start, dtype=torch.uint8)
    file.readinto(memoryview(buffer.numpy()))
    target.copy_(buffer.view(target.dtype).reshape(target.shape))
