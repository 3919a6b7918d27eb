"""Synthetic training tasks: token streams whose structure makes known circuits form.

A task turns a text into a vocabulary and a generative process; the trainer draws its batches
from the process (seeded by the training seed), and a recipe scores a task's held-out split
(`eval.perplexity: {data: task, checkpoint: ...}`) as it scores any text.

`bigram-backcopy` (Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835, Section 2; their code's
`bbm` task): every sequence starts with BOS; the `triggers` most frequent symbols of the text
are triggers. After a trigger the next symbol copies the one before the trigger (a copy
target); after any other symbol it is drawn from the text's bigram transition P(next |
current) (a bigram target). The first symbol after BOS is drawn from the text's unigram
frequencies of the non-triggers, so the symbol before a trigger is never BOS and two triggers
never follow each other (a copy target is never a trigger). A head that copies must attend to
the previous-but-one token from trigger queries and do nothing elsewhere: it learns to park
non-trigger queries on BOS (an attention sink, "dormant") while BOS's residual state grows
large and its value state small (Guo et al.'s residual-state peak and value-state drain).

Vocabulary (`vocabulary:`): the text's characters (each symbol is a character, written as
GPT-2's byte-level rendering of its UTF-8 bytes, e.g. ' ' -> 'Ġ') or its tokens (a byte-level
BPE trained on the text); `vocab_size` keeps the most frequent ones (characters: None keeps
all; tokens: the BPE's size, default 512). Ids: 0 = BOS (`<|endoftext|>`, as the trainer's
BPE tokenizers), 1 = `<unk>` (never generated; a cut symbol in a probe's text reads as it),
then the symbols by decreasing frequency, so the triggers are ids 2 .. 1 + triggers.

A split's text is its sequences, each written as its symbols joined by spaces and sequences
joined by newlines; the task's tokenizer (WordLevel over the symbols, split on whitespace)
reads it back to exactly the generated ids, so perplexity windows of the task's context length
are its sequences, each with BOS at position 0.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field

from qbench.config import StrictModel
from qbench.data.sources import load_text, text_fingerprint
from qbench.errors import QBenchError

if TYPE_CHECKING:  # the specs are torch-free (a recipe loads without the model libraries)
    import numpy as np
    import torch
    from torch import Tensor
    from transformers import PreTrainedTokenizerFast

BOS = "<|endoftext|>"  # the trainer's BOS / EOS, so task and text checkpoints agree
UNK = "<unk>"
BOS_ID, UNK_ID, FIRST_SYMBOL = 0, 1, 2
DEFAULT_BPE_SIZE = 512
HELD_OUT_SEQUENCES = 2048  # sequences in each held-out split
SPLITS = ("valid", "test")
MAX_SYMBOLS = 4096  # the transition matrix is dense: [V, V]


class BigramBackcopy(StrictModel):
    """The Bigram-Backcopy task's options (see the module docstring)."""

    name: Literal["bigram-backcopy"] = "bigram-backcopy"
    vocabulary: Literal["characters", "tokens"] = "characters"
    vocab_size: Annotated[int, Field(ge=2, le=MAX_SYMBOLS)] | None = None
    triggers: Annotated[int, Field(ge=1, le=1024)] = 3

    def describe(self) -> str:
        size = f"{self.vocab_size} most frequent " if self.vocab_size else ""
        return f"bigram-backcopy ({size}{self.vocabulary}, {self.triggers} triggers; BOS first)"


# A task's options: one model per task name; another task adds its own model to this union
# (with Field(discriminator="name")) and its generator below.
TaskSpec = BigramBackcopy
TRAIN_TASKS = get_args(TaskSpec.model_fields["name"].annotation)  # the names it accepts


def _task_from_name(value: Any) -> Any:
    """`task: bigram-backcopy` is short for `task: {name: bigram-backcopy}`."""
    return {"name": value} if isinstance(value, str) else value


TaskField = Annotated[TaskSpec, BeforeValidator(_task_from_name)]


