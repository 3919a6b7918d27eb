"""Sequential onloading: a dispatched model's offloaded modules brought to their execution
device one region (a decoder block, the embedding, lm_head) at a time, changed in place by a
quantizer's step, and put back offloaded.

How accelerate offloads (`from_pretrained(device_map=...)` -> `dispatch_model`): a module mapped
to "disk" (or to "cpu" beside a GPU) holds meta placeholders, and its `AlignDevicesHook`
(offload=True) loads its tensors from a `weights_map` before each forward and drops them after.
The map reads a CPU state dict or an index of files: accelerate's .dat files in the offload
folder, or the checkpoint's own safetensors files, read in place.

`onloaded(model, path)`, as llm-compressor's sequential pipeline onloads a subgraph:

1. on entry, every offloading hook inside `model.<path>` loads its module's tensors (a copy, on
   its execution device) and is replaced by one that does not offload: the region is then an
   ordinary resident module, whose weights a method reads and writes in place and whose
   forward runs on them;
2. on exit, every module inside the region that holds parameters where an offloaded module
   was (that module itself, a module that took its place such as QuantLinear, the linear a
   wrapper such as rotation's HadamardInput now holds, a bias a method added) gets an
   offloading hook again, its parameters written to the model's `OffloadStore`: CPU memory
   for what lived in CPU memory, .dat files in a folder of its own under the offload folder
   for what lived on disk.

The original weights are never written (on disk they may be the checkpoint's own files):
restoring the model (qbench.quant.walk.restore) puts the original hooks back and drops the
stores made since. A region with nothing offloaded is left as it is (resident weights, or a
multi-GPU map: each module stays on its device). Peak memory on the execution device: the
resident modules, one region, and what the caller caches (calibration activations).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module
from accelerate.utils import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    named_module_tensors,
    offload_weight,
    set_module_tensor_to_device,
)
from torch import nn

from qbench.errors import RefusedError

STORES_ATTRIBUTE = "qbench_offload_stores"  # on the root model: the stores made for it


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's execution device (its hook's, when
    accelerate dispatched it; an offloaded embedding's weight is on the meta device)."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    return embedding.weight.device


def offloaded_modules(model: nn.Module) -> list[str]:
    """Modules whose weights accelerate keeps off their execution device (cpu / disk)."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "_hf_hook", None), "offload", False)
    ]


# Why a library's rounding cannot run where modules are offloaded, after what is offloaded.
CANNOT_QUANTIZE_OFFLOADED = (
    "whose weights {method} would replace by its own packed modules, which accelerate's offload "
    "cannot hold: use rtn or gptq (qbench's roundings onload one block at a time), or a "
    "device_map that keeps every module on a GPU"
)


def check_quantizable(model: nn.Module, method: str, library: bool) -> None:
    """Raise RefusedError when a library's rounding (`library`, named `method`) would meet
    offloaded weights (what a device_map strategy such as `auto` offloaded shows only once the
    model is loaded); qbench's own steps onload them (`onloaded` below)."""
    offloaded = offloaded_modules(model)
    if offloaded and library:
        raise RefusedError(
            f"the checkpoint's device_map offloads {len(offloaded)} modules to cpu/disk (e.g. "
            f"{offloaded[0]}), {CANNOT_QUANTIZE_OFFLOADED.format(method=method)}"
        )


@dataclass
class OffloadStore:
    """Where the changed weights of offloaded modules live: a CPU state dict and, for what
    lived on disk, .dat files with their index in `folder` (accelerate's format, read by its
    OffloadedWeightsLoader). `close()` deletes the folder."""

    folder: str | None = None
    cpu: dict[str, torch.Tensor] = field(default_factory=dict)
    index: dict[str, dict] = field(default_factory=dict)
    parent: str | None = None  # where `folder` is made (the offload folder), None: a temp dir
    frozen: bool = False  # a snapshot's (qbench.quant.walk.restore): never written again

    def __post_init__(self) -> None:
        self.loader = OffloadedWeightsLoader(state_dict=self.cpu, index=self.index)

    def put(self, key: str, tensor: torch.Tensor, on_disk: bool) -> None:
        """Keep `tensor` under `key` in CPU memory, or in a .dat file (`on_disk`)."""
        self.cpu.pop(key, None)
        self.index.pop(key, None)
        if not on_disk:
            self.cpu[key] = tensor.detach().to("cpu")
            return
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="qbench-offload-", dir=self.parent)
            self.loader.save_folder = self.folder
        offload_weight(tensor.detach().to("cpu"), key, self.folder, self.index)

    def close(self) -> None:
        """Drop the CPU tensors and delete the folder."""
        self.cpu.clear()
        self.index.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class _Site:
    """An offloaded module met on entry: its path, device, where its tensors lived, and
    whether its hook covered its submodules (accelerate's preloaded modules) and buffers."""

    path: str
    module: nn.Module
    device: torch.device
    on_disk: bool
    subtree: bool
    buffers: bool
    skip_keys: object


