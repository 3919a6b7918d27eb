"""Perplexity against a direct computation with transformers' own loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.data.sources import load_text
from qbench.errors import QBenchError
from qbench.eval.perplexity import perplexity, windows_of


def _direct(model, tokenizer, text: str, seq_len: int, max_windows: int) -> float:
    """One window at a time; transformers' mean shifted cross-entropy is each window's NLL."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    losses = []
    for start in range(0, min(len(ids) // seq_len, max_windows) * seq_len, seq_len):
        window = ids[start : start + seq_len].unsqueeze(0)
        with torch.no_grad():
            losses.append(model(input_ids=window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_direct_computation_on_a_real_model(stories_dir, batch_size):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    text = load_text("embedded", "test")
    result = perplexity(model, tokenizer, text, 128, batch_size, max_windows=7, progress=False)
    assert result.windows == 7 and result.predicted_tokens == 7 * 127
    assert result.perplexity == pytest.approx(_direct(model, tokenizer, text, 128, 7), rel=1e-5)


def test_matches_direct_computation_on_qwen2(qwen2_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    text = load_text("embedded", "valid")
    result = perplexity(model, tokenizer, text, 64, 4, max_windows=5, progress=False)
    assert result.perplexity == pytest.approx(_direct(model, tokenizer, text, 64, 5), rel=1e-5)


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    assert windows_of(ids, 3, None).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows_of(ids, 3, 2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(QBenchError, match="fewer than seq_len 11"):
        windows_of(ids, 11, None)


def test_window_sums_are_each_windows_own_loss_and_add_up_to_the_total(qwen2_dir):
    """window_nll[i] is transformers' mean shifted loss of window i times its 63 targets."""
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    text = load_text("embedded", "valid")
    result = perplexity(model, tokenizer, text, 64, 3, max_windows=5, progress=False)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        direct = [
            63 * model(input_ids=w[None], labels=w[None]).loss.item()
            for w in ids[: 5 * 64].view(5, 64)
        ]
    assert result.window_tokens == 63 and len(result.window_nll) == 5
    assert result.window_nll == pytest.approx(direct, rel=1e-5)
    assert sum(result.window_nll) / result.predicted_tokens == pytest.approx(result.mean_nll)
    again = perplexity(model, tokenizer, text, 64, 5, max_windows=5, progress=False)
    other = perplexity(model, tokenizer, text, 64, 5, max_windows=4, progress=False)
    assert again.windows_sha == result.windows_sha != other.windows_sha
    assert json.loads(json.dumps(result.as_dict()))["window_nll"] == result.window_nll
