"""Tasks run on exactly the model the perplexity ran on, for every method and backend.

lm-eval's HFLM calls `model.tie_weights()` on the model it wraps, which ties lm_head to the
input embedding again wherever the config says `tie_word_embeddings` (stories260K does).
A quantizer that gives them different weights unties them for good.
"""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.api import quantize_
from qbench.data.sources import load_text
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.quantizer import QuantizerConfig

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 4}
CONFIGS = {
    "rtn-embeddings": {"method": "rtn", "weights": {"bits": 4}, "embeddings": True},
    "rtn-lm_head": {"method": "rtn", "weights": {"bits": 4}, "lm_head": True},
    "rtn-both": {
        "method": "rtn",
        "weights": {"bits": 4},
        "activations": {"bits": 8},
        "lm_head": True,
        "embeddings": True,
    },
    "smoothquant-lm_head": {
        "method": "smoothquant",
        "weights": {"bits": 8},
        "activations": {"bits": 8},
        "lm_head": True,
        "calibration": CALIBRATION,
    },
    "gptq-both": {
        "method": "gptq",
        "weights": {"bits": 4},
        "lm_head": True,
        "embeddings": True,
        "calibration": CALIBRATION,
    },
    "rotation": {"method": "rotation", "weights": {"bits": 4}},
    "rotation-both": {
        "method": "rotation",
        "weights": {"bits": 4},
        "lm_head": True,
        "embeddings": True,
    },
    "gptq-rotate": {
        "method": "gptq",
        "rotate": True,
        "weights": {"bits": 4},
        "calibration": CALIBRATION,
    },
    "bnb-int8-lm_head": {"method": "bitsandbytes", "scheme": "int8", "lm_head": True},
    "bnb-nf4-lm_head": {"method": "bitsandbytes", "scheme": "nf4", "lm_head": True},
    "quanto-lm_head": {"method": "quanto", "weight_qtype": "qint8", "lm_head": True},
}


@pytest.fixture(scope="module")
def stories(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir), stories_dir


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lm_eval_computes_the_logits_of_the_perplexity_path(name, stories):
    tokenizer, path = stories
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.tie_word_embeddings  # the case lm-eval re-ties
    float_embedding = model.get_input_embeddings().weight.detach().clone()
    spec = {"name": name, **CONFIGS[name]}
    config = QuantizerConfig.model_validate(spec)
    torch.manual_seed(0)
    quantize_(model, config, tokenizer)
    ids = tokenizer(load_text("embedded", "test"), return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # what qbench's perplexity computes
        hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)  # calls tie_weights()
        assert hflm.model is model
        assert torch.equal(hflm._model_call(ids), expected)
    if config.embeddings:  # rounded as `weights` says (gptq used to leave it in float)
        rounded = fake_quant(float_embedding, WeightQuant.model_validate(spec["weights"]))
        if config.method != "rotation":  # rotation rounds the rotated embedding
            assert torch.equal(model.get_input_embeddings().weight, rounded)
    head = model.get_output_embeddings()
    assert getattr(head, "weight", None) is not model.get_input_embeddings().weight
