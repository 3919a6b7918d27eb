"""Shared fixtures: offline settings, a private cache, and tiny local HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Trained checkpoints go to one cache per test session, never the user's."""
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qbench.checkpoints.train import train_tokenizer
    from qbench.data.sources import embedded_rows

    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(embedded_rows("train")[:30], vocab_size=300).save_pretrained(path)
    return path


def _save(model: torch.nn.Module, tokenizer_dir: Path, path: Path) -> Path:
    model.save_pretrained(path)
    for file in tokenizer_dir.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    return path


# The random test models' sizes: MLP width 172 (like stories260K) is not a multiple of 8.
TINY_SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random Llama whose MLP width (172, like stories260K) is not a multiple of 8."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_SHAPE)
    return _save(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    config = Qwen2Config(**TINY_SHAPE | {"intermediate_size": 128})
    return _save(Qwen2ForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """karpathy's stories260K, a real pretrained Llama, from ../shared/models."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real checkpoint not present at {STORIES}")
    return STORIES


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so no variant module is neutral."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_scale = param.dim() == 1 and not name.endswith(("bias", "k_bias", "v_bias"))
            param.copy_(1 + 0.3 * noise if is_scale else 0.1 * noise)
    return model.eval()


ARCH_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(kind, **shape) -> a small random fp32 model: 'llama', 'qwen2', 'qwen3',
    'mistral', 'qk-norm' (qbench with Qwen3's q/k norms) or a qbench variant; shape overrides
    the sizes."""
    from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM, variant_options

    def build(kind: str, **overrides: int) -> torch.nn.Module:
        torch.manual_seed(0)
        sizes = {**TINY_SHAPE, **overrides}
        if kind in ARCH_CONFIGS:
            head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]  # Qwen3's is 128
            config = ARCH_CONFIGS[kind](**{"head_dim": head_dim, **sizes})
            from transformers import AutoModelForCausalLM

            return randomize(AutoModelForCausalLM.from_config(config), 0)
        options = {"qk_norm": True} if kind == "qk-norm" else variant_options(kind)
        return randomize(QBenchForCausalLM(QBenchConfig(**sizes, **options)), 0)

    return build
