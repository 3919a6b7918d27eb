"""Quantization, by layer (lower layers never import higher ones):

- formats/: number formats: the torch-free specs (spec.py) and their arithmetic (integer, fp,
  fake_quant, the compiled fast path, Hadamard matrices);
- walk/: the one model walk: the inventory of targets and how a quantizer selects them, the
  traced residual structure, expert slices, QuantLinear, coverage, KV-cache sites, block-by-
  block calibration, the restore;
- steps/: the steps a quantizer is made of, as torch-free configs registered under their names;
  methods/ (qbench's own arithmetic: smoothquant, awq, rotation, rtn, gptq) and backends/
  (bitsandbytes, optimum-quanto) do their work;
- quantizer.py (QuantizerConfig, torch-free), context.py (the StepContext every step receives),
  refusal.py (the planner's and the API's refusals), pipeline.py (running a quantizer).

The public API is qbench's (qbench.api): `quantize_`, `quantized`, `quantizer`, `evaluate`.
"""
