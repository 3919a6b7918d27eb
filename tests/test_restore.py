"""Restore, don't copy: after any method quantized a model in place, `Pristine.restore` puts
back the same modules and bit-identical weights, and the model computes what it did."""

from __future__ import annotations

import pytest
import torch
from conftest import family_model
from torch import nn
from transformers import AutoTokenizer

from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.inventory import linear_conv1d
from qbench.quant.walk.restore import Pristine

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
QUANTIZERS = {
    "rtn-embeddings-head": {"method": "rtn", "weights": {"bits": 4}, "activations": {"bits": 4},
                            "embeddings": True, "lm_head": True},
    "quarot-gptq-kv": {"method": "gptq", "rotate": True, "weights": {"bits": 4},
                       "activations": {"bits": 4}, "kv": {"bits": 4}, "calibration": CALIBRATION},
    "smoothquant": {"method": "smoothquant", "weights": {"bits": 8}, "activations": {"bits": 8},
                    "calibration": CALIBRATION},
    "routers": {"method": "rtn", "weights": {"bits": 4}, "activations": {"bits": 8},
                "routers": True},
    "bitsandbytes": {"method": "bitsandbytes", "scheme": "int8"},
}  # fmt: skip


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


CASES = [
    (family, quantizer)
    for family in ("llama", "gpt2", "qwen2_moe", "gemma2", "opt")
    for quantizer in QUANTIZERS
    if (family, quantizer) != ("qwen2_moe", "bitsandbytes")  # refused: test_architectures
]


@pytest.mark.parametrize(("family", "quantizer"), CASES)
def test_restore_puts_back_modules_and_weights_bit_for_bit(
    family, quantizer, tmp_path, tokenizer_dir
):
    fields = QUANTIZERS[quantizer]
    model = family_model(family)
    linear_conv1d(model)
    model.config.tie_word_embeddings = True  # a tie to untie and put back
    model.tie_weights()
    modules = {n: type(m) for n, m in model.named_modules()}
    state, fp = _state(model), _logits(model)
    pristine = Pristine(model, tmp_path)
    config = QuantizerConfig.model_validate({"name": "q", **fields})
    torch.manual_seed(0)
    config.apply(model, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert not torch.equal(_logits(model), fp)
    pristine.restore()
    assert {n: type(m) for n, m in model.named_modules()} == modules
    restored = _state(model)
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor), name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(_logits(model), fp)
    pristine.close()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("variant", ["baseline", "attn-bias", "gatednorm"])
def test_the_qbench_family_restores_its_kv_hook_and_quantizes_again(
    variant, tiny_model, tmp_path, tokenizer_dir
):
    """QBenchAttention's `kv_transform = None` is a plain attribute that the KV step replaces
    by a module: restore puts the None back, and the next cell (rotation, then RTN) runs."""
    model, tokenizer = tiny_model(variant), AutoTokenizer.from_pretrained(tokenizer_dir)
    fp = _logits(model)
    pristine = Pristine(model, tmp_path)
    for fields in ({"method": "rtn", "kv": {"bits": 4}}, QUANTIZERS["quarot-gptq-kv"]):
        torch.manual_seed(0)
        QuantizerConfig.model_validate({"name": "q", **fields}).apply(model, tokenizer)
        assert not torch.equal(_logits(model), fp)
        pristine.restore()
        assert all(getattr(m, "kv_transform", None) is None for m in model.modules())
        assert torch.equal(_logits(model), fp)
    pristine.close()
