"""SpinQuant: Cayley SGD on the Stiefel manifold, a training that lowers the quantized network's
loss below its random Hadamard start, lossless folding, the training objective equal to the
folded and rounded model's loss, kept rotations reused (and retrained when altered), and cells
composed with gptq and a KV cache from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.errors import QBenchError
from qbench.quant import artifacts
from qbench.quant.artifacts import Artifacts
from qbench.quant.context import StepContext, sample_windows
from qbench.quant.formats.hadamard import HadamardTransform, random_orthogonal
from qbench.quant.methods import spinquant as method
from qbench.quant.methods.rotation import HadamardInput
from qbench.quant.pipeline import transform
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.linear import QuantLinear

W4A4KV4 = {
    "weights": {"bits": 4},
    "activations": {"bits": 4, "clip": 0.9},
    "kv": {"bits": 4, "clip": 0.95},
}
CALIBRATION = {"data": "embedded", "sequences": 4, "seq_len": 32, "batch_size": 2}


def _spinquant(rounding: str = "rtn", kv: dict | None = None, **step: object) -> QuantizerConfig:
    fields = {"iterations": 3, "windows_per_iteration": 2, "calibration": CALIBRATION, **step}
    return QuantizerConfig.model_validate(
        {"name": "sq", "transforms": [{"transform": "spinquant", **fields}], "rounding": rounding}
        | W4A4KV4
        | ({"kv": kv} if kv else {})
    )


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _record(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_cayley_steps_descend_on_the_orthogonal_group_and_stay_on_it():
    """Orthogonal Procrustes, min ||X R - X R*||^2 over R in SO(n), from the identity: the
    loss falls to ~0 and every iterate is orthogonal to float64 precision."""
    generator = torch.Generator().manual_seed(0)
    target = random_orthogonal(16, generator)
    target[0] *= torch.linalg.det(target)  # det +1: reachable from the identity
    x = torch.randn(64, 16, dtype=torch.float64, generator=generator) / 8  # X^T X ~ I
    r, losses = torch.eye(16, dtype=torch.float64), []
    for _ in range(200):
        r.requires_grad_(True)
        loss = ((x @ r - x @ target) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, r)
        r = method.cayley_step(r.detach(), grad, lr=0.3)
        losses.append(float(loss.detach()))
        assert (r @ r.T - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12
    assert losses[-1] < 1e-6 * losses[0]
    torch.testing.assert_close(r, target, atol=1e-6, rtol=0)


def test_the_learned_rotation_lowers_the_quantized_loss_below_its_random_hadamard_start(
    stories_dir, tmp_path
):
    """stories260K (a real tiny model) under W4A4KV4: the calibration loss falls over the
    iterations, and the learned rotations end below the random Hadamard they start from on
    the same windows."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    calibration = {"data": "embedded", "sequences": 8, "seq_len": 64, "batch_size": 8}
    kv = {"bits": 4, "group": 8, "clip": 0.95}  # one scale per head of 8, as quarot-w4a4's
    config = _spinquant(kv=kv, iterations=12, windows_per_iteration=8, calibration=calibration)
    config.apply(model, tokenizer, artifacts=Artifacts(tmp_path, {"checkpoint": "stories"}))
    info = _record(tmp_path)["info"]
    losses = info["losses"]  # the same 8 windows at every iteration
    assert len(losses) == 12 and info["loss_start"] == losses[0]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.1
    assert info["loss_end"] < info["loss_start"] - 0.1


@pytest.mark.parametrize(
    "kind", ["llama", "qwen2", "baseline", "attn-bias", "gate-headwise", "preaffine", "gatednorm"]
)
def test_spinquant_is_lossless_in_float(kind, tiny_model, tokenizer):
    """R1, R2 (v_proj bias, the attn-bias value slot), R3 and R4 folded: the float model's
    logits stay; the value path and the stream really turned (weights changed)."""
    model = tiny_model(kind)
    value = model.model.layers[0].self_attn.v_proj.weight.clone()
    before = _logits(model)
    context = StepContext(model, _spinquant(), tokenizer)
    transform(context)
    assert (_logits(model) - before).abs().max() < 1e-4 * before.abs().max()
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, value)
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardInput)
    assert any(n.startswith("spinquant: trained 3 iterations x 2 windows") for n in context.notes)


