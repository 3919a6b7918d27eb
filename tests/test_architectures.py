"""Every method on every decoder family: fp equals transformers, transforms are lossless, every
targeted weight is rounded (counted apart from qbench's inventory), KV quantization and W4A4
move the result, and what cannot be done is refused with its reason."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES, SSM_FAMILIES, family_model
from torch import nn
from transformers import AutoTokenizer

from qbench.api import quantize_
from qbench.checkpoints.load import load_checkpoint
from qbench.errors import QBenchError, RefusedError
from qbench.eval.perplexity import perplexity, windows_of
from qbench.quant.context import StepContext
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.hadamard import HadamardTransform
from qbench.quant.formats.spec import KVQuant
from qbench.quant.methods.rotation import rotate
from qbench.quant.pipeline import transform
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.experts import set_input_step
from qbench.quant.walk.inventory import experts_layout, inventory, linear_conv1d
from qbench.quant.walk.kvcache import kv_sites
from qbench.recipe import CheckpointSpec

CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
ROUTER_NAMES = ("gate.weight", "router.weight", "shared_expert_gate.weight")
NO_ATTENTION = ("mamba", "falcon_mamba", "mamba2")  # state-space models: no KV cache
# Mamba-1 mixers apply dt_proj's weight themselves (dt_proj.weight @ x): its input is unreachable
OUTSIDE_FORWARD = ("mamba", "falcon_mamba", "jamba")
# What rotation refuses, with its reason: BLOOM's stream starts at a LayerNorm of the
# embeddings (no linear after it to take the rotation); Zamba 2's shared transformer reads
# the stream concatenated with the embeddings.
ROTATION_REFUSED = {
    "bloom": "the residual stream does not start as a sum of embedding tables",
    "zamba2": "shared_transformer.input_layernorm reads a tensor computed from the residual",
}


def _config(**fields):
    return QuantizerConfig.model_validate({"name": "q", **fields})


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _model(family: str) -> nn.Module:
    model = family_model(family)
    linear_conv1d(model)
    return model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp_perplexity_equals_a_direct_transformers_computation(family, tokenizer, tmp_path):
    """qbench loads the saved checkpoint (GPT-2's Conv1D becomes nn.Linear) and its windowed
    perplexity equals exp(mean loss) that transformers computes on the same windows."""
    family_model(family).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_checkpoint(CheckpointSpec(name="m", path=str(tmp_path)), progress=False)
    text = "\n\n".join(["The quick brown fox jumps over the lazy dog."] * 40)
    ours = perplexity(model, tok, text, seq_len=32, batch_size=3, progress=False)
    reference = family_model(family)
    windows = windows_of(tok(text, return_tensors="pt").input_ids[0], 32, None)
    with torch.no_grad():
        losses = [reference(input_ids=w[None], labels=w[None]).loss for w in windows]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert ours.perplexity == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("rotate_qk", [False, True], ids=["rotation", "rotation+qk"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_is_lossless(family, rotate_qk):
    model = _model(family)
    before = _logits(model)
    torch.manual_seed(0)
    refused = ROTATION_REFUSED.get(family) or (rotate_qk and family in NO_ATTENTION)
    if refused:
        why = "no attention layers" if refused is True else refused
        with pytest.raises(RefusedError, match=why):
            rotate(model, rotate_qk=rotate_qk)
        return
    rotate(model, rotate_qk=rotate_qk)
    assert _relative(_logits(model), before) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_is_lossless_or_refused(family, tokenizer):
    model = _model(family)
    before = _logits(model)
    config = _config(method="smoothquant", alpha=0.8, weights={"bits": 8}, calibration=CALIBRATION)
    if family == "olmo2":  # post-norms only: no norm feeds a linear
        with pytest.raises(RefusedError, match="nothing to smooth"):
            transform(StepContext(model, config, tokenizer))
        return
    transform(StepContext(model, config, tokenizer))
    assert _relative(_logits(model), before) < 1e-5


def _transposed(module: nn.Module) -> bool:
    """Experts stored [experts, in, out]: the flag of transformers' experts, or Llama 4's
    experts, whose forward is bmm(x, W) (read off its modeling code)."""
    return getattr(module, "is_transposed", False) or type(module).__name__ == "Llama4TextExperts"


def _rounded_rows(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Distinct values per output row of a 2-D weight or of each slice of a 3-D one."""
    rows = param.detach()
    if rows.dim() == 3:
        rows = rows.transpose(1, 2) if transposed else rows
        rows = rows.reshape(-1, rows.shape[-1])
    return torch.tensor([row.unique().numel() for row in rows])


def _linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Independently of qbench's inventory: every weight of 2 or more dimensions but the
    embedding tables, lm_head, the MoE routers and the Mamba convolutions (float by default),
    and Mamba-1's A_log [channels, state] (the recurrence's log state matrix, used
    elementwise, as its 1-D form in Mamba-2)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv1d)}
    return {
        name: p
        for name, p in model.named_parameters()
        if p.dim() >= 2
        and id(p) not in embeddings | convs
        and not name.startswith("lm_head")
        and not name.endswith((*ROUTER_NAMES, "A_log"))
        and "bias" not in name.rsplit(".", 1)[-1]
    }


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_targeted_weight_is_rounded(family, method, tokenizer):
    """W4 per channel: every output row of every targeted matrix holds at most 16 values, and
    the coverage report counts the same weights as rounded. Mamba-1's: W4A8 refused (dt_proj's
    input is out of reach), W4A16 rounds every weight, dt_proj's included."""
    model = _model(family)
    expected = _linear_weights(copy.deepcopy(model))
    fields = {"calibration": CALIBRATION} if method == "gptq" else {}
    config = _config(method=method, weights={"bits": 4}, activations={"bits": 8}, **fields)
    caveats = []
    if family in OUTSIDE_FORWARD:
        with pytest.raises(RefusedError, match=r"dt_proj\) have their weight applied by their"):
            config.apply(model, tokenizer)
        config = _config(method=method, weights={"bits": 4}, **fields)
    report = config.apply(model, tokenizer, caveats=caveats)
    params = dict(model.named_parameters())
    transposed = {n for n, m in model.named_modules() if _transposed(m)}
    total = 0
    for name, original in expected.items():
        now = params[name] if name in params else params[name.replace(".weight", ".linear.weight")]
        assert not torch.equal(now, original), f"{name} was not rounded"
        distinct = _rounded_rows(now, name.rsplit(".", 1)[0] in transposed)
        assert distinct.max() <= 16, f"{name} has rows with {distinct.max()} values"
        total += original.numel()
    kinds = report["kinds"]
    rounded = sum(kinds[k]["weights"][0] for k in report["targeted"])
    assert rounded == sum(kinds[k]["weights"][1] for k in report["targeted"]) == total
    activations = sum(kinds[k]["activations"][0] for k in report["targeted"])
    assert activations == (0 if family in OUTSIDE_FORWARD else total)
    if family in OUTSIDE_FORWARD and method == "gptq":
        assert any("whose weight their parent applies itself" in c for c in caveats)
    if family in MOE_FAMILIES:
        assert "router" in report["float"] and "experts" in report["targeted"]
    if family in SSM_FAMILIES:
        assert "convs: false" in report["float"]["conv"] and "ssm" in report["targeted"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_quantizer_and_w4a4_change_the_logits(family):
    fp = _logits(_model(family))
    for fields in ({"kv": {"bits": 4}}, {"weights": {"bits": 4}, "activations": {"bits": 4}}):
        model = _model(family)
        if "kv" in fields and family in NO_ATTENTION:
            with pytest.raises(RefusedError, match="has no attention layers, so no KV cache"):
                quantize_(model, _config(method="rtn", **fields))
            continue
        ignore = ["re:.*dt_proj"] if family in OUTSIDE_FORWARD and "activations" in fields else []
        quantize_(model, _config(method="rtn", **fields), ignore=ignore)
        # float32 noise is ~1e-7; BLOOM's and Zamba 2's KV4 move their logits by 2e-5 to 5e-5
        assert _relative(_logits(model), fp) > (1e-5 if "kv" in fields else 1e-4), fields


@pytest.mark.parametrize(
    "family",
    ["llama", "gpt2", "qwen3_moe", "gemma2", "falcon", "phi", "llama4_text", "falcon_h1", "mpt"],
)
def test_quarot_w4a4kv4_rounds_inside_the_rotation(family, tokenizer):
    model = _model(family)
    fp = _logits(model)
    torch.manual_seed(0)
    config = _config(
        method="gptq", rotate=True, weights={"bits": 4}, activations={"bits": 4, "clip": 0.9},
        kv={"bits": 4, "clip": 0.95}, calibration=CALIBRATION,
    )  # fmt: skip
    report = config.apply(model, tokenizer)
    assert all(report["kinds"][k]["weights"][0] == report["kinds"][k]["weights"][1]
               for k in report["targeted"])  # fmt: skip
    assert 1e-4 < _relative(_logits(model), fp) < 1


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_inputs_are_rounded_per_token_of_each_expert(family):
    """W16A4 on the experts only changes the MoE output: the experts' inputs are rounded."""
    model = _model(family)
    fp = _logits(model)
    config = _config(method="rtn", activations={"bits": 4})
    quantize_(model, config, ignore=["re:.*dt_proj"] if family in OUTSIDE_FORWARD else [])
    assert _relative(_logits(model), fp) > 1e-3


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_library_backends_refuse_experts_they_cannot_hold(family):
    found = inventory(_model(family))
    for config in (
        _config(method="bitsandbytes", scheme="nf4"),
        _config(method="quanto", weight_qtype="qint8"),
    ):
        assert "replaces nn.Linear layers only" in config.refusal(found)


def test_library_backends_round_gpt2s_conv1d_layers():
    fp = _logits(_model("gpt2"))
    model = _model("gpt2")
    quantize_(model, _config(method="bitsandbytes", scheme="nf4"))
    assert _relative(_logits(model), fp) > 1e-4


def test_routers_are_rounded_on_request():
    model = _model("qwen3_moe")
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    report = _config(method="rtn", weights={"bits": 4}, routers=True).apply(model)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, router)
    assert "router" in report["targeted"] and "router" not in report["float"]


