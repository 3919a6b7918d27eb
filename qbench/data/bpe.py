"""The byte-level BPE tokenizers qbench trains on a corpus, and a corpus's train split as
their token ids, cached in the cache folder by corpus fingerprint and vocabulary size (shared
by the trainer and the synthetic tasks' token vocabulary); `build_once` builds any cache
folder atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from qbench.data.sources import text_source
from qbench.environment import cache_dir
from qbench.errors import QBenchError, describe, storage_problem
from qbench.versions import library_versions

EOS = "<|endoftext|>"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built first if absent: into a staging folder, then renamed into place, so
    an interrupted build leaves nothing behind (and a concurrent one loses harmlessly)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".training-"))
    try:
        build(staging)
        os.replace(staging, target)
    except Exception as error:
        if target.is_dir() and isinstance(error, OSError):  # a concurrent build won
            return target
        if storage_problem(error):  # the library's message names no path: name it
            raise QBenchError(
                f"{target}: cannot write the checkpoint: {describe(error)}; free space in "
                f"{target.parent} (QBENCH_CACHE_DIR)"
            ) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train_tokenizer(rows: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `rows`; EOS doubles as BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(rows, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS)


def corpus_tokens(
    corpus: str, fingerprint: str, vocab_size: int
) -> tuple[PreTrainedTokenizerFast, torch.Tensor]:
    """A BPE tokenizer of `vocab_size` trained on the corpus's train split, and that split as
    token ids (EOS after each row).

    Cached by corpus fingerprint and vocabulary size: every checkpoint of a comparison reads
    the very same tokens, and a large corpus is tokenized once.
    """
    key = [fingerprint, vocab_size, library_versions()]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    target = build_once(
        cache_dir() / "corpora" / digest, lambda out: _tokenize(corpus, vocab_size, out)
    )
    tokens = torch.load(target / "tokens.pt", weights_only=True).long()
    return PreTrainedTokenizerFast.from_pretrained(target), tokens


TOKENIZE_ROWS = 256  # rows tokenized at a time: a large corpus never lists its ids in Python


def _tokenize(corpus: str, vocab_size: int, out: Path) -> None:
    rows = text_source(corpus).rows("train")
    tokenizer = train_tokenizer(rows, vocab_size)
    eos = [tokenizer.eos_token_id]
    chunks = [
        np.asarray(
            [
                i
                for row in tokenizer(rows[start : start + TOKENIZE_ROWS])["input_ids"]
                for i in [*row, *eos]
            ],
            dtype=np.int32,
        )
        for start in range(0, len(rows), TOKENIZE_ROWS)
    ]
    tokenizer.save_pretrained(out)
    torch.save(torch.from_numpy(np.concatenate(chunks)), out / "tokens.pt")