def test_an_elementwise_output_gate_is_refused_before_training(tiny_model, tokenizer):
    """R2 cannot cross a per-element gate between v_proj and o_proj: the construction check
    says so before any iteration."""
    model = tiny_model("gate-elementwise")
    with pytest.raises(QBenchError, match="R2 does not commute"):
        transform(StepContext(model, _spinquant(), tokenizer))


def test_the_training_loss_is_the_loss_of_the_folded_rounded_model(tiny_model, tokenizer):
    """What spinquant minimizes is what the quantized model computes: the training network's
    loss after the last step equals the cross-entropy of the folded model rounded by rtn (the
    same formats) on the same windows."""
    model = tiny_model("llama")
    config = _spinquant()
    notes: list[str] = []
    config.apply(model, tokenizer, notes=notes)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    spec = config.transforms[0].calibration
    ids = sample_windows(tokenizer, spec, seed=0)[:2]  # the first iteration's windows
    with torch.no_grad():
        loss = method.calibration_loss(model, ids, batch_size=2)
    note = next(n for n in notes if n.startswith("spinquant: trained"))
    trained = float(note.split("-> ")[1].split(" ")[0])  # the loss after training
    assert trained == pytest.approx(float(loss), abs=2e-4)


def test_kept_rotations_are_reused_and_an_altered_file_is_retrained(
    tiny_model, tokenizer, tmp_path, monkeypatch
):
    store = Artifacts(tmp_path, {"checkpoint": "tiny"})
    config = _spinquant()
    first = tiny_model("llama")
    config.apply(first, tokenizer, artifacts=store)
    (tensors,) = tmp_path.glob("*.safetensors")
    record = _record(tmp_path)
    assert record["determinants"]["seed"] == 0 and record["info"]["iterations"] == 3

    real_train = method.train
    monkeypatch.setattr(method, "train", lambda *a, **k: pytest.fail("trained again"))
    second, notes = tiny_model("llama"), []
    config.apply(second, tokenizer, artifacts=store, notes=notes)
    loaded = f"spinquant: rotations loaded from {tmp_path.name}/{tensors.name[:16]}..."
    assert any(n.startswith(loaded) for n in notes)
    assert torch.equal(_logits(first), _logits(second))

    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of R1's last element
    tensors.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(method, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    third, notes = tiny_model("llama"), []
    config.apply(third, tokenizer, artifacts=store, notes=notes)
    assert calls == [1]
    assert any("changed since it was written" in n and "trained again" in n for n in notes)
    assert torch.equal(_logits(first), _logits(third))  # the same training, deterministic
    assert store.load(tensors.stem) is not None  # rewritten, and checks out


def test_a_missing_record_or_unparsable_file_is_stale(tmp_path):
    store = Artifacts(tmp_path, {"checkpoint": "x"})
    key = store.key({"a": 1})
    assert store.load(key) is None
    store.save(key, {"R1": torch.eye(2, dtype=torch.float64)}, {}, {"a": 1})
    tensors, record = store.paths(key)
    record.unlink()
    with pytest.raises(artifacts.StaleArtifact, match="missing"):
        store.load(key)
    store.save(key, {"R1": torch.eye(2, dtype=torch.float64)}, {}, {"a": 1})
    tensors.write_bytes(b"not safetensors")
    with pytest.raises(artifacts.StaleArtifact, match="changed since it was written"):
        store.load(key)


def test_iterations_zero_starts_where_quarot_does(tiny_model, tokenizer):
    """R1's start is the random Hadamard QuaRot's rotation draws from the same seed."""
    model = tiny_model("llama")
    network = method.rotated_network(model, False, torch.Generator().manual_seed(0))
    expected = HadamardTransform(64, True, torch.Generator().manual_seed(0)).matrix()
    assert torch.equal(network.rotations.r1, expected)
    context = StepContext(tiny_model("llama"), _spinquant(iterations=0), tokenizer)
    transform(context)
    assert "spinquant: iterations 0: R1 and R2 are the random Hadamard matrices" in context.notes


def test_spinquant_defaults_are_the_papers_and_calibration_fields_keep_them():
    step = QuantizerConfig.model_validate(
        {"transforms": ["spinquant"], "rounding": "gptq", **W4A4KV4}
    ).transforms[0]
    assert (step.iterations, step.windows_per_iteration, step.learning_rate) == (100, 8, 1.5)
    assert (step.calibration.sequences, step.calibration.seq_len) == (800, 2048)
    partial = _spinquant(calibration={"sequences": 64}).transforms[0].calibration
    assert (partial.sequences, partial.seq_len) == (64, 2048)
    gptq = QuantizerConfig.model_validate(
        {"transforms": ["spinquant"], "rounding": "gptq", **W4A4KV4}
    )
    formats = gptq.transforms[0].loss_formats(gptq)
    assert formats.weights is None and formats.activations is not None  # SpinQuant's README
    assert _spinquant().transforms[0].loss_formats(_spinquant()).weights is not None


RECIPE = """
name: sq
checkpoints: [{{name: llama, path: {llama}}}]
quantizers:
  - name: sq-gptq-kv4
    transforms: [{{transform: spinquant, iterations: 2, windows_per_iteration: 2,
                  calibration: {calibration}}}]
    rounding: {{method: gptq, calibration: {calibration}}}
    weights: {{bits: 4}}
    activations: {{bits: 4, clip: 0.9}}
    kv: {{bits: 4, clip: 0.95}}
    breakdown: true
  - name: quarot
    method: rotation
    weights: {{bits: 4}}
    activations: {{bits: 4, clip: 0.9}}
    breakdown: true
eval: {{perplexity: [{{data: embedded, seq_len: 32, max_windows: 4}}]}}
"""


def test_spinquant_with_gptq_kv_and_breakdown_runs_from_a_recipe(tmp_path, llama_dir, capsys):
    """Records of the whole and its three parts, one training (the parts load it), the
    transformed stage checked against fp, the breakdown and the training on the leaderboard;
    a rerun computes nothing."""
    from qbench.cli import main
    from qbench.record import Record

    calibration = "{data: embedded, sequences: 4, seq_len: 32, batch_size: 2}"
    text = RECIPE.format(llama=llama_dir, calibration=calibration)
    recipe = write_recipe(tmp_path / "sq.yaml", text)
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    records = {
        r.quantizer.name: r
        for r in (Record.model_validate_json(p.read_text()) for p in results.glob("sq/runs/*.json"))
    }
    assert set(records) == {
        "fp", "sq-gptq-kv4", "sq-gptq-kv4.weights", "sq-gptq-kv4.activations",
        "sq-gptq-kv4.kv", "quarot", "quarot.weights", "quarot.activations",
    }  # fmt: skip
    assert all(r.status == "ok" for r in records.values())
    fp = records["fp"].metrics.perplexity["embedded"]
    whole = records["sq-gptq-kv4"]
    assert whole.stages["transformed"]["perplexity"]["embedded"] == pytest.approx(fp, rel=1e-4)
    assert [r.precision for n, r in sorted(records.items()) if n.startswith("sq-")] == [
        "W4A4KV4", "W16A4", "W16A16KV4", "W4A16"
    ]  # fmt: skip
    assert len(list((results / "sq" / "learned").glob("*.safetensors"))) == 1
    for part in ("weights", "activations", "kv"):
        notes = records[f"sq-gptq-kv4.{part}"].notes
        assert any(n.startswith("spinquant: rotations loaded from") for n in notes)

    board = (results / "sq" / "LEADERBOARD.md").read_text()
    main_table = board.split("## Error breakdown")[0]
    assert "| llama        | sq-gptq-kv4 " in main_table and ".weights" not in main_table
    breakdown = board.split("## Error breakdown")[1].split("##")[0]
    for label in ("| whole ", "| weights only ", "| activations only ", "| KV only "):
        assert label in breakdown
    ratio = whole.metrics.perplexity["embedded"] / fp
    assert f"{ratio:.3f} [" in breakdown
    assert "## Learned rotations" in board and "trained 2 iterations x 2 windows" in board

    capsys.readouterr()
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    assert "8 cells, 8 done, 0 to run" in capsys.readouterr().out
