"""AWQ: the scale search against a direct implementation of the reference's loop on one block,
scaling is lossless, the clip search against a brute-force search, and AWQ + RTN beats RTN."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import family_model
from torch import nn

from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.methods.awq import awq, search_clip
from qbench.quant.walk.blockwise import BlockInputs
from qbench.quant.walk.inventory import inventory, linear_conv1d

W4G16 = WeightQuant(bits=4, group=16)
IDS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(5))


def _inputs(model: nn.Module, batch_size: int) -> BlockInputs:
    return BlockInputs(model, inventory(model), IDS, batch_size)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _direct_scales(
    model: nn.Module, norm: nn.Module, linears: list[nn.Linear], inspected: nn.Module, grid=20
) -> torch.Tensor:
    """The reference's auto_scale (llm-awq's _search_module_scale) for one norm group, written
    out: x the norm's output, the error that of `inspected` (module2inspect) called again on
    the inputs it received in the float forward."""
    seen = {}
    handles = [
        norm.register_forward_hook(lambda _, __, y: seen.setdefault("x", y)),
        inspected.register_forward_pre_hook(
            lambda _, a, k: seen.setdefault("call", (a, k)), with_kwargs=True
        ),
    ]
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)  # (a cache would grow at every call below)
    for handle in handles:
        handle.remove()
    args, kwargs = seen["call"]

    def output() -> torch.Tensor:
        y = inspected(*args, **kwargs)
        return y[0] if isinstance(y, tuple) else y

    with torch.no_grad():
        reference = output()
        x_mean = seen["x"].abs().reshape(-1, seen["x"].shape[-1]).mean(0)
        originals = [linear.weight.clone() for linear in linears]
        best, best_error = None, float("inf")
        for step in range(grid):
            scales = x_mean.pow(step / grid).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for linear, w in zip(linears, originals, strict=True):
                linear.weight.copy_(fake_quant(w * scales, W4G16) / scales)
            error = (output() - reference).pow(2).mean().item()
            if error < best_error:
                best, best_error = scales, error
        for linear, w in zip(linears, originals, strict=True):
            linear.weight.copy_(w)
    return best


@pytest.mark.parametrize(
    ("norm", "readers", "inspected"),
    [
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn"),
    ],
)  # fmt: skip
def test_norm_group_scales_equal_the_reference_loop_on_one_block(norm, readers, inspected):
    """As llm-awq's auto_scale: q/k/v judged by self_attn's output, gate/up by the MLP's."""
    model = family_model("llama")
    direct = copy.deepcopy(model)
    at = direct.model.layers[0].get_submodule
    expected = _direct_scales(direct, at(norm), [at(r) for r in readers], at(inspected))
    block = model.model.layers[0]
    before = block.get_submodule(norm).weight.detach().clone()
    awq(model, _inputs(model, 4), weights=W4G16, clip=False)
    found = before / block.get_submodule(norm).weight.detach()
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gemma2", "opt", "gpt2", "phi"])
def test_scaling_without_clip_is_lossless(family):
    model = family_model(family)
    linear_conv1d(model)
    before = _logits(model)
    awq(model, _inputs(model, 2), weights=W4G16, clip=False)
    after = _logits(model)
    assert float((after - before).norm() / before.norm()) < 1e-5


def test_clip_search_equals_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 32, generator=generator)
    weight[0, 3] = 8.0  # an outlier worth clipping
    x = torch.randn(40, 32, generator=generator)
    found = search_clip(weight, x, W4G16, grid=20, max_shrink=0.5)
    for row in range(6):
        for group in range(2):
            w, xs = weight[row, group * 16 : (group + 1) * 16], x[:, group * 16 : (group + 1) * 16]
            top = w.abs().max()
            errors = []
            for step in range(10):
                kept = top * (1 - step / 20)
                q = fake_quant(w.clamp(-kept, kept)[None], W4G16)[0]
                errors.append(((xs @ q - xs @ w) ** 2).mean().item())
            best = top * (1 - min(range(10), key=errors.__getitem__) / 20)
            assert found[row, group, 0] == pytest.approx(float(best), rel=1e-6)


