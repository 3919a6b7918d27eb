"""Randomly initialised checkpoints shaped by a config: any transformers causal LM, no download.

`random: {config: recipes/configs/qwen3-0.6b.json, seed: 0}` or
`random: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}` (config fields given
inline override the file's). The model is transformers' own `AutoModelForCausalLM.from_config`
of that config, initialised by its `_init_weights` in float32 after `torch.manual_seed(seed)`,
then cast to the config's `dtype` / `torch_dtype` (float32 when it names none) and saved with
qbench's byte-level BPE tokenizer trained on the embedded corpus (vocabulary min(vocab_size,
4096): ids above it exist in the model but never occur in text). Built once into
`$QBENCH_CACHE_DIR/checkpoints/random-<model_type>-<digest>/`, a normal Hugging Face
directory, keyed by a hash of the resolved config, the seed, the planted outlier, the
tokenizer's corpus and the library versions, exactly as trained checkpoints are cached.

`massive_channel: {dim: 7, scale: 50}` plants an outlier as massive activations look (Sun et
al. 2024): column `dim` of the input embedding, i.e. one residual channel of every token's
first hidden state, is multiplied by `scale`. With tied embeddings (Qwen3-0.6B) the lm_head
shares that tensor, so its column `dim` is scaled too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
)

from qbench.checkpoints import model as _family  # noqa: F401  (registers model_type "qbench")
from qbench.checkpoints.limits import check_sizes
from qbench.data.bpe import build_once, train_tokenizer
from qbench.data.sources import embedded_rows, load_text, text_fingerprint
from qbench.environment import cache_dir
from qbench.errors import QBenchError
from qbench.files import read_regular_file
from qbench.registry import did_you_mean
from qbench.versions import library_versions

if TYPE_CHECKING:
    from qbench.checkpoints.spec import RandomSpec

TOKENIZER_VOCAB = 4096  # the tokenizer's vocabulary: min(model's vocab_size, this)
MIN_VOCAB = 257  # the byte-level alphabet (256) and EOS
SAVED_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def causal_lm_types() -> list[str]:
    """Every model_type that AutoModelForCausalLM builds (transformers' and registered ones)."""
    registered = (n for n in CONFIG_MAPPING.keys() if n not in CONFIG_MAPPING_NAMES)  # noqa: SIM118
    extra = [n for n in registered if CONFIG_MAPPING[n] in MODEL_FOR_CAUSAL_LM_MAPPING]
    return sorted({*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *extra})


def config_class(model_type: str) -> type[PretrainedConfig]:
    """transformers' config class of a causal-LM `model_type`; ValueError naming the known ones."""
    known = causal_lm_types()
    if model_type not in known:
        raise ValueError(
            f"model_type '{model_type}' is not a causal LM transformers "
            f"can build{did_you_mean(model_type, known)}; e.g. llama, qwen2, qwen3, mistral, qbench"
        )
    return CONFIG_MAPPING[model_type]


CONFIG_LIMIT = 16 << 20  # bytes of a config.json


def _file_fields(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.exists():
        raise QBenchError(f"config: no such file '{path}' (relative to {Path.cwd()})")
    try:
        data = read_regular_file(file, CONFIG_LIMIT)
    except QBenchError as error:
        raise QBenchError(f"config: {error}") from None
    try:
        fields = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QBenchError(f"config: '{path}' is not a JSON config: {error}") from None
    if not isinstance(fields, dict):
        raise QBenchError(f"config: '{path}' holds no JSON object of config fields")
    return fields


def random_config(spec: RandomSpec) -> PretrainedConfig:
    """The config `spec` describes, checked: fields known to its class, a model it builds.

    Reads the config file (if any) but no weights. Raises QBenchError naming the field.
    """
    fields = {**(_file_fields(spec.config) if spec.config else {}), **spec.fields}
    model_type = spec.model_type or fields.get("model_type")
    fields.pop("model_type", None)
    if model_type is None:
        raise QBenchError("give model_type: or a config: file that names its model_type")
    try:
        build_class = config_class(model_type)
    except ValueError as error:
        raise QBenchError(str(error)) from None
    try:
        config = build_class(**fields)
    except Exception as error:  # TypeError, ValueError, huggingface_hub's validation errors
        reason = " ".join(str(error).split())
        raise QBenchError(f"{build_class.__name__} rejects these fields: {reason}") from None
    default = set(build_class().to_dict())
    unknown = sorted(set(config.to_dict()) - default)
    if unknown:
        known = sorted(default | set(type(spec).model_fields))
        hint = did_you_mean(unknown[0], known)
        raise QBenchError(
            f"unknown config field(s) {unknown} for model_type {model_type}{hint}: "
            f"not a field of transformers' {build_class.__name__}"
        )
    check_sizes(config)
    _check_buildable(config, spec)
    return config


def _check_buildable(config: PretrainedConfig, spec: RandomSpec) -> None:
    """The config builds a model (on the meta device: no memory) that the spec fits."""
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # transformers raises ValueError, AssertionError, ...
        hint = "; set pad_token_id: null or below vocab_size" if "Padding_idx" in str(error) else ""
        raise QBenchError(
            f"the config builds no model: {type(error).__name__}: {error}{hint}"
        ) from None
    saved_dtype(config)
    if config.vocab_size < MIN_VOCAB:
        raise QBenchError(
            f"vocab_size: {config.vocab_size} is below {MIN_VOCAB}, the tokenizer's byte "
            "alphabet and EOS; use a larger vocab_size"
        )
    channel = spec.massive_channel
    width = skeleton.get_input_embeddings().weight.shape[1]  # OPT's word_embed_proj_dim, ...
    if channel is not None and channel.dim >= width:
        raise QBenchError(
            f"massive_channel.dim: {channel.dim} is not a channel of the input embedding "
            f"(width {width}); use 0..{width - 1}"
        )


def saved_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the checkpoint is saved in: the config's, float32 when it names none."""
    dtype = config.dtype if config.dtype is not None else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in SAVED_DTYPES:
        raise QBenchError(
            f"dtype: the config's dtype {dtype} is not one of {', '.join(SAVED_DTYPES.values())}"
        )
    return dtype


def random_digest(spec: RandomSpec, config: PretrainedConfig) -> str:
    """What the weights depend on: resolved config, seed, planted outlier, tokenizer, versions."""
    determinants = {
        "config": config.to_dict(),
        "seed": spec.seed,
        "massive_channel": spec.massive_channel.model_dump() if spec.massive_channel else None,
        "tokenizer": {
            "vocab": tokenizer_vocab(config),
            "corpus": text_fingerprint(load_text("embedded", "train")),
        },
        "versions": library_versions(),
    }
    blob = json.dumps(determinants, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_vocab(config: PretrainedConfig) -> int:
    return min(config.vocab_size, TOKENIZER_VOCAB)


def random_checkpoint_dir(spec: RandomSpec, config: PretrainedConfig) -> Path:
    """Where the checkpoint `spec` (with its resolved `config`) is built, in the cache."""
    return cache_dir() / "checkpoints" / f"random-{config.model_type}-{random_digest(spec, config)}"


def random_checkpoint(spec: RandomSpec, progress: bool = True) -> Path:
    """The directory of the checkpoint `spec` describes, built first if needed."""
    config = random_config(spec)
    target = random_checkpoint_dir(spec, config)
    return build_once(target, lambda out: build(spec, config, out, progress))


def build(spec: RandomSpec, config: PretrainedConfig, out: Path, progress: bool = True) -> None:
    """Initialise the model (seeded, float32), plant the outlier, cast, save with a tokenizer."""
    if progress:
        print(f"building a random {config.model_type} checkpoint in {out.parent}", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's generator
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.massive_channel is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, spec.massive_channel.dim] *= (
                spec.massive_channel.scale
            )
    model.to(saved_dtype(config)).save_pretrained(out)
    train_tokenizer(embedded_rows("train"), tokenizer_vocab(config)).save_pretrained(out)
    record = {"random": spec.model_dump(), "parameters": sum(p.numel() for p in model.parameters())}
    (out / "random_config.json").write_text(json.dumps(record, indent=2))
