"""Metrics that do not depend on the batch size: perplexity at batch 1 and 8, tasks at batch 1
and 32, for every activation granularity and format (dynamic scales per sequence at most)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.data.sources import load_text
from qbench.eval.perplexity import perplexity
from qbench.eval.tasks import evaluate_tasks
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import ActivationQuant
from qbench.quant.quantizer import QuantizerConfig

# Every format with each granularity it takes (mxfp4: its 32-blocks only; nvfp4: the scope of
# its FP32 scale). The test model's widths (64, 128) take every block and group.
ACTIVATIONS = {
    "int4-token": {"bits": 4},
    "int4-tensor": {"bits": 4, "granularity": "tensor"},
    "int4-g16": {"bits": 4, "group": 16},
    "int4-tensor-asym": {"bits": 4, "granularity": "tensor", "symmetric": False},
    "fp8-token": {"format": "fp8_e4m3"},
    "fp8-tensor": {"format": "fp8_e4m3", "granularity": "tensor"},
    "fp8-g16": {"format": "fp8_e4m3", "group": 16},
    "fp4-token": {"format": "fp4_e2m1"},
    "fp4-tensor": {"format": "fp4_e2m1", "granularity": "tensor"},
    "fp4-g16": {"format": "fp4_e2m1", "group": 16},
    "mxfp4": {"format": "mxfp4"},
    "nvfp4-token": {"format": "nvfp4"},
    "nvfp4-tensor": {"format": "nvfp4", "granularity": "tensor"},
}


def _config(activations: dict) -> QuantizerConfig:
    return QuantizerConfig.model_validate(
        {"name": "q", "method": "rtn", "weights": {"bits": 8}, "activations": activations}
    )


def test_tensor_granularity_is_one_scale_per_sequence():
    spec = ActivationQuant.model_validate({"bits": 4, "granularity": "tensor"})
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    x[1] *= 100  # a loud sequence does not coarsen the others' grids
    each = torch.stack([fake_quant(s, spec) for s in x])
    assert torch.equal(fake_quant(x, spec), each)
    assert not torch.equal(fake_quant(x.reshape(1, 15, 8), spec).reshape(3, 5, 8), each)
    x4 = x.reshape(3, 1, 5, 8)  # every leading dimension is a batch dimension
    assert torch.equal(fake_quant(x4, spec), each.reshape(3, 1, 5, 8))


@pytest.fixture(scope="module")
def qwen2(tiny_model, tokenizer_dir):
    return tiny_model("qwen2", intermediate_size=128), AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_perplexity_is_the_same_at_batch_1_and_8(name, qwen2):
    import copy

    model, tokenizer = copy.deepcopy(qwen2[0]), qwen2[1]
    quantize_(model, _config(ACTIVATIONS[name]))
    text = load_text("embedded", "test")
    scores = [
        perplexity(model, tokenizer, text, 32, batch, max_windows=16, progress=False).perplexity
        for batch in (1, 8)
    ]
    assert scores[0] == scores[1]


def _task_scores(model, tokenizer, batch_size: int, reason: str | None, folder) -> list:
    """[(doc, [log-likelihood per choice], acc, acc_norm)] of embedded_mc's first documents."""
    options = SimpleNamespace(
        batch_size=batch_size, limit=5, num_fewshot=0, bootstrap_iters=0, log_samples=True
    )
    specs = [SimpleNamespace(name="embedded_mc", limit=None, num_fewshot=None)]
    (run,) = evaluate_tasks(
        model, tokenizer, specs, options, samples_dir=folder, progress=False,
        one_request_per_call=reason,
    )  # fmt: skip
    assert run.batch_size == (1 if reason else batch_size) and run.requests == 20
    samples = [json.loads(line) for line in (folder / "embedded_mc.jsonl").read_text().split("\n")
               if line]  # fmt: skip
    return [
        (s["doc_id"], [r[0] for r in s["filtered_resps"]], s["acc"], s["acc_norm"]) for s in samples
    ]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_task_scores_are_the_same_at_batch_1_and_32(name, qwen2, tmp_path):
    """Every request's log-likelihood, as the cell's runner calls lm-eval.

    At batch 32 lm-eval pads the shorter requests on the right: per-token scales never see it,
    a per-sequence scale runs one request per call. The padding lengthens the sequences that
    attention reduces over, so an activation may move by a float32 ulp, and one lying at a
    rounding tie may land on the neighbouring grid point: a log-likelihood moves by 1e-5 of
    itself at most (a scale over the padded batch moved accuracies).
    """
    import copy

    model, tokenizer = copy.deepcopy(qwen2[0]), qwen2[1]
    config = _config(ACTIVATIONS[name])
    quantize_(model, config)
    reason = config.tokens_share_scales()
    assert (reason is not None) == ("tensor" in name)
    one = _task_scores(model, tokenizer, 1, reason, tmp_path / "1")
    many = _task_scores(model, tokenizer, 32, reason, tmp_path / "32")
    assert [(d, acc, norm) for d, _, acc, norm in one] == [(d, a, n) for d, _, a, n in many]
    for (_, a, _, _), (_, b, _, _) in zip(one, many, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=0)


def test_llm_int8_outlier_columns_are_chosen_per_sequence(qwen2):
    """bitsandbytes picks LLM.int8's fp16 columns over every token of a call; qbench calls it
    on one sequence at a time, so a loud sequence cannot change a quiet one's result."""
    import copy

    import bitsandbytes as bnb

    from qbench.quant.backends.bitsandbytes import per_sequence_linear8bitlt

    linear = torch.nn.Linear(64, 8)
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    x[1, :, 3] = 20.0  # an outlier column in the second sequence only
    outputs = {}
    for kind in (bnb.nn.Linear8bitLt, per_sequence_linear8bitlt()):
        layer = kind(64, 8, has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach(), requires_grad=False,
                                         has_fp16_weights=False)  # fmt: skip
        layer.bias = linear.bias
        layer = layer.to("cpu").eval()  # training mode would take the W8A16 path
        with torch.no_grad():
            outputs[kind] = (layer(x)[0], layer(x[:1])[0])
    together, alone = outputs[bnb.nn.Linear8bitLt]
    assert not torch.equal(together, alone)  # bitsandbytes alone: batch-dependent
    together, alone = outputs[per_sequence_linear8bitlt()]
    assert torch.equal(together, alone)

    model, tokenizer = copy.deepcopy(qwen2[0]), qwen2[1]
    config = {"name": "q", "method": "bitsandbytes", "scheme": "int8", "threshold": 0.5}
    quantize_(model, QuantizerConfig.model_validate(config))
    text = load_text("embedded", "test")
    scores = [
        perplexity(model, tokenizer, text, 32, batch, max_windows=8, progress=False).perplexity
        for batch in (1, 8)
    ]
    assert scores[0] == scores[1]