def test_awq_then_rtn_loses_less_than_rtn_at_w3():
    """On a model with a planted massive channel, AWQ's scaling and clipping before RTN W3 g16
    keep the logits closer to fp than RTN alone."""
    fp = _logits(family_model("llama"))
    w3 = WeightQuant(bits=3, group=16)

    def rounded(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and name != "lm_head":
                    module.weight.copy_(fake_quant(module.weight, w3))
        return _logits(model)

    rtn = rounded(family_model("llama"))
    scaled = family_model("llama")
    awq(scaled, _inputs(scaled, 4), weights=w3)
    error = {name: float((x - fp).norm()) for name, x in (("rtn", rtn), ("awq", rounded(scaled)))}
    assert error["awq"] < 0.9 * error["rtn"], error


def test_a_scaling_that_changes_the_float_block_is_an_error(monkeypatch):
    """The in-block check catches a scaling that is not lossless (here: up rows scaled, down
    columns left as they were)."""
    import qbench.quant.methods.awq as awq_module
    from qbench.errors import QBenchError

    def broken(up, down, scales):
        with torch.no_grad():
            up.module.weight.div_(scales[:, None])

    monkeypatch.setattr(awq_module, "scale_pair", broken)
    model = family_model("llama")
    with pytest.raises(QBenchError, match="awq: scaling decoder block 0 changed its float output"):
        awq(model, _inputs(model, 2), weights=W4G16, clip=False)


def test_awq_cells_run_from_a_recipe(tmp_path, llama_dir):
    """method: awq and awq+gptq spelled out: ok records, W4A16 labels, a transformed stage that
    the clip moves away from fp (noted, not compared), all targets rounded."""
    from conftest import write_recipe

    from qbench.cli import main
    from qbench.record import Record

    calibration = "{data: embedded, sequences: 4, seq_len: 32, batch_size: 2}"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
name: awq
checkpoints: [{{name: llama, path: {llama_dir}}}]
quantizers:
  - {{name: awq, method: awq, weights: {{bits: 3, group: 4}}, calibration: {calibration}}}
  - name: awq-gptq
    transforms: [{{transform: awq, clip: false, calibration: {calibration}}}]
    rounding: {{method: gptq, calibration: {calibration}}}
    weights: {{bits: 3, group: 4}}
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 4}}]}}
""",
    )
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    files = (results / "awq" / "runs").glob("*.json")
    records = {r.quantizer.name: r for r in map(Record.model_validate_json, map(_text, files))}
    fp = records["fp"].metrics.perplexity["embedded"]
    clipped, scaled = records["awq"], records["awq-gptq"]
    assert clipped.precision == scaled.precision == "W3A16"
    assert any("awq changes the float model" in n for n in clipped.notes)
    assert clipped.stages["transformed"]["perplexity"]["embedded"] != fp
    transformed = scaled.stages["transformed"]["perplexity"]["embedded"]
    assert transformed == pytest.approx(fp, rel=1e-4)  # clip: false is lossless and checked
    for record in (clipped, scaled):
        assert record.metrics.perplexity["embedded"] != fp
        for kind in record.coverage["targeted"]:
            rounded, total = record.coverage["kinds"][kind]["weights"]
            assert rounded == total


def _text(path) -> str:
    return path.read_text()


class _Expert(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _CallsEveryExpert(nn.Module):
    """An MoE block as older transformers and remote code wrote it: every expert is called,
    with the tokens routed to it, none for expert 3 (never chosen)."""

    def __init__(self, hidden: int = 64, inner: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, inner) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [tokens, hidden]
        logits = self.gate(flat)
        logits[:, 3] = -1e4
        weights, chosen = logits.softmax(-1).topk(2, dim=-1)  # [tokens, 2]
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.reshape(x.shape)


def test_an_expert_called_with_no_token_is_judged_by_its_moe_block():
    """Expert 3 is called on zero tokens in every batch: its down's grid is judged by the MoE
    block's output (its own has no element), and the scaling stays lossless."""
    model = family_model("mixtral")
    for layer in model.model.layers:
        layer.mlp = _CallsEveryExpert(model.config.hidden_size)
    before = _logits(model)
    awq(model, _inputs(model, 2), weights=W4G16, clip=False)
    assert float((_logits(model) - before).norm() / before.norm()) < 1e-5
