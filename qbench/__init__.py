"""qbench: a low-bit quantization benchmark harness for large language models."""

import logging

# transformers imports torchao when it is installed (a test dependency: reference arithmetic of
# the formats); its import logs, at every start, the CUDA kernels a CPU build cannot load and a
# deprecation notice of torch's pytree registry. Neither concerns qbench's results.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
