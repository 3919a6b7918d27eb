"""qbench: a low-bit quantization benchmark harness for large language models.

From Python (qbench.api): `quantizer(...)`, `quantize_(model, config)`, `quantized(model,
config)` (a context manager that restores the float model), `evaluate(model, tokenizer,
perplexity=..., tasks=...)` and `load_recipe(path)`. Imported lazily: `import qbench` loads
neither torch nor transformers until one of them is used.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# transformers imports torchao when it is installed (a test dependency: reference arithmetic of
# the formats); its import logs, at every start, the CUDA kernels a CPU build cannot load and a
# deprecation notice of torch's pytree registry. Neither concerns qbench's results.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_EXPORTS = {
    "QuantizerConfig": "qbench.quant.quantizer",
    "evaluate": "qbench.api",
    "load_recipe": "qbench.api",
    "quantize_": "qbench.api",
    "quantized": "qbench.api",
    "quantizer": "qbench.api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qbench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
