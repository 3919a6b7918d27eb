"""Train a small qbench-family causal LM, cached by config hash: on a text corpus (with a BPE
tokenizer trained on it) or on a synthetic task over a corpus (qbench.data.synthetic, with
the task's tokenizer), whose copy / bigram losses and attention on BOS by query type are
logged while it trains (task_log.json, task.png)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from qbench.checkpoints.catalog import PRESETS, Preset, variant_options
from qbench.checkpoints.dispatch import default_device
from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM
from qbench.data.bpe import build_once, corpus_tokens
from qbench.data.sources import load_text, text_fingerprint
from qbench.data.synthetic import Task, TaskSpec, build_task
from qbench.environment import cache_dir
from qbench.versions import library_versions


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
    task: dict[str, Any] | None = None  # a synthetic task's options (TaskSpec), else text

    def digest(self) -> str:
        blob = json.dumps(_without_unset(asdict(self)), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def task_spec(self) -> TaskSpec | None:
        return TaskSpec.model_validate(self.task) if self.task is not None else None


def _without_unset(fields: dict[str, Any]) -> dict[str, Any]:
    """The config's fields less those added later and left unset (None), so a checkpoint
    trained before they existed keeps its digest."""
    hyper = {k: v for k, v in fields["hyper"].items() if v is not None}
    return {k: v for k, v in fields.items() if v is not None} | {"hyper": hyper}


def train_config(
    preset: str,
    variant: str,
    corpus: str,
    seed: int,
    steps: int | None,
    task: TaskSpec | None = None,
) -> TrainConfig:
    hyper = PRESETS.get(preset)
    if steps is not None:
        hyper = replace(hyper, steps=steps)
    fingerprint = text_fingerprint(load_text(corpus, "train"))
    options = task.model_dump() if task is not None else None
    return TrainConfig(
        preset, variant, corpus, fingerprint, seed, hyper, library_versions(), options
    )


def model_config(config: TrainConfig) -> QBenchConfig:
    """The model's config; with a task, its vocabulary is the task's symbols (building the
    task reads the corpus: QBenchError when it has too few symbols for the triggers)."""
    h = config.hyper
    task = config.task_spec()
    return QBenchConfig(
        vocab_size=build_task(task, config.corpus).vocab_size if task else h.vocab_size,
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


def tokenized_corpus(config: TrainConfig) -> tuple[PreTrainedTokenizerFast, torch.Tensor]:
    """The corpus's tokenizer and its train split as token ids (EOS after each row)."""
    return corpus_tokens(config.corpus, config.corpus_fingerprint, config.hyper.vocab_size)


def initial_model(config: TrainConfig) -> QBenchForCausalLM:
    """The variant at initialisation, seeded by `config.seed`; every weight it shares with the
    baseline starts as the baseline's, so matched runs differ only in the variant's modules."""
    torch.manual_seed(config.seed)
    baseline = QBenchForCausalLM(model_config(replace(config, variant="baseline")))
    if config.variant == "baseline":
        return baseline
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


def task_batches(task: Task, h: Preset, seed: int) -> Iterator[torch.Tensor]:
    """Each step's [batch, seq_len] sequences of the task: a function of the task, the preset
    and the seed only (every variant trained with one seed sees the same sequences)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(h.steps):
        yield task.sample(h.batch_size, h.seq_len, generator)


@dataclass
class TrainingData:
    """What a run trains on: its tokenizer, each step's batch, and a description for the log."""

    tokenizer: PreTrainedTokenizerFast
    batches: Iterator[torch.Tensor]
    log: dict[str, Any]
    task: Task | None = None


def training_data(config: TrainConfig) -> TrainingData:
    h = config.hyper
    spec = config.task_spec()
    if spec is not None:
        task = build_task(spec, config.corpus)
        log = {"task": spec.describe(), "symbols": list(task.symbols)}
        return TrainingData(task.tokenizer(), task_batches(task, h, config.seed), log, task)
    tokenizer, tokens = tokenized_corpus(config)
    batches = (
        torch.stack([tokens[s : s + h.seq_len] for s in starts])
        for starts in batch_starts(len(tokens), h, config.seed)
    )
    return TrainingData(tokenizer, batches, {"corpus_tokens": len(tokens)})


