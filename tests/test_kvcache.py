"""KV-cache quantization: the spec, rounding by hand, where it sits in attention (after RoPE
and qk_norm, before GQA and the attn-bias slot), transformers' path against the family's,
the cache during generation, precision labels and plan-time checks."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPE, refusals, write_recipe
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from qbench.api import quantize_
from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM
from qbench.eval.diagnostics import diagnose
from qbench.plan import _quantizer_identity
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import KVQuant
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.kvcache import KVTransform, eager_attention, quantize_kv_cache
from qbench.quant.walk.linear import QuantLinear

SHAPE = TINY_SHAPE | {"intermediate_size": 128, "head_dim": 16}
IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_kv_spec_defaults_asymmetric_one_scale_per_token_and_head():
    spec = KVQuant(bits=4, clip=0.95)
    assert (spec.granularity, spec.symmetric, spec.label()) == (
        "head",
        False,
        "int4 head asym clip0.95",
    )
    assert KVQuant(bits=4, group=8).granularity == "group"
    assert KVQuant(format="fp8_e4m3").symmetric  # float formats are symmetric
    with pytest.raises(ValidationError, match="clip_search"):
        KVQuant(bits=4, clip_search=True)
    with pytest.raises(ValidationError, match="granularity"):
        KVQuant(bits=4, granularity="token")


def test_asymmetric_rounding_per_head_by_hand():
    """One head's key [0, 1, 2, 3.2] at 2 bits: scale 3.2/3, zero 0, grid {0, 1.07, 2.13, 3.2}."""
    key = torch.tensor([[[[0.0, 1.0, 2.0, 3.2], [-1.0, 0.0, 0.5, 2.0]]]])  # [b, h, t, d]
    out = fake_quant(key, KVQuant(bits=2))
    s0, s1 = 3.2 / 3, 3.0 / 3  # second token: range [-1, 2], zero point 1
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, s0, 2 * s0, 3 * s0]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([-1.0, 0.0, 0.0, 2.0]) * s1)
    grouped = fake_quant(key, KVQuant(bits=2, group=2))  # [0, 1] (scale 1/3), [2, 3.2] apart
    torch.testing.assert_close(grouped[0, 0, 0], torch.tensor([0.0, 1.0, 2 * s0, 3 * s0]))


def _same_weights(reference: torch.nn.Module, config: QBenchConfig) -> QBenchForCausalLM:
    family = QBenchForCausalLM(config).eval()
    family.load_state_dict(reference.state_dict())
    return family


@pytest.mark.parametrize(
    ("hf_class", "hf_config", "options"),
    [(LlamaForCausalLM, LlamaConfig, {}), (Qwen3ForCausalLM, Qwen3Config, {"qk_norm": True})],
    ids=["llama", "qwen3"],
)
@pytest.mark.parametrize("rotate", [False, True], ids=["kv", "rotation+kv"])
def test_transformers_path_equals_the_family_hook(hf_class, hf_config, options, rotate):
    """transformers' attention (through the registered implementation) and QBenchAttention's
    hook are independent code paths; with the same weights they give the same logits, and the
    KV rounding moves them."""
    torch.manual_seed(0)
    hf = hf_class(hf_config(**SHAPE)).eval()
    family = _same_weights(hf, QBenchConfig(**SHAPE, **options))
    fp = _logits(hf)
    torch.testing.assert_close(_logits(family), fp)
    config = {"name": "kv", "method": "rtn", "kv": {"bits": 3, "clip": 0.95}}
    if rotate:
        config["method"] = "rotation"
    for model in (hf, family):
        torch.manual_seed(0)
        quantize_(model, QuantizerConfig.model_validate(config))
    assert hf.config._attn_implementation == "qbench_kv_sdpa"
    quantized = _logits(hf)
    torch.testing.assert_close(_logits(family), quantized, atol=1e-5, rtol=1e-4)
    assert (quantized - fp).abs().max() > 1e-3


def test_keys_are_rounded_after_qk_norm_and_rope_values_as_produced():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()
    quantize_kv_cache(model, KVQuant(bits=4))
    seen = {}
    kv = model.model.layers[0].self_attn.kv_transform
    kv.register_forward_hook(lambda module, inputs, outputs: seen.update(inputs=inputs))
    _logits(model)
    attention = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(IDS))
    b, t = IDS.shape
    key = attention.k_norm(attention.k_proj(x).view(b, t, 2, 16)).transpose(1, 2)
    positions = torch.arange(t)[None].expand(b, -1)
    cos, sin = model.model.rotary_emb(x, positions)
    rotate_half = torch.cat((-key[..., 8:], key[..., :8]), dim=-1)
    key = key * cos[:, None] + rotate_half * sin[:, None]
    value = attention.v_proj(x).view(b, t, 2, 16).transpose(1, 2)
    _, seen_key, seen_value = seen["inputs"]
    torch.testing.assert_close(seen_key, key)
    torch.testing.assert_close(seen_value, value)  # 2 KV heads: before GQA repeats them


