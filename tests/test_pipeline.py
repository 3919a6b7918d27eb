"""A quantizer is a pipeline: shorthands expand to it, the list is validated as a whole, steps
compose (SmoothQuant + GPTQ, AWQ + GPTQ), and shared statistics follow the transforms."""

from __future__ import annotations

import pytest
import torch
from conftest import write_recipe
from pydantic import ValidationError
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.executors import make_executor
from qbench.plan import _quantizer_identity
from qbench.quant import context
from qbench.quant.context import StepContext
from qbench.quant.methods import gptq
from qbench.quant.pipeline import transform
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.linear import QuantLinear
from qbench.recipe import RecipeError, load_recipe
from qbench.sweep import plan_recipes, sweep

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def _q(**fields) -> QuantizerConfig:
    return QuantizerConfig.model_validate({"name": "q", **fields})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    ("shorthand", "explicit", "label"),
    [
        ({"method": "rotation"}, {"transforms": ["rotation"], "rounding": "rtn"}, "rotation"),
        (
            {"method": "gptq", "rotate": True, "damp": 0.05},
            {"transforms": ["rotation"], "rounding": {"method": "gptq", "damp": 0.05}},
            "rotation+gptq",
        ),
        (
            {"method": "smoothquant", "alpha": 0.8},
            {"transforms": [{"transform": "smoothquant", "alpha": 0.8}], "rounding": "rtn"},
            "smoothquant",
        ),
        (
            {"method": "awq", "grid": 10},
            {"transforms": [{"transform": "awq", "grid": 10}], "rounding": "rtn"},
            "awq",
        ),
    ],
)
def test_a_shorthand_is_its_pipeline(shorthand, explicit, label):
    specs = {"weights": {"bits": 4, "group": 16}}
    short, long = _q(**shorthand, **specs), _q(**explicit, **specs)
    assert _quantizer_identity(short) == _quantizer_identity(long)
    assert short.label().startswith(f"{label}: int4 g16")
    assert long.label().split(":")[0] == "+".join(
        [*(t.transform for t in long.transforms), long.rounding.method]
    ) or long.label().startswith(label)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"transforms": ["rotation", "rotation"], "rounding": "rtn"}, "rotation listed twice"),
        (
            {"transforms": ["rotation", "smoothquant"], "rounding": "rtn"},
            "smoothquant after rotation would re-introduce",
        ),
        ({"transforms": ["smoothquant", "awq"], "rounding": "rtn"}, "both scale channels"),
        ({"transforms": ["rotaton"], "rounding": "rtn"}, "did you mean 'rotation'"),
        ({"rounding": "gptq", "weights": {"format": "nvfp4"}}, "gptq rounds int weights"),
        (
            {
                "transforms": ["awq"],
                "rounding": {"method": "bitsandbytes", "scheme": "nf4"},
                "weights": None,
            },
            "awq searches scales for the weights it rounds",
        ),
        (
            {"method": "rtn", "rounding": "gptq"},
            "give method: .a shorthand. or transforms: / rounding:, not both",
        ),
        ({"method": "smoothquant", "damp": 0.1}, "unknown field 'damp' for method smoothquant"),
    ],
)
def test_the_pipeline_is_validated_as_a_whole(fields, problem):
    with pytest.raises(ValidationError, match=problem):
        _q(**{"weights": {"bits": 4}, **fields})


def test_errors_name_the_field_where_the_user_wrote_it(tmp_path, llama_dir):
    def error(quantizer: str) -> str:
        path = write_recipe(
            tmp_path / "r.yaml",
            f"name: r\ncheckpoints: [{{name: l, path: {llama_dir}}}]\nquantizers: [{quantizer}]\n"
            "eval: {perplexity: [{data: embedded, seq_len: 32}]}\n",
        )
        with pytest.raises(RecipeError) as caught:
            load_recipe(path)
        return str(caught.value)

    assert "quantizers[0].damp: Input should be greater than 0" in error(
        "{name: g, method: gptq, damp: -1, weights: {bits: 4}}"
    )
    assert "quantizers[0].rounding.damp: Input should be greater than 0" in error(
        "{name: g, rounding: {method: gptq, damp: -1}, weights: {bits: 4}}"
    )
    assert "quantizers[0].transforms[0].alpha: Input should be less than or equal to 1" in error(
        "{name: s, transforms: [{transform: smoothquant, alpha: 2}], rounding: rtn, "
        "weights: {bits: 4}}"
    )