def train(config: TrainConfig, out: Path, progress: bool = True) -> None:
    """Train the model, then save it, its tokenizer, the log and the loss curve into `out`
    (with a task, also task_log.json and task.png: its figures every TASK_LOG_POINTS-th of
    the run)."""
    h = config.hyper
    data = training_data(config)
    device = default_device()
    model = initial_model(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=h.lr,
        betas=(0.9, 0.95 if h.beta2 is None else h.beta2),
        weight_decay=h.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, h))
    monitor = TaskMonitor(data.task, h, device) if data.task is not None else None
    curve, order = [], hashlib.sha256()
    start, cpu_start = time.perf_counter(), time.process_time()
    desc = f"train {config.preset}/{config.variant}/seed {config.seed}"
    bar = tqdm(total=h.steps, desc=desc, disable=not progress)
    for step, batch in enumerate(data.batches):
        order.update(batch.numpy().astype("<i8").tobytes())
        batch = batch.to(device, non_blocking=True)
        with _autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        bar.update()
        shown = {"loss": f"{loss.item():.3f}"}
        if monitor is not None and monitor.due(step):
            shown |= monitor.record(model, step)
        bar.set_postfix(shown)
    bar.close()
    model.cpu().save_pretrained(out)
    data.tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    log = {
        "config": asdict(config),
        **data.log,
        "tokens_seen": h.steps * h.batch_size * h.seq_len,
        "data_order": order.hexdigest()[:16],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,  # user + sys of this process
        "tokens_per_second": h.steps * h.batch_size * h.seq_len / seconds,
        **({"task_final": monitor.points[-1]} if monitor is not None else {}),
    }
    (out / "train_config.json").write_text(json.dumps(log, indent=2))
    (out / "loss.json").write_text(json.dumps(curve))
    plot_loss(curve, out / "loss.png", desc.removeprefix("train "))
    if monitor is not None:
        (out / "task_log.json").write_text(json.dumps(monitor.points, indent=1))
        monitor.plot(out / "task.png", desc.removeprefix("train "))


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (fp32 master weights; norms and the loss stay fp32); none on the
    CPU, where bf16 matmuls are slower than fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


TASK_LOG_POINTS = 20  # task figures logged this many times per run (and at its last step)
TASK_PROBE_SEQUENCES = 64  # of the task's valid split


class TaskMonitor:
    """A task run's figures on a fixed probe (the first TASK_PROBE_SEQUENCES of the task's
    valid split): loss on copy targets (trigger queries) and on bigram targets, the least
    loss the bigram allows, the sink head's attention on BOS from each query type, and the
    largest residual-state peak (qbench.eval.diagnostics, as the leaderboard measures them)."""

    def __init__(self, task: Task, h: Preset, device: torch.device) -> None:
        self.task, self.steps = task, h.steps
        self.every = max(1, h.steps // TASK_LOG_POINTS)
        probe = task.held_out("valid", h.seq_len)[:TASK_PROBE_SEQUENCES]
        self.optimal = task.optimal_loss(probe)["non_trigger"]
        self.probe = probe.to(device)
        self.types = task.query_types(self.probe)
        self.points: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps - 1

    @torch.no_grad()
    def record(self, model: QBenchForCausalLM, step: int) -> dict[str, str]:
        """Measure, keep the point, and return what the progress bar shows."""
        from qbench.eval.diagnostics import diagnose

        logits = model(input_ids=self.probe).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), self.probe[:, 1:].flatten(), reduction="none"
        ).view_as(self.probe[:, 1:])
        summary = diagnose(model, self.probe, query_types=self.types).summary
        point = {
            "step": step,
            "copy_loss": nll[self.types["trigger"][:, :-1]].mean().item(),
            "bigram_loss": nll[self.types["non_trigger"][:, :-1]].mean().item(),
            "bigram_optimum": self.optimal,
            **{k: summary.get(k) for k in TASK_FIGURES},
        }
        self.points.append(point)
        return {
            "copy": f"{point['copy_loss']:.2f}",
            "bigram": f"{point['bigram_loss']:.2f}",
            "sink": f"{point['sink_mass_non_trigger']:.2f}",
            "max/med": f"{point['max_median_ratio']:.0f}",
        }

    def plot(self, path: Path, title: str) -> None:
        """task.png: losses by target kind, and the sink's mass and residual peak by step."""
        from matplotlib.figure import Figure

        steps = [p["step"] for p in self.points]
        figure = Figure(figsize=(12, 3.5), layout="constrained")
        losses, sinks, peaks = figure.subplots(1, 3)
        for key in ("copy_loss", "bigram_loss", "bigram_optimum"):
            losses.plot(steps, [p[key] for p in self.points], label=key.replace("_", " "))
        losses.set(xlabel="step", ylabel="nats / token", title="loss by target")
        for key in ("sink_mass_non_trigger", "sink_mass_trigger", "bias_slot_mass"):
            if self.points[-1].get(key) is not None:
                label = key.removeprefix("sink_mass_").replace("_", " ")
                sinks.plot(steps, [p[key] for p in self.points], label=label)
        sinks.set(xlabel="step", ylabel="attention on BOS", title="sink head", ylim=(0, 1))
        peaks.plot(steps, [p["max_median_ratio"] for p in self.points])
        peaks.set(xlabel="step", ylabel="max / median |h|", yscale="log", title="residual peak")
        for axes in (losses, sinks):
            axes.legend(fontsize="small")
        figure.suptitle(title)
        figure.savefig(path, dpi=100)


# Diagnostics summary figures a task run logs (qbench.eval.diagnostics._summary).
TASK_FIGURES = (
    "sink_mass_non_trigger",
    "sink_mass_trigger",
    "sink_head",
    "bias_slot_mass",
    "max_median_ratio",
    "max_activation",
    "max_activation_position",
)


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
    """Linear warmup, then cosine decay to min_lr (default 10%) of the peak."""
    if step < h.warmup:
        return (step + 1) / h.warmup
    progress = (step - h.warmup) / max(1, h.steps - h.warmup)
    floor = 0.1 if h.min_lr is None else h.min_lr
    return floor + (1 - floor) / 2 * (1 + math.cos(math.pi * progress))