def test_attention_bias_slot_stays_in_float(tiny_model):
    model = tiny_model("attn-bias")
    slot = model.model.layers[0].self_attn.k_bias.detach().clone()
    quantize_kv_cache(model, KVQuant(bits=2))
    seen = {}
    kv = model.model.layers[0].self_attn.kv_transform
    kv.register_forward_hook(lambda module, inputs, outputs: seen.update(key=outputs[1]))
    assert _logits(model).isfinite().all()
    assert seen["key"].shape[2] == IDS.shape[1]  # the cache's tokens only, no slot
    assert torch.equal(model.model.layers[0].self_attn.k_bias, slot)


def test_incremental_decoding_with_the_cache_equals_the_full_pass():
    """Per-token rounding: the cache rounded again at each step equals rounding once."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    quantize_(model, QuantizerConfig(name="r", method="rtn", kv={"bits": 4}))
    with torch.no_grad():
        prefix = model(IDS[:, :-1], use_cache=True)
        step = model(IDS[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, _logits(model)[:, -1], atol=1e-5, rtol=1e-4)


def test_eager_attention_keeps_the_kv_step():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    quantize_kv_cache(model, KVQuant(bits=3))
    sdpa = _logits(model)
    model.set_attn_implementation(eager_attention(model.config._attn_implementation))
    assert model.config._attn_implementation == "qbench_kv_eager"
    torch.testing.assert_close(_logits(model), sdpa, atol=1e-5, rtol=1e-4)
    assert eager_attention("sdpa") == "eager"


def test_diagnostics_see_the_quantized_cache_and_restore_the_attention():
    torch.manual_seed(0)
    fp = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    model.load_state_dict(fp.state_dict())
    quantize_kv_cache(model, KVQuant(bits=2))
    mass = [diagnose(m, IDS).details["layers"][1]["first_token_mass"] for m in (fp, model)]
    assert mass[0] != mass[1]  # the maps come from the rounded keys, not the float ones
    assert model.config._attn_implementation == "qbench_kv_sdpa"


def test_kv_alone_is_a_quantizer_and_labels_say_kv():
    kv_only = QuantizerConfig(name="kv4", method="rtn", kv={"bits": 4})
    assert kv_only.precision() == "W16A16KV4"
    w4a4kv4 = QuantizerConfig(
        name="q", method="rtn", weights={"bits": 4}, activations={"bits": 4}, kv={"bits": 4}
    )
    assert w4a4kv4.precision() == "W4A4KV4"
    assert QuantizerConfig(
        name="w4a4", method="rtn", weights={"bits": 4}, activations={"bits": 4}
    ).precision() == ("W4A4")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    quantize_(model, kv_only)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(
        isinstance(layer.self_attn.kv_transform, KVTransform) for layer in model.model.layers
    )
    with pytest.raises(ValidationError, match="kv:"):
        QuantizerConfig(name="nothing", method="rtn")


def test_kv_group_that_does_not_divide_head_dim_is_refused_at_plan_time(tmp_path, llama_dir):
    recipe = write_recipe(
        tmp_path / "kv.yaml",
        f"""
name: kv
checkpoints: [{{name: tiny, path: {llama_dir}}}]
quantizers:
  - {{name: kv4, method: rtn, kv: {{bits: 4, group: 32}}}}
eval: {{perplexity: [{{data: embedded, seq_len: 64}}]}}
""",
    )
    message = refusals(recipe)["kv4"]
    assert "quantizers[0] 'kv4'.kv.group: group 32 does not divide head_dim 16" in message
    assert "checkpoint 'tiny'" in message


def test_a_quantizer_is_keyed_by_its_pipeline_not_its_name_or_shorthand():
    """`method: smoothquant` and the same pipeline written out share one identity (one key);
    the KV cache and the schema version are part of it."""
    shorthand = QuantizerConfig.model_validate(
        {"name": "a", "method": "smoothquant", "alpha": 0.7, "weights": {"bits": 8}}
    )
    explicit = QuantizerConfig.model_validate(
        {"name": "b", "transforms": [{"transform": "smoothquant", "alpha": 0.7}],
         "rounding": "rtn", "weights": {"bits": 8}}
    )  # fmt: skip
    assert _quantizer_identity(shorthand) == _quantizer_identity(explicit)
    assert _quantizer_identity(shorthand)["schema"] == 2
    with_kv = explicit.model_copy(update={"kv": KVQuant(bits=8)})
    assert _quantizer_identity(with_kv)["kv"]["bits"] == 8