def test_tensor_granularity_on_expert_inputs_is_refused():
    found = inventory(_model("mixtral"))
    config = _config(method="rtn", activations={"bits": 8, "granularity": "tensor"})
    assert "granularity tensor on expert inputs" in config.refusal(found)


def test_a_refused_quantizer_is_one_refused_cell_and_the_others_run(tmp_path, tokenizer):
    """bitsandbytes on a MoE checkpoint and a KV group that does not divide head_dim: refused
    at plan time, recorded as refused cells with their reasons, without loading the model; the
    recipe's other cells (fp, rtn) run, the leaderboard lists the refusals, and the run exits
    0 (every cell ok or refused)."""
    from conftest import write_recipe

    from qbench.cli import main

    for family in ("mixtral", "gpt2"):
        family_model(family).save_pretrained(tmp_path / family)
        tokenizer.save_pretrained(tmp_path / family)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: refusals
checkpoints:
  - {{name: moe, path: {tmp_path / "mixtral"}}}
  - {{name: gpt2, path: {tmp_path / "gpt2"}}}
quantizers:
  - {{name: w4a8, method: rtn, weights: {{bits: 4}}, activations: {{bits: 8}}}}
  - {{name: nf4, method: bitsandbytes, scheme: nf4}}
  - {{name: kv-g12, method: rtn, kv: {{bits: 4, group: 12}}}}
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 2}}]}}
""",
    )
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    board = (results / "refusals" / "LEADERBOARD.md").read_text()
    assert "## Refused cells" in board and "## Failed cells" not in board
    assert "| nf4         | quantizers[1] 'nf4' (bitsandbytes) on checkpoint 'moe'" in board
    assert "replaces nn.Linear layers only" in board
    assert "quantizers[2] 'kv-g12'.kv.group: group 12 does not divide head_dim 16" in board
    cells = [line.split("|")[1:3] for line in board.splitlines() if line.startswith("| ")]
    rows = {f"{a.strip()}/{b.strip()}" for a, b in cells}
    assert {"moe/fp", "moe/w4a8", "gpt2/fp", "gpt2/w4a8", "gpt2/nf4"} <= rows


@pytest.mark.parametrize("family", ["gpt2", "qwen3_moe", "gemma2", "falcon", "olmo2"])
def test_diagnostics_read_every_family(family):
    from qbench.eval.diagnostics import diagnose, layer_sqnr

    model = _model(family)
    sqnr = layer_sqnr(model, IDS, _config(method="rtn", weights={"bits": 4}))
    result = diagnose(model, IDS, sqnr)
    layers = result.details["layers"]
    assert len(layers) == 2 and all(layer["max"] > 0 for layer in layers)
    assert result.summary["max_input_kurtosis"] is not None and result.summary["min_sqnr_db"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_causal_and_an_encoder_is_refused(family):
    """The load-time causality probe passes every decoder family; BERT loaded as a causal LM
    without is_decoder (bidirectional attention) is refused."""
    from transformers import BertConfig, BertLMHeadModel

    from qbench.checkpoints.load import check_causal

    check_causal(_model(family))
    if family == "llama":
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        encoder = BertLMHeadModel(config)
        with pytest.raises(QBenchError, match="not a causal language model"):
            check_causal(encoder.eval())


def test_the_leaderboard_shows_a_cells_caveats_beside_its_label(tmp_path, tokenizer):
    """GPTQ on 16 experts, one routed per token, calibrated on 4 tokens: most experts see no
    calibration token and are rounded to nearest. The leaderboard marks the cell's label and
    says so under the table; the RTN cell, which does what its label says, has no mark."""
    from conftest import write_recipe
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qbench.cli import main

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
        num_experts_per_tok=1, moe_intermediate_size=32, max_position_embeddings=256,
    )  # fmt: skip
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: caveats
checkpoints: [{{name: moe, path: {tmp_path / "moe"}}}]
quantizers:
  - {{name: gptq, method: gptq, weights: {{bits: 4}},
     calibration: {{data: embedded, sequences: 1, seq_len: 4}}}}
  - {{name: rtn, method: rtn, weights: {{bits: 4}}}}
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 2}}]}}
""",
    )
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    board = (results / "caveats" / "LEADERBOARD.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in board.splitlines() if "| moe " in line}
    assert "gptq: int4 channel / fp [1]" in rows["gptq"]
    assert "[" not in rows["rtn"].split("|")[4]
    caveat = re.search(r"^- \[1\] gptq: (\d+) of 64 expert matrices saw no calibration "
                       r"token: rounded to nearest$", board, re.MULTILINE)  # fmt: skip
    assert caveat is not None  # 2 layers x 16 experts x (gate_up, down); 4 tokens reach <= 4
    assert int(caveat.group(1)) >= 64 - 2 * 2 * 4


# ---------------------------------------------------------------- state-space and hybrid models


def _int4_per_row(rows: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per row, by hand: scale max|row| / 7, round half to even, clamp."""
    scale = rows.abs().amax(dim=1, keepdim=True) / 7
    return torch.clamp(torch.round(rows / scale), -8, 7) * scale


@pytest.mark.parametrize("family", ["falcon_h1", "bamba", "jamba", "mamba2"])
def test_convs_stay_float_by_default_and_are_rounded_per_channel_on_request(family):
    """The depthwise conv1d [channels, 1, taps] is left in float (named in `float`); with
    `convs: true` each channel's taps are rounded as one int4 row (by hand here), its bias and
    input stay float, and the logits move beyond what rounding the rest alone does."""
    plain = _model(family)
    report = _config(method="rtn", weights={"bits": 4}).apply(plain)
    assert "conv" not in report["targeted"] and "convs: false" in report["float"]["conv"]
    model = _model(family)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv1d)}
    before = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in convs.items()}
    report = _config(method="rtn", weights={"bits": 4}, convs=True).apply(model)
    for name, (weight, bias) in before.items():
        expected = _int4_per_row(weight.flatten(1).double())
        assert torch.allclose(convs[name].weight.flatten(1).double(), expected, rtol=1e-6)
        assert torch.equal(convs[name].bias, bias)
    total = sum(w.numel() for w, _ in before.values())
    assert report["kinds"]["conv"] == {"weights": [total, total]}  # weights only
    assert "conv" in report["targeted"] and "conv" not in report["float"]
    assert _relative(_logits(model), _logits(plain)) > 1e-5


def test_a_conv_group_that_does_not_divide_its_taps_is_refused_and_can_be_left_out():
    model = _model("falcon_h1")
    config = _config(method="rtn", weights={"bits": 4, "group": 16}, convs=True)
    with pytest.raises(QBenchError, match=r"weights.group: group 16 does not divide the input "
                       r"width 4 of layer model.layers.\d.mamba.conv1d"):  # fmt: skip
        quantize_(model, config)
    report = quantize_(model, config, ignore=["re:.*conv1d"])
    assert report["ignored"]["conv"] == report["kinds"]["conv"]["weights"][1]
    assert report["kinds"]["ssm"]["weights"][0] == report["kinds"]["ssm"]["weights"][1]


def test_gptq_rounds_convs_to_nearest_and_says_so(tokenizer):
    model = _model("bamba")
    notes, caveats = [], []
    config = _config(method="gptq", weights={"bits": 4}, convs=True, calibration=CALIBRATION)
    report = config.apply(model, tokenizer, notes=notes, caveats=caveats)
    rounded, total = report["kinds"]["conv"]["weights"]
    assert rounded == total > 0
    assert any("depthwise conv1d weights (convs: true) rounded to nearest" in c for c in caveats)
    assert set(caveats) <= set(notes)


def test_kv_on_a_hybrid_says_its_recurrent_states_stay_float():
    caveats = []
    _config(method="rtn", kv={"bits": 4}).apply(_model("falcon_h1"), caveats=caveats)
    assert any("recurrent states (conv and SSM states) stay in float" in c for c in caveats)


def test_a_kv_cache_asked_of_a_state_space_model_is_refused_at_plan_time():
    """On the skeleton of a Mamba config (no attention fields at all): the reason, not a
    crash on the missing head count."""
    from transformers import AutoModelForCausalLM, MambaConfig

    from qbench.quant.refusal import refusal_of

    config = MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=16)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    kv4 = _config(method="rtn", kv={"bits": 4})
    problem = refusal_of(kv4, "q", "m", config, inventory(skeleton))
    assert problem == (
        "q.kv: checkpoint 'm' has no attention layers, so no KV cache (its state-space mixers "
        "keep a recurrent state); remove kv:"
    )


def test_blocks_of_two_classes_are_found_and_their_mixers_told_apart():
    """Jamba alternates Mamba and attention blocks: both are the decoder blocks; the Mamba
    mixer's projections are kind ssm, its conv1d kind conv; A_log and D are no targets."""
    found = inventory(_model("jamba"))
    assert found.blocks_path == "model.layers" and len({type(b) for b in found.blocks}) == 2
    kinds = {name: t.kind for name, t in found.targets.items()}
    assert kinds["model.layers.0.mamba.in_proj"] == "ssm"
    assert kinds["model.layers.0.mamba.x_proj"] == "ssm"
    assert kinds["model.layers.0.mamba.conv1d"] == "conv"
    assert kinds["model.layers.1.self_attn.q_proj"] == "attention"
    assert not found.unsupported


def test_attention_under_a_generic_name_is_attention_by_its_class():
    """Nemotron-H names every block's mixer `mixer`: attention is told by its class."""
    kinds = {n: t.kind for n, t in inventory(_model("nemotron_h")).targets.items()}
    assert kinds["model.layers.1.mixer.q_proj"] == "attention"
    assert kinds["model.layers.0.mixer.in_proj"] == "ssm"


# ---------------------------------------------------------------- Llama 4's experts and router


class _Experts(nn.Module):
    """Experts without transformers' flag: up_proj [E, I, H], down_proj [E, H, I] chain in both
    layouts (no gate), or, with `einsum`, a forward qbench cannot follow."""

    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.has_gate = gated
        if gated:
            self.gate_up_proj = nn.Parameter(torch.randn(2, 16, 8))  # [E, 2I, H]
        else:
            self.up_proj = nn.Parameter(torch.randn(2, 8, 8))
        self.down_proj = nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [E, tokens, H]
        gate, up = torch.einsum("eth,eoh->eto", x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("eti,ehi->eth", gate * up, self.down_proj)


def test_llama4_experts_layout_is_read_from_their_shapes():
    experts = _model("llama4_text").model.layers[0].feed_forward.experts
    layout = experts_layout(experts)
    assert layout is not None and layout.transposed and layout.readers == ("gate_up_proj",)
    assert experts_layout(_Experts(gated=False)) is None  # both layouts chain: not guessed
    assert experts_layout(_Experts(gated=True)).transposed is False


def test_experts_whose_products_qbench_cannot_follow_are_refused_at_their_first_call():
    experts = _Experts(gated=True)
    set_input_step(experts, "gate_up_proj", "quantize", lambda x, _e: x)
    with pytest.raises(QBenchError, match="multiplies gate_up_proj in a way qbench cannot"):
        experts(torch.randn(2, 3, 8))


def test_a_router_with_its_own_forward_is_rounded_in_place():
    """Llama 4's router (an nn.Linear subclass returning scores and logits) keeps its class:
    its weight is rounded in place and its input before its forward."""
    model = _model("llama4_text")
    router = model.model.layers[0].feed_forward.router
    fp = _logits(model)
    config = _config(method="rtn", weights={"bits": 4}, activations={"bits": 8}, routers=True)
    report = config.apply(model)
    assert model.model.layers[0].feed_forward.router is router
    assert _rounded_rows(router.weight, False).max() <= 16
    rounded, total = report["kinds"]["router"]["activations"]
    assert rounded == total > 0
    assert 1e-4 < _relative(_logits(model), fp) < 1


# ---------------------------------------------------------------- KV of hand-written attention


@pytest.mark.parametrize("family", ["gptj", "codegen"])
def test_kv_rounding_of_hand_written_attention_equals_a_patched_attention(family, monkeypatch):
    """GPT-J's and CodeGen's attention is their own `_attn(query, key, value, mask)` after RoPE
    and the cache: the KV step equals rounding key and value there, by a patch of the class."""
    model = _model(family)
    fp = _logits(model)
    quantize_(model, _config(method="rtn", kv={"bits": 4}))
    ours = _logits(model)
    assert _relative(ours, fp) > 1e-4
    reference = _model(family)
    attention = type(reference.transformer.h[0].attn)
    original, spec = attention._attn, KVQuant(bits=4)

    def rounded(self, query, key, value, attention_mask=None):
        return original(self, query, fake_quant(key, spec), fake_quant(value, spec), attention_mask)

    monkeypatch.setattr(attention, "_attn", rounded)
    assert _relative(_logits(reference), ours) < 1e-6


@pytest.mark.parametrize("family", ["mpt", "bloom", "gptj"])
def test_kv_step_of_hand_written_attention_takes_keys_and_values(family):
    """MPT's matmul and BLOOM's baddbmm scores: rotating q and k per head there leaves the
    logits unchanged (the scores' factors are q and k), and the values rounded are the
    [.., tokens, head_dim] values, not the probabilities."""
    model = _model(family)
    fp = _logits(model)
    sites = kv_sites(model)
    assert len(sites) == 2
    seen = []
    for site in sites:
        site.transform.qk_rotation = HadamardTransform(site.head_dim, True)
        values = site.transform.values
        site.transform.values = lambda v, f=values: seen.append(v.shape) or f(v)
    assert _relative(_logits(model), fp) < 1e-5
    assert seen and all(shape[-2:] == (24, 16) for shape in seen)


# ---------------------------------------------------------------- the API refuses as the planner


API_QUANTIZERS = {
    "w4a8": {"method": "rtn", "weights": {"bits": 4}, "activations": {"bits": 8}},
    "w4-g16-convs": {"method": "rtn", "weights": {"bits": 4, "group": 16}, "convs": True},
    "a8-tensor": {"method": "rtn", "activations": {"bits": 8, "granularity": "tensor"}},
    "kv4": {"method": "rtn", "kv": {"bits": 4}},
    "nf4": {"method": "bitsandbytes", "scheme": "nf4"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_api_refuses_exactly_what_the_planner_refuses(family, tmp_path):
    """The planner's refusals (on the checkpoint's skeleton, no weights) of a few quantizers
    that each hit another check; quantize_ on the model raises the same, before any change,
    and runs the others to a complete coverage. One refusal needs a forward pass, so the API
    (and the runner, in the same call) adds it before any change: Mamba-1's dt_proj, whose
    weight its mixer applies itself, out of reach of activations: and library modules."""
    from qbench.plan import plan
    from qbench.quant.pipeline import model_name
    from qbench.recipe import load_recipe

    family_model(family).save_pretrained(tmp_path / "m")
    recipe = tmp_path / "r.yaml"  # JSON is YAML
    recipe.write_text(json.dumps({
        "name": "r",
        "checkpoints": [{"name": "ckpt", "path": str(tmp_path / "m")}],
        "quantizers": [{"name": n, **q} for n, q in API_QUANTIZERS.items()],
        "eval": {"perplexity": [{"data": "embedded", "seq_len": 32}]},
    }))  # fmt: skip
    planned = {c.quantizer_name: c.refusal for c in plan(load_recipe(recipe), recipe)}
    for i, (name, fields) in enumerate(API_QUANTIZERS.items()):
        model = _model(family)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = _config(**{**fields, "name": name})
        outside = family in OUTSIDE_FORWARD and ("activations" in fields or "scheme" in fields)
        if planned[name] is None and outside:  # found by a probe pass, before any change
            with pytest.raises(RefusedError, match="have their weight applied by their parent"):
                quantize_(model, config)
        elif planned[name] is None:
            report = quantize_(model, config)  # raises where a targeted weight stays float
            assert report["targeted"], name
            continue
        else:
            expected = planned[name].replace(f"quantizers[{i}] '{name}'", f"quantizer '{name}'")
            expected = expected.replace("'ckpt'", f"'{model_name(model)}'")
            with pytest.raises(RefusedError) as refused:
                quantize_(model, config)
            assert str(refused.value) == expected
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), name
