"""Checkpoints: local HF directories load offline; the trainer trains, saves and caches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.checkpoints import train as training
from qbench.checkpoints.load import checkpoint_identity, load_checkpoint
from qbench.recipe import CheckpointSpec


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir", "stories_dir"])
def test_local_directory_loads_offline(fixture, request):
    directory = request.getfixturevalue(fixture)
    model, tokenizer = load_checkpoint(CheckpointSpec(name="m", path=str(directory)))
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer("The quick brown fox jumps.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not model.training and model.dtype == torch.float32


def test_dtype_option_is_applied(llama_dir):
    model, _ = load_checkpoint(CheckpointSpec(name="m", path=str(llama_dir), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


def test_identity_follows_the_weights(tmp_path, llama_dir):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in llama_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    spec = CheckpointSpec(name="m", path=str(copy))
    before = checkpoint_identity(spec)
    assert before == checkpoint_identity(CheckpointSpec(name="m", path=str(llama_dir)))
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    model.save_pretrained(copy)
    assert checkpoint_identity(spec) != before


def test_trainer_saves_a_loadable_checkpoint_and_caches_it(monkeypatch):
    config = training.train_config("tiny", "baseline", "embedded", seed=0, steps=25)
    path = training.trained_checkpoint(config, progress=False)
    model = AutoModelForCausalLM.from_pretrained(path)  # no trust_remote_code needed
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qbench" and len(tokenizer) == 2048
    curve = json.loads((path / "loss.json").read_text())
    assert len(curve) == 25
    assert sum(p["loss"] for p in curve[-5:]) / 5 < curve[0]["loss"] - 0.5

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("retrained"))
    assert training.trained_checkpoint(config, progress=False) == path
    other_seed = training.train_config("tiny", "baseline", "embedded", seed=1, steps=25)
    assert other_seed.digest() != config.digest()


def test_interrupted_training_leaves_no_checkpoint(monkeypatch):
    config = training.train_config("tiny", "baseline", "embedded", seed=7, steps=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        training.trained_checkpoint(config, progress=False)
    assert list((training.cache_dir() / "checkpoints").glob(f"*{config.digest()}*")) == []
    assert list((training.cache_dir() / "checkpoints").glob(".training-*")) == []
