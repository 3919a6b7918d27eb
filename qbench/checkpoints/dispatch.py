"""Models dispatched by a device_map (accelerate): where inputs go, what is offloaded.

transformers' `from_pretrained(device_map=...)` hands the model to accelerate's
`dispatch_model`: each module of the map runs on its device; modules mapped to "cpu" (when
a GPU executes) or "disk" keep their weights off the device (on the meta device in the
model, in a CPU or disk store) and an `AlignDevicesHook` loads them for each forward.
What the quantizers need of a dispatched model (`input_device`, `offloaded_modules`,
`check_quantizable`) lives in qbench.quant.walk.onload, which qbench.quant may import
(qbench.checkpoints imports qbench.quant, not the reverse: tests/test_imports.py).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import check_device_map
from torch import nn

from qbench.errors import QBenchError
from qbench.quant.walk.onload import CANNOT_QUANTIZE_OFFLOADED, input_device
from qbench.registry import did_you_mean


def default_device() -> torch.device:
    """Where models load and train: CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(model: nn.Module) -> str:
    """'cuda:0', 'cpu', or for a dispatched model its map's devices, e.g. 'device_map: 0, 1,
    disk' (the record's `device`)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len(set(map(str, device_map.values()))) > 1:
        return "device_map: " + ", ".join(sorted(set(map(str, device_map.values()))))
    return str(input_device(model))


def offload_refusal(device_map: str | dict[str, Any] | None, method: str) -> str | None:
    """'offloads N modules to ... (e.g. name), ...' when a device_map mapping itself offloads
    modules (to "disk", or to "cpu" beside a GPU: accelerate's dispatch_model executes on the
    first GPU of the map and offloads its "cpu" modules then) and library rounding `method`
    would meet them; None for no map, a strategy name (what it offloads depends on the memory
    found at load) or a map without offload."""
    if not isinstance(device_map, dict):
        return None
    gpu = any(where not in ("cpu", "disk") for where in device_map.values())
    offloaded = [m for m, to in device_map.items() if to == "disk" or (gpu and to == "cpu")]
    if not offloaded:
        return None
    devices = "/".join(sorted({str(device_map[m]) for m in offloaded}))
    return (
        f"offloads {len(offloaded)} modules to {devices} (e.g. {offloaded[0] or 'the model'}), "
        f"{CANNOT_QUANTIZE_OFFLOADED.format(method=method)}"
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
