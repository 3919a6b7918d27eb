"""What a checkpoint may be before anything loads: config sizes, and the memory it needs.

`check_sizes`: every size field of a config is a positive integer. `memory_refusal`: why a
checkpoint cannot be loaded here, from its parameter count on the meta device (no weights)
times the bytes per parameter it loads in, against the memory it will load into: the CPU's
available memory (MemAvailable, within the process's cgroup limit), and the GPU's free memory
where the model goes to CUDA (it is read into CPU memory first).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from qbench.errors import QBenchError

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
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1 << 30


def check_sizes(config: PretrainedConfig, where: str = "") -> None:
    """Every size field the (text) config has is a positive integer, else a QBenchError
    naming the field (after `where`, the config's origin, if given)."""
    text = config.get_text_config()
    for name in SIZE_FIELDS:
        value = getattr(text, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            prefix = f"{where}: " if where else ""
            raise QBenchError(f"{prefix}{name}: must be a positive integer, got {value!r}")


def parameter_count(skeleton: nn.Module) -> int:
    """Parameters of a model built on the meta device (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in skeleton.parameters()}.values())


def memory_refusal(skeleton: nn.Module, dtype: str, built_in_float32: bool) -> str | None:
    """Why a model shaped like `skeleton` cannot be loaded here in `dtype` (None: it fits).

    `built_in_float32`: the weights are first initialised in float32 (a `random:` checkpoint
    not yet built). The estimate counts the weights alone, so a refusal is certain, a pass is
    not a promise."""
    count = parameter_count(skeleton)
    width = max(BYTES[dtype], 4 if built_in_float32 else 0)
    needed = count * width
    how = f"{count / 1e9:.2f}B parameters x {width} bytes"
    for available, where in _memories():
        if needed > available:
            return (
                f"needs about {needed / GIB:.1f} GiB for its weights alone ({how}), more than "
                f"the {available / GIB:.1f} GiB of {where}; use a machine with more memory, a "
                "smaller config, or device_map: auto with offload"
            )
    return None


def _memories() -> list[tuple[int, str]]:
    """(bytes, what) of each memory a model loads into: CPU memory available now, and the
    free memory of CUDA device 0 where there is one."""
    found = [cpu_memory()]
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        found.append((free, f"free memory on {torch.cuda.get_device_name(0)}"))
    return found


def cpu_memory() -> tuple[int, str]:
    """(bytes, what): MemAvailable of /proc/meminfo, or what the cgroup limit leaves if less."""
    available, where = _meminfo_available(), "CPU memory available (MemAvailable)"
    limit = _cgroup_room()
    if limit is not None and (available is None or limit < available):
        available, where = limit, "memory the cgroup limit leaves this process"
    if available is None:  # not Linux: physical memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "physical memory"
    return available, where


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """cgroup v2's memory.max − memory.current of this process's cgroup, if limited."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - current)