def offload_hook(module: nn.Module) -> AlignDevicesHook | None:
    """The module's accelerate hook that offloads its tensors, if it has one."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its (or its first hooked submodule's) accelerate execution
    device where it is dispatched, else its first parameter's or buffer's device (CPU when it
    has none)."""
    for inner in module.modules():
        device = getattr(getattr(inner, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        tensor = next(inner.parameters(recurse=False), None)
        tensor = tensor if tensor is not None else next(inner.buffers(recurse=False), None)
        if tensor is not None and tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(model: nn.Module, *paths: str) -> Iterator[None]:
    """The modules at `paths` (dotted, inside `model`) onloaded inside the block and put back
    offloaded after it (see the module docstring); nothing happens where none is offloaded."""
    sites = [site for path in paths for site in _onload(model, path)]
    if not sites:
        yield
        return
    try:
        yield
    finally:
        store = _store(model)
        for path in dict.fromkeys(paths):
            _offload(model, path, sites, store)
        _drop_replaced(model, sites)


def _onload(model: nn.Module, path: str) -> list[_Site]:
    sites = []
    for name, module in model.get_submodule(path).named_modules(prefix=path):
        hook = offload_hook(module)
        if hook is None:
            continue
        device = torch.device(hook.execution_device)
        tensors = named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
            remove_non_persistent=True,
        )  # fmt: skip
        on_disk = False
        for tensor_name, _ in list(tensors):
            stored = hook.weights_map[tensor_name]
            on_disk = on_disk or _lives_on_disk(hook.weights_map, tensor_name)
            value = stored.to(device)
            if value.data_ptr() == stored.data_ptr():  # never write the original in place
                value = value.clone()
            set_module_tensor_to_device(module, tensor_name, device, value=value)
        resident = AlignDevicesHook(device, place_submodules=hook.place_submodules,
                                    skip_keys=hook.skip_keys)  # fmt: skip
        add_hook_to_module(module, resident)
        sites.append(_Site(name, module, device, on_disk, hook.place_submodules,
                           hook.offload_buffers, hook.skip_keys))  # fmt: skip
    return sites


def _lives_on_disk(weights_map: object, name: str) -> bool:
    """Whether a weights map reads `name` from a file (else from CPU memory)."""
    if isinstance(weights_map, PrefixedDataset):
        return _lives_on_disk(weights_map.dataset, weights_map.prefix + name)
    if isinstance(weights_map, OffloadedWeightsLoader):
        return name not in weights_map.state_dict
    return False


def _store(model: nn.Module) -> OffloadStore:
    """The model's store for this call: its last one unless a snapshot froze it, else a new
    one (in the offload folder where the model was offloaded to disk)."""
    stores = vars(model).get(STORES_ATTRIBUTE, [])
    if stores and not stores[-1].frozen:
        return stores[-1]
    store = OffloadStore(parent=_offload_folder(model))
    vars(model)[STORES_ATTRIBUTE] = [*stores, store]  # a new list: a snapshot keeps the old one
    return store


def _offload_folder(model: nn.Module) -> str | None:
    for module in model.modules():
        hook = offload_hook(module)
        weights = getattr(hook, "weights_map", None)
        weights = getattr(weights, "dataset", weights)
        folder = getattr(weights, "save_folder", None)
        if folder is not None:
            return str(folder)
    return None


def _offload(model: nn.Module, path: str, sites: list[_Site], store: OffloadStore) -> None:
    """Offload again every module inside `path` that holds parameters where an offloaded
    module was (the nearest site at or above its path decides device and medium)."""
    by_path = {site.path: site for site in sites}
    covered: list[str] = []  # subtree sites: their hook covers everything below them
    for name, module in model.get_submodule(path).named_modules(prefix=path):
        if any(name.startswith(f"{c}.") for c in covered):
            continue
        site = _nearest(name, by_path)
        if site is None:
            continue
        tensors = list(
            named_module_tensors(module, include_buffers=site.buffers, recurse=site.subtree,
                                 remove_non_persistent=True)
        )  # fmt: skip
        if not tensors:
            continue
        if site.subtree:
            covered.append(name)
        for tensor_name, tensor in tensors:
            store.put(f"{name}.{tensor_name}", tensor, site.on_disk)
        hook = AlignDevicesHook(
            site.device, offload=True, weights_map=PrefixedDataset(store.loader, f"{name}."),
            offload_buffers=site.buffers, place_submodules=site.subtree, skip_keys=site.skip_keys,
        )  # fmt: skip
        add_hook_to_module(module, hook)  # its init sets the tensors to meta placeholders


def _drop_replaced(model: nn.Module, sites: list[_Site]) -> None:
    """Meta placeholders again in the onloaded modules a method took out of the model (a
    linear whose Parameter its QuantLinear took over, now offloaded): what still refers to
    them (an inventory's targets) would otherwise keep their onloaded copies in memory."""
    inside = {id(module) for module in model.modules()}
    for site in sites:
        if id(site.module) in inside:
            continue
        for name, _ in list(named_module_tensors(site.module, include_buffers=site.buffers,
                                                 recurse=site.subtree)):  # fmt: skip
            set_module_tensor_to_device(site.module, name, "meta")


def _nearest(name: str, sites: dict[str, _Site]) -> _Site | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        site = sites.get(".".join(parts[:end]))
        if site is not None:
            return site
    return sites.get("")


def freeze_stores(model: nn.Module) -> tuple[OffloadStore, ...]:
    """The stores of `model`, frozen: what changes the model later goes to a new store, so
    the weights they hold stay those of this moment (a restore's snapshot)."""
    stores = tuple(vars(model).get(STORES_ATTRIBUTE, ()))
    for store in stores:
        store.frozen = True
    return stores


def close_stores(model: nn.Module, keep: list[OffloadStore] | tuple = ()) -> None:
    """Delete the stores of `model` but those in `keep` (what a restore no longer needs)."""
    for store in vars(model).get(STORES_ATTRIBUTE, []):
        if not any(store is kept for kept in keep):
            store.close()