@dataclass(frozen=True, eq=False)
class Task:
    """A task built from a text: its symbols, its generative process and its tokenizer.

    symbols[i] is the symbol of id i; `first` [V]: the distribution of the first symbol after
    BOS; `transition` [V, V]: row a is P(next | a) (rows of BOS and UNK unused).
    """

    spec: TaskSpec
    symbols: tuple[str, ...]
    first: Tensor
    transition: Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def trigger_ids(self) -> list[int]:
        return list(range(FIRST_SYMBOL, FIRST_SYMBOL + self.spec.triggers))

    def is_trigger(self, ids: Tensor) -> Tensor:
        """Boolean mask of `ids`' shape: True where the id is a trigger."""
        return (ids >= FIRST_SYMBOL) & (ids < FIRST_SYMBOL + self.spec.triggers)

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> Tensor:
        """[batch, seq_len] ids: BOS, then the process; a function of the generator's state."""
        import torch

        ids = torch.empty(batch, seq_len, dtype=torch.long)
        ids[:, 0] = BOS_ID
        if seq_len > 1:
            ids[:, 1] = torch.multinomial(self.first.expand(batch, -1), 1, generator=generator)[
                :, 0
            ]
        for t in range(1, seq_len - 1):
            current = ids[:, t]
            drawn = torch.multinomial(self.transition[current], 1, generator=generator)[:, 0]
            ids[:, t + 1] = torch.where(self.is_trigger(current), ids[:, t - 1], drawn)
        return ids

    def query_types(self, ids: Tensor) -> dict[str, Tensor]:
        """Masks [b, t] of the queries 1..t-1 by type: `non_trigger` (the next token is a
        bigram target; first: where the task rewards a no-op, qbench.eval.diagnostics picks
        the sink head by it) and `trigger` (a copy target); BOS's own query is in neither."""
        trigger = self.is_trigger(ids)
        trigger[:, 0] = False
        other = ~self.is_trigger(ids)
        other[:, 0] = False
        return {"non_trigger": other, "trigger": trigger}

    def held_out(self, split: str, seq_len: int) -> Tensor:
        """The split's HELD_OUT_SEQUENCES sequences [n, seq_len], from a generator seeded by
        the split's name (far from any training seed a recipe writes)."""
        if split not in SPLITS:
            raise QBenchError(f"a task has splits {', '.join(SPLITS)}, not '{split}'")
        import torch

        seed = int(hashlib.sha256(f"{self.spec.name}/{split}".encode()).hexdigest()[:15], 16)
        return self.sample(HELD_OUT_SEQUENCES, seq_len, torch.Generator().manual_seed(seed))

    def text(self, ids: Tensor) -> str:
        """Sequences [n, t] as text: symbols joined by spaces, sequences by newlines."""
        return "\n".join(" ".join(self.symbols[i] for i in row) for row in ids.tolist())

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A WordLevel tokenizer over the symbols (whitespace-split), BOS a special token."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {symbol: i for i, symbol in enumerate(self.symbols)}
        tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, unk_token=UNK
        )

    def optimal_loss(self, ids: Tensor) -> dict[str, float]:
        """The least expected next-token loss (nats) on `ids` by query type: 0 at triggers
        (the copy is determined), the transition's entropy at non-triggers."""
        p = self.transition[ids[:, 1:-1]]  # [b, t-2, V]: P(next | current) of queries 1..t-2
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        other = self.query_types(ids)["non_trigger"][:, 1:-1]
        return {"trigger": 0.0, "non_trigger": entropy[other].mean().item()}


def build_task(spec: TaskSpec, corpus: str) -> Task:
    """The task `spec` over the train split of `corpus` (read once per process).

    Raises QBenchError when the text has too few symbols for the triggers.
    """
    text = load_text(corpus, "train")
    return _built(spec, corpus, text_fingerprint(text))


