"""Train a small qbench-family causal LM and its BPE tokenizer, cached by config hash."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from qbench.checkpoints.catalog import PRESETS, Preset, variant_options
from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM
from qbench.data.sources import load_text, text_fingerprint, text_source
from qbench.environment import cache_dir
from qbench.errors import QBenchError, describe, storage_problem
from qbench.versions import library_versions

EOS = "<|endoftext|>"


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
    fingerprint = text_fingerprint(load_text(corpus, "train"))
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


def trained_checkpoint(config: TrainConfig, progress: bool = True) -> Path:
    """The directory of the checkpoint `config` describes, training it first if needed."""
    target = cache_dir() / "checkpoints" / f"{config.preset}-{config.variant}-{config.digest()}"
    return build_once(target, lambda out: train(config, out, progress))


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


def tokenized_corpus(config: TrainConfig) -> tuple[PreTrainedTokenizerFast, torch.Tensor]:
    """The corpus's tokenizer and its train split as token ids (EOS after each row).

    Cached by corpus fingerprint and vocabulary size: every checkpoint of a comparison reads
    the very same tokens, and a large corpus is tokenized once.
    """
    key = [config.corpus_fingerprint, config.hyper.vocab_size, config.versions]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    target = build_once(cache_dir() / "corpora" / digest, lambda out: _tokenize(config, out))
    tokens = torch.load(target / "tokens.pt", weights_only=True).long()
    return PreTrainedTokenizerFast.from_pretrained(target), tokens


def _tokenize(config: TrainConfig, out: Path) -> None:
    rows = text_source(config.corpus).rows("train")
    tokenizer = train_tokenizer(rows, config.hyper.vocab_size)
    ids = [i for row in tokenizer(rows)["input_ids"] for i in [*row, tokenizer.eos_token_id]]
    tokenizer.save_pretrained(out)
    torch.save(torch.tensor(ids, dtype=torch.int32), out / "tokens.pt")


def initial_model(config: TrainConfig) -> QBenchForCausalLM:
    """The variant at initialisation, seeded by `config.seed`; every weight it shares with the
    baseline starts as the baseline's, so matched runs differ only in the variant's modules."""
    torch.manual_seed(config.seed)
    baseline = QBenchForCausalLM(model_config(replace(config, variant="baseline")))
    torch.manual_seed(config.seed)
    model = QBenchForCausalLM(model_config(config))
    model.load_state_dict(baseline.state_dict(), strict=False)  # missing: the variant's own
    return model


def batch_starts(n_tokens: int, h: Preset, seed: int) -> Iterator[list[int]]:
    """Each step's window offsets into the token stream: a function of the corpus length,
    the preset and the seed only, so every variant trained with one seed sees the same data."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(h.steps):
        yield torch.randint(n_tokens - h.seq_len, (h.batch_size,), generator=generator).tolist()


def train(config: TrainConfig, out: Path, progress: bool = True) -> None:
    """Train the model, then save it, its tokenizer, the log and the loss curve into `out`."""
    h = config.hyper
    tokenizer, tokens = tokenized_corpus(config)
    model = initial_model(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=h.lr, betas=(0.9, 0.95), weight_decay=h.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, h))
    curve, order, start = [], hashlib.sha256(), time.perf_counter()
    desc = f"train {config.preset}/{config.variant}/seed {config.seed}"
    bar = tqdm(total=h.steps, desc=desc, disable=not progress)
    for step, starts in enumerate(batch_starts(len(tokens), h, config.seed)):
        order.update(json.dumps(starts).encode())
        batch = torch.stack([tokens[s : s + h.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {
        "config": asdict(config),
        "corpus_tokens": len(tokens),
        "tokens_seen": h.steps * h.batch_size * h.seq_len,
        "data_order": order.hexdigest()[:16],
        "seconds": time.perf_counter() - start,
    }
    (out / "train_config.json").write_text(json.dumps(log, indent=2))
    (out / "loss.json").write_text(json.dumps(curve))
    plot_loss(curve, out / "loss.png", desc.removeprefix("train "))


def plot_loss(curve: list[dict[str, float]], path: Path, title: str) -> None:
    """Training loss per step (and its 20-step moving average) as a PNG."""
    from matplotlib.figure import Figure

    steps = [p["step"] for p in curve]
    losses = [p["loss"] for p in curve]
    window = 20
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in steps]
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(steps, losses, linewidth=0.6, alpha=0.4, label="loss")
    axes.plot(steps, smooth, linewidth=1.5, label=f"{window}-step mean")
    axes.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    axes.legend()
    figure.savefig(path, dpi=100)


def _lr_factor(step: int, h: Preset) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < h.warmup:
        return (step + 1) / h.warmup
    progress = (step - h.warmup) / max(1, h.steps - h.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