def test_smoothquant_then_gptq_rounds_the_smoothed_weights_with_their_hessians(
    tiny_model, tokenizer_dir
):
    """The composed pipeline equals its two halves applied one after the other."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    smooth = {"transform": "smoothquant", "alpha": 0.8, "calibration": CALIBRATION}
    specs = {"weights": {"bits": 4}, "activations": {"bits": 8}}
    composed = _q(transforms=[smooth], rounding={"method": "gptq", "calibration": CALIBRATION},
                  **specs)  # fmt: skip
    torch.manual_seed(0)
    model = tiny_model("llama")
    quantize_(model, composed, tokenizer)
    halves = tiny_model("llama")
    torch.manual_seed(0)
    smoothquant = _q(method="smoothquant", alpha=0.8, calibration=CALIBRATION, weights={"bits": 8})
    transform(StepContext(halves, smoothquant, tokenizer))
    torch.manual_seed(0)
    quantize_(halves, _q(method="gptq", calibration=CALIBRATION, **specs), tokenizer)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(module.weight, halves.get_submodule(name).weight)
    assert composed.label().startswith("smoothquant+gptq: int4 channel / int8 token")


def test_awq_composes_with_gptq(tiny_model, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fp = _logits(tiny_model("llama", intermediate_size=128))
    awq = {"transform": "awq", "grid": 5, "calibration": CALIBRATION}
    config = _q(transforms=[awq], rounding={"method": "gptq", "calibration": CALIBRATION},
                weights={"bits": 4, "group": 16})  # fmt: skip
    assert not config.lossless  # AWQ's clip changes the float weights
    model = tiny_model("llama", intermediate_size=128)
    quantize_(model, config, tokenizer)
    assert 0 < (_logits(model) - fp).abs().max() < fp.abs().max()


def test_cells_share_block_0_hessians_only_after_the_same_transforms(
    tmp_path, llama_dir, monkeypatch
):
    gptq_cal = "calibration: {data: embedded, sequences: 4, seq_len: 32}"
    text = f"""
name: shared
checkpoints: [{{name: llama, path: {llama_dir}}}]
quantizers:
  - {{name: g4, method: gptq, {gptq_cal}, weights: {{bits: 4}}}}
  - {{name: g3, method: gptq, {gptq_cal}, weights: {{bits: 3}}}}
  - {{name: sq-g4, transforms: [{{transform: smoothquant, {gptq_cal}}}],
      rounding: {{method: gptq, {gptq_cal}}}, weights: {{bits: 4}}}}
  - {{name: sq-g3, transforms: [{{transform: smoothquant, {gptq_cal}}}],
      rounding: {{method: gptq, {gptq_cal}}}, weights: {{bits: 3}}}}
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 1}}]}}
"""
    calls = {"hessians": 0, "windows": 0}
    for module, name, counter in (
        (gptq, "input_hessians", "hessians"),
        (context, "sample_windows", "windows"),
    ):
        real = getattr(module, name)

        def counted(*args, _real=real, _counter=counter, **kwargs):
            calls[_counter] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    [planned] = plan_recipes([write_recipe(tmp_path / "shared.yaml", text)])
    executor = make_executor("local")
    assert not sweep([planned], tmp_path / "results", executor, progress=False).failed
    # block 0: one computation for the two plain cells, one for the two smoothed; block 1: 4
    assert calls == {"hessians": 2 + 4, "windows": 1}


def _readme_quantizer_blocks() -> list[str]:
    """The YAML blocks of the README and its docs/ pages (the recipe reference lives in
    docs/recipes.md) that list quantizers (items with a method or a rounding)."""
    from conftest import REPO

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    blocks = [b.split("```")[0] for b in text.split("```yaml")[1:]]
    return [
        b for b in blocks if b.lstrip().startswith("- ") and ("method:" in b or "rounding:" in b)
    ]


@pytest.mark.parametrize("block", _readme_quantizer_blocks())
def test_the_readmes_quantizer_examples_load(block, tmp_path, llama_dir):
    items = "\n".join("  " + line for line in block.strip("\n").splitlines())
    text = (
        f"name: t\ncheckpoints: [{{name: a, path: {llama_dir}}}]\nquantizers:\n{items}\n"
        "eval: {perplexity: [{data: embedded, seq_len: 32}]}\n"
    )
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", text))
    assert recipe.quantizers


def test_a_quantizer_that_would_round_nothing_is_refused(tmp_path, llama_dir):
    """Channel scaling with nothing rounded is a load-time error; a model without any target
    of the quantizer's kinds (no decoder block) is refused at plan time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.quant.walk.inventory import inventory

    with pytest.raises(ValidationError, match="smoothquant scales channels for rounded"):
        QuantizerConfig.model_validate(
            {"name": "q", "transforms": ["smoothquant"], "rounding": "rtn", "kv": {"bits": 4}}
        )
    rotation_kv = {"name": "q", "transforms": ["rotation"], "rounding": "rtn", "kv": {"bits": 4}}
    assert QuantizerConfig.model_validate(rotation_kv).transforms  # Q/K rotation for the KV cache
    empty = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=0, num_attention_heads=2)
    )
    w4 = QuantizerConfig.model_validate({"name": "q", "method": "rtn", "weights": {"bits": 4}})
    assert "nothing to quantize" in w4.refusal(inventory(empty))
