"""Integer fake quantization against hand-computed values; QuantLinear; quantize_ with RTN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qbench.api import quantize_
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import ActivationQuant, WeightQuant
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.linear import QuantLinear


def _w(**kw) -> WeightQuant:
    return WeightQuant.model_validate(kw)


def _a(**kw) -> ActivationQuant:
    return ActivationQuant.model_validate(kw)


def _close(actual: torch.Tensor, expected: list) -> None:
    expected_tensor = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual, expected_tensor, rtol=0, atol=1e-6)


def test_symmetric_per_tensor_rounds_half_to_even():
    # absmax 7 -> scale 1 at 4 bits; 0.5 rounds to 0, 2.5 to 2
    x = torch.tensor([[0.5, -1.0, 2.5, 7.0], [1.2, 0.0, -6.6, 3.0]])
    _close(fake_quant(x, _w(bits=4, granularity="tensor")), [[0, -1, 2, 7], [1, 0, -7, 3]])


def test_symmetric_per_channel_has_one_scale_per_row():
    x = torch.tensor([[1.0, 2.0, 3.5, -7.0], [0.1, 0.2, 0.3, 0.7]])
    _close(fake_quant(x, _w(bits=4)), [[1, 2, 4, -7], [0.1, 0.2, 0.3, 0.7]])


def test_symmetric_per_group_has_one_scale_per_group():
    # 3 bits: qmax 3; group [1, -4] scale 4/3; group [0.3, 0.6] scale 0.2 (0.3/0.2 = 1.5 -> 2)
    x = torch.tensor([[1.0, -4.0, 0.3, 0.6]])
    _close(fake_quant(x, _w(bits=3, group=2)), [[4 / 3, -4, 0.4, 0.6]])


def test_per_token_activations_scale_each_token_of_a_batch():
    x = torch.tensor([[[1.0, -2.0], [0.5, 0.25]], [[4.0, 3.0], [0.0, 0.0]]])
    # 2 bits: qmax 1, scale = the token's absmax; x/scale of 0.5 rounds to 0, 0.75 to 1
    _close(fake_quant(x, _a(bits=2)), [[[0, -2], [0.5, 0]], [[4, 4], [0, 0]]])


def test_asymmetric_uses_the_range_with_zero_point():
    # 2 bits, row 2: range [-1, 2], scale 1, zero point 1; 0.5 -> round(0.5)=0 -> 0
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 0.5, 2.0], [1.0, 2.0, 3.0, 6.0]])
    # row 3: range [0, 6] (zero is kept in range), scale 2: 1 -> round(0.5)=0, 3 -> 2 -> 4
    expected = [[0, 1, 2, 3], [-1, 0, 0, 2], [0, 2, 4, 6]]
    _close(fake_quant(x, _w(bits=2, symmetric=False)), expected)


def test_clip_shrinks_the_range_and_saturates():
    # 8 bits, clip 0.5: scale = 0.5 * 10 / 127; -10 saturates at -128 steps, 1 -> 25 steps
    x = torch.tensor([[1.0, -10.0]])
    scale = 5 / 127
    _close(fake_quant(x, _w(bits=8, granularity="tensor", clip=0.5)), [[25 * scale, -128 * scale]])


def test_asymmetric_clip_shrinks_both_ends():
    # 2 bits, range [-1, 2] clipped to [-0.5, 1], scale 0.5, zero point 1
    x = torch.tensor([[-1.0, 0.0, 0.4, 2.0]])
    _close(fake_quant(x, _w(bits=2, symmetric=False, clip=0.5)), [[-0.5, 0, 0.5, 1]])


def test_zero_rows_stay_zero_and_dtype_is_kept():
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    out = fake_quant(x, _w(bits=4, symmetric=False))
    assert out.dtype == torch.bfloat16 and not out.any()


def test_representable_values_round_trip_exactly():
    levels = torch.arange(-8, 8, dtype=torch.float32).reshape(1, -1) * 0.25
    levels[0, 0] = -2.0  # absmax 2 at 4 bits: scale 2/7; make every value a multiple of it
    grid = torch.round(levels / (2 / 7)) * (2 / 7)
    torch.testing.assert_close(fake_quant(grid, _w(bits=4)), grid)


def test_error_shrinks_with_bits():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = [(fake_quant(x, _w(bits=b)) - x).pow(2).mean().item() for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_group_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match="group 32 does not divide the last dimension 172"):
        fake_quant(torch.ones(2, 172), _w(bits=4, group=32))


def test_quant_linear_quantizes_weight_once_and_input_each_call():
    linear = nn.Linear(8, 3)
    weights, activations = _w(bits=4), _a(bits=4)
    layer = QuantLinear(linear, weights, activations)
    torch.testing.assert_close(layer.weight, fake_quant(linear.weight.detach(), weights))
    x = torch.randn(5, 8)
    expected = nn.functional.linear(fake_quant(x, activations), layer.weight, linear.bias)
    torch.testing.assert_close(layer(x), expected)


def _rtn(**kw) -> QuantizerConfig:
    return QuantizerConfig.model_validate({"name": "q", "method": "rtn", **kw})


def test_rtn_quantizes_every_linear_but_lm_head_and_embeddings(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    embed = model.get_input_embeddings().weight.detach().clone()
    quantize_(model, _rtn(weights={"bits": 4}, activations={"bits": 8}))
    linears = {
        n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear)
    }
    assert linears.pop("lm_head") is nn.Linear
    assert len(linears) == 2 * 7 and set(linears.values()) == {QuantLinear}
    assert torch.equal(model.get_input_embeddings().weight, embed)


def test_rtn_lm_head_and_tied_embeddings_on_request():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    head = model.lm_head.weight.detach().clone()
    quantize_(model, _rtn(weights={"bits": 4}, embeddings=True))
    # the embedding table is rounded; the tied lm_head keeps its float weight
    spec = _w(bits=4)
    torch.testing.assert_close(model.get_input_embeddings().weight, fake_quant(head, spec))
    assert torch.equal(model.lm_head.weight, head)
    model = LlamaForCausalLM(config)
    quantize_(model, _rtn(weights={"bits": 4}, lm_head=True))
    assert isinstance(model.lm_head, QuantLinear)


def test_quantizer_needs_weights_activations_or_kv():
    with pytest.raises(ValueError, match="set weights:, activations: and/or kv:"):
        _rtn()
