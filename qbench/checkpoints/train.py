"""Train a small qbench-family causal LM and its BPE tokenizer, cached by config hash."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM, variant_options
from qbench.data.sources import TEXT_SOURCES, text_fingerprint
from qbench.registry import Registry
from qbench.versions import library_versions

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    """Model shape and optimisation schedule of a training run."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    weight_decay: float = 0.1


PRESETS: Registry[Preset] = Registry("training preset")
PRESETS.register("tiny")(
    Preset(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        seq_len=128,
        batch_size=16,
        steps=600,
        lr=3e-3,
        warmup=50,
    )
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained checkpoint; its hash names the cache entry."""

    preset: str
    variant: str
    corpus: str
    corpus_fingerprint: str
    seed: int
    hyper: Preset
    versions: dict[str, str]

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def train_config(
    preset: str, variant: str, corpus: str, seed: int, steps: int | None
) -> TrainConfig:
    hyper = PRESETS.get(preset)
    if steps is not None:
        hyper = replace(hyper, steps=steps)
    fingerprint = text_fingerprint("\n\n".join(TEXT_SOURCES.get(corpus).rows("train")))
    return TrainConfig(preset, variant, corpus, fingerprint, seed, hyper, library_versions())


def model_config(config: TrainConfig) -> QBenchConfig:
    h = config.hyper
    return QBenchConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.hidden_size,
        intermediate_size=h.intermediate_size,
        num_hidden_layers=h.num_hidden_layers,
        num_attention_heads=h.num_attention_heads,
        num_key_value_heads=h.num_key_value_heads,
        max_position_embeddings=max(2048, h.seq_len),
        **variant_options(config.variant),
    )


def cache_dir() -> Path:
    return Path(os.environ.get("QBENCH_CACHE_DIR", "~/.cache/qbench")).expanduser()


def trained_checkpoint(config: TrainConfig, progress: bool = True) -> Path:
    """The directory of the checkpoint `config` describes, training it first if needed."""
    target = cache_dir() / "checkpoints" / f"{config.preset}-{config.variant}-{config.digest()}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".training-"))
    try:
        train(config, staging, progress)
        os.replace(staging, target)  # atomic: an interrupted run leaves no half checkpoint
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


def train(config: TrainConfig, out: Path, progress: bool = True) -> None:
    """Train tokenizer and model, then save both (and the loss curve) into `out`."""
    h = config.hyper
    rows = TEXT_SOURCES.get(config.corpus).rows("train")
    tokenizer = train_tokenizer(rows, h.vocab_size)
    ids = [i for row in tokenizer(rows)["input_ids"] for i in [*row, tokenizer.eos_token_id]]
    tokens = torch.tensor(ids)

    torch.manual_seed(config.seed)
    model = QBenchForCausalLM(model_config(config))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=h.lr, betas=(0.9, 0.95), weight_decay=h.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, h))
    batches = torch.Generator().manual_seed(config.seed)  # same data order for every variant
    curve, start = [], time.perf_counter()
    bar = tqdm(range(h.steps), desc=f"train {config.preset}/{config.variant}", disable=not progress)
    for step in bar:
        starts = torch.randint(len(tokens) - h.seq_len, (h.batch_size,), generator=batches)
        batch = torch.stack([tokens[s : s + h.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {"config": asdict(config), "tokens": len(tokens), "seconds": time.perf_counter() - start}
    (out / "train_config.json").write_text(json.dumps(log, indent=2))
    (out / "loss.json").write_text(json.dumps(curve))


def _lr_factor(step: int, h: Preset) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < h.warmup:
        return (step + 1) / h.warmup
    progress = (step - h.warmup) / max(1, h.steps - h.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
