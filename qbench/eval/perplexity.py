"""GPTQ-style token perplexity: non-overlapping windows over the whole tokenized text."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qbench.errors import QBenchError
from qbench.quant.walk.onload import input_device

CONVENTION = (
    "GPTQ-style token perplexity: the documents joined as stated, tokenized once, cut into "
    "non-overlapping windows of seq_len tokens; exp(mean NLL of every next token inside each "
    "window)"
)


@dataclass(frozen=True)
class Perplexity:
    """One text's perplexity, and per window what a paired bootstrap resamples.

    window_nll[i]: the summed next-token NLL (nats) of window i, over `window_tokens`
    (= seq_len - 1) predicted tokens; windows_sha: a hash of the windows' token ids, equal
    for two cells exactly when they scored the same tokens.
    """

    perplexity: float
    mean_nll: float
    windows: int
    predicted_tokens: int
    text_tokens: int
    window_tokens: int
    window_nll: list[float]
    windows_sha: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows_of(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows; the tail shorter than seq_len is dropped."""
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise QBenchError(f"the text has {ids.numel()} tokens, fewer than seq_len {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    """Mean next-token NLL over every window, batched; the first token of a window has no target.

    Every token's NLL is kept (float32, 4 bytes per token) and the total summed once at the end
    in float64, as are the per-window sums, so nothing depends on `batch_size` (a running sum
    per batch would, in its last bits).
    """
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    windows = windows_of(ids, seq_len, max_windows)
    device = input_device(model)
    token_nll, window_nll = [], []
    for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        log_probs = F.log_softmax(logits.flatten(0, 1), dim=-1)  # cross_entropy's own first step
        targets = batch[:, 1:].flatten()
        per_token = F.nll_loss(log_probs, targets, reduction="none").view(len(batch), -1).cpu()
        token_nll.append(per_token)
        window_nll += per_token.double().sum(dim=1).tolist()
    predicted = windows.shape[0] * (seq_len - 1)
    mean_nll = torch.cat(token_nll).double().sum().item() / predicted
    sha = hashlib.sha256(windows.numpy().astype("<i8").tobytes()).hexdigest()[:16]
    return Perplexity(
        math.exp(mean_nll), mean_nll, windows.shape[0], predicted, ids.numel(), seq_len - 1,
        window_nll, sha,
    )  # fmt: skip