@functools.cache
def _built(spec: TaskSpec, corpus: str, fingerprint: str) -> Task:
    import torch

    text = load_text(corpus, "train")
    if spec.vocabulary == "characters":
        symbols, ids = _characters(text, spec.vocab_size)
    else:
        symbols, ids = _tokens(corpus, fingerprint, spec.vocab_size or DEFAULT_BPE_SIZE)
    if len(symbols) > MAX_SYMBOLS:
        raise QBenchError(
            f"'{corpus}' has {len(symbols)} distinct {spec.vocabulary}, more than {MAX_SYMBOLS}: "
            "give vocab_size: to keep the most frequent"
        )
    if len(symbols) <= spec.triggers:
        raise QBenchError(
            f"{spec.triggers} triggers need at least {spec.triggers + 1} symbols; "
            f"'{corpus}' gives {len(symbols)} {spec.vocabulary}: lower triggers"
        )
    counts, unigram = _bigram_counts(ids, len(symbols))
    size = FIRST_SYMBOL + len(symbols)
    first = torch.zeros(size, dtype=torch.float64)
    first[FIRST_SYMBOL + spec.triggers :] = torch.from_numpy(unigram[spec.triggers :]).double()
    transition = torch.zeros(size, size, dtype=torch.float64)
    transition[FIRST_SYMBOL:, FIRST_SYMBOL:] = torch.from_numpy(counts).double()
    empty = transition.sum(-1) == 0  # BOS, UNK and symbols only ever last in a run
    transition[empty, FIRST_SYMBOL:] = torch.from_numpy(unigram).double()
    return Task(
        spec,
        (BOS, UNK, *symbols),
        (first / first.sum()).float(),
        (transition / transition.sum(-1, keepdim=True)).float(),
    )


def _bigram_counts(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts [n, n] of consecutive pairs of kept symbols (ids >= 0; -1 breaks a pair) and
    of each symbol [n]."""
    import numpy as np

    a, b = ids[:-1], ids[1:]
    kept = (a >= 0) & (b >= 0)
    pairs = np.bincount(a[kept] * n + b[kept], minlength=n * n).reshape(n, n)
    return pairs, np.bincount(ids[ids >= 0], minlength=n)


def _characters(text: str, keep: int | None) -> tuple[list[str], np.ndarray]:
    """The text's most frequent characters (as byte-level symbols), and the text as their
    indices (-1 for a character not kept)."""
    import numpy as np
    from tokenizers import pre_tokenizers

    render = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    values, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    order = np.lexsort((values, -counts))[:keep]  # by frequency, then code point
    index = np.full(len(values), -1, dtype=np.int64)
    index[order] = np.arange(len(order))
    symbols = [render.pre_tokenize_str(chr(values[i]))[0][0] for i in order]
    return symbols, index[inverse]


def _tokens(corpus: str, fingerprint: str, size: int) -> tuple[list[str], np.ndarray]:
    """A byte-level BPE of `size` trained on the text: its tokens that occur, by frequency,
    and the text's token ids as their indices (-1 at the EOS between documents)."""
    import numpy as np

    from qbench.data.bpe import corpus_tokens  # the trainer's cached BPE

    tokenizer, ids = corpus_tokens(corpus, fingerprint, size)
    ids = ids.numpy().astype(np.int64)
    counts = np.bincount(ids, minlength=len(tokenizer))
    counts[tokenizer.eos_token_id] = 0
    order = np.lexsort((np.arange(len(counts)), -counts))[: int((counts > 0).sum())]
    index = np.full(len(counts), -1, dtype=np.int64)
    index[order] = np.arange(len(order))
    return tokenizer.convert_ids_to_tokens(order.tolist()), index[ids]


@dataclass(frozen=True)
class TaskSource:
    """A task's held-out text as perplexity data: the task, its corpus and its sequence length
    (the context of the checkpoint a recipe names, so each perplexity window is a sequence)."""

    spec: TaskSpec
    corpus: str
    seq_len: int

    def task(self) -> Task:
        return build_task(self.spec, self.corpus)

    def text(self, split: str) -> str:
        """The split's sequences as text (generated once per process)."""
        return _held_out_text(self, split)

    def describe(self, split: str) -> str:
        return (
            f"the {split} split of {self.spec.describe()} over {self.corpus}: "
            f"{HELD_OUT_SEQUENCES} held-out sequences of {self.seq_len} tokens, one per window "
            "(BOS at position 0)"
        )


@functools.cache
def _held_out_text(source: TaskSource, split: str) -> str:
    task = source.task()
    return task.text(task.held_out(split, source.seq_len))
