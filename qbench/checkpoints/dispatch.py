"""Models dispatched by a device_map (accelerate): where inputs go, what is offloaded.

transformers' `from_pretrained(device_map=...)` hands the model to accelerate's
`dispatch_model`: each module of the map runs on its device; modules mapped to "cpu" (when
a GPU executes) or "disk" keep their weights off the device (on the meta device in the
model, in a CPU or disk store) and an `AlignDevicesHook` loads them for each forward.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import check_device_map
from torch import nn

from qbench.errors import QBenchError, RefusedError
from qbench.registry import did_you_mean


def default_device() -> torch.device:
    """Where models load and train: CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def device_label(model: nn.Module) -> str:
    """'cuda:0', 'cpu', or for a dispatched model its map's devices, e.g. 'device_map: 0, 1,
    disk' (the record's `device`)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len(set(map(str, device_map.values()))) > 1:
        return "device_map: " + ", ".join(sorted(set(map(str, device_map.values()))))
    return str(input_device(model))


# Why a quantized cell cannot run where modules are offloaded, after what is offloaded.
CANNOT_QUANTIZE_OFFLOADED = (
    "whose weights the quantizers cannot rewrite in place (an offloaded module's weight is a "
    "meta placeholder its hook fills at each forward): evaluate it unquantized (fp) only, or "
    "give a device_map that keeps every module on a GPU"
)


def check_quantizable(model: nn.Module) -> None:
    """Raise RefusedError when a quantizer would meet offloaded weights (what a device_map
    strategy such as `auto` offloaded shows only once the model is loaded)."""
    offloaded = offloaded_modules(model)
    if offloaded:
        raise RefusedError(
            f"the checkpoint's device_map offloads {len(offloaded)} modules to cpu/disk (e.g. "
            f"{offloaded[0]}), {CANNOT_QUANTIZE_OFFLOADED}"
        )


def offload_refusal(device_map: str | dict[str, Any] | None) -> str | None:
    """'offloads N modules to ... (e.g. name), ...' when a device_map mapping itself offloads
    modules: to "disk", or to "cpu" beside a GPU (accelerate's dispatch_model executes on the
    first GPU of the map and offloads its "cpu" modules then); None for no map, a strategy
    name (what it offloads depends on the memory found at load) or a map without offload."""
    if not isinstance(device_map, dict):
        return None
    gpu = any(where not in ("cpu", "disk") for where in device_map.values())
    offloaded = [m for m, to in device_map.items() if to == "disk" or (gpu and to == "cpu")]
    if not offloaded:
        return None
    devices = "/".join(sorted({str(device_map[m]) for m in offloaded}))
    return (
        f"offloads {len(offloaded)} modules to {devices} (e.g. {offloaded[0] or 'the model'}), "
        f"{CANNOT_QUANTIZE_OFFLOADED}"
    )


def check_gpus(device_map: dict[str, Any]) -> None:
    """Every GPU a device_map names exists here; QBenchError naming the first that does not."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for module, where in device_map.items():
        index = where if isinstance(where, int) else None
        if isinstance(where, str) and where.startswith("cuda"):
            index = int(where.partition(":")[2] or 0)
        if index is not None and index >= count:
            have = f"{count} CUDA devices" if count else "no CUDA device"
            raise QBenchError(
                f"'{module or '(the whole model)'}' goes to GPU {index}, but this machine has "
                f"{have}; map it to cpu, or remove device_map"
            )


def check_module_map(device_map: dict[str, Any], skeleton: nn.Module) -> None:
    """Every key of `device_map` names a module of `skeleton` (the model on the meta device),
    and the keys cover every parameter (accelerate's own check). Raises QBenchError."""
    modules = [name for name, _ in skeleton.named_modules()]
    for key in device_map:
        if key not in modules:
            raise QBenchError(
                f"'{key}' is no module of this {skeleton.config.model_type} model"
                f"{did_you_mean(key, modules)}; use module names such as model.layers.0"
            )
    try:
        check_device_map(skeleton, device_map)
    except ValueError as error:  # it lists every uncovered parameter: keep the first ones
        text = " ".join(str(error).split())
        raise QBenchError(text if len(text) <= 300 else text[:300] + " ...") from None
