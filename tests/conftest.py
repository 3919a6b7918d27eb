"""Shared fixtures: offline settings, a private cache, and tiny local HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

# tests never touch the network: set before transformers / huggingface_hub read their constants
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

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

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"


def _wikitext_here() -> bool:
    from qbench.data.sources import data_dir

    folder = data_dir()
    return folder is not None and (folder / "wikitext-2-raw" / "wiki.test.raw").is_file()


# Tests of shipped recipes that read WikiText-2: a clone without ../shared/data skips them
# (saying so); CI, which has the data, runs them.
needs_wikitext = pytest.mark.skipif(
    not _wikitext_here(),
    reason="needs WikiText-2 (wikitext-2-raw/wiki.test.raw under QBENCH_DATA_DIR or "
    "../shared/data), which a fresh clone does not have",
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Trained checkpoints go to one cache per test session, never the user's."""
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qbench.data.bpe import train_tokenizer
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


def refusals(path: Path) -> dict[str, str]:
    """{quantizer name: why} of the cells the plan of recipe `path` refuses."""
    from qbench.plan import plan
    from qbench.recipe import load_recipe

    return {c.quantizer_name: c.refusal for c in plan(load_recipe(path), path) if c.refusal}


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

# Every decoder family issue 10 names, as tiny random configs (vocab 300 for the test tokenizer;
# no token id beyond it). Each exercises a structure: MoE with 3-D experts (qwen3_moe, mixtral,
# gpt_oss: transposed with biases), shared experts (qwen2_moe, deepseek_v3, with MLA attention),
# Gemma's 1 + w norms, sandwich norms and soft-capping (gemma2, gemma3_text), fused qkv and
# gate_up (phi3), a parallel block off one LayerNorm with partial rotary (phi), LayerNorm with
# bias and learned positions (opt), Conv1D (gpt2), parallel residual (gpt_neox), shared
# LayerNorms and multi-query (falcon), post-norms only (olmo2), multipliers (granite).
_SMALL = {**TINY_SHAPE, "intermediate_size": 128, "pad_token_id": None}
_NO_IDS = {"bos_token_id": None, "eos_token_id": None}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_group": 1,
            "topk_group": 1,
            "rope_parameters": {"rope_type": "default"},
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 16},
    ),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16}),
    "phi3": ("Phi3Config", _NO_IDS),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64, **_NO_IDS}),
    "gpt2": (
        "GPT2Config",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, **_NO_IDS},
    ),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, **_NO_IDS}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2, **_NO_IDS}),
    "olmo2": ("Olmo2Config", _NO_IDS),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25}),
    "granite": (
        "GraniteConfig",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.0625,
            "logits_scaling": 8.0,
        },
    ),
    "starcoder2": ("Starcoder2Config", _NO_IDS),
    "cohere": ("CohereConfig", _NO_IDS),
    "cohere2": ("Cohere2Config", {"sliding_window": 16, **_NO_IDS}),
    "llama4_text": (
        "Llama4TextConfig",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 128,
            "head_dim": 16,
            "interleave_moe_layer_step": 1,
            **_NO_IDS,
        },
    ),
    "mpt": ("MptConfig", {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2}),
    "gptj": ("GPTJConfig", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, **_NO_IDS}),
    "codegen": (
        "CodeGenConfig",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_ctx": 256, "rotary_dim": 8, **_NO_IDS},
    ),
    "bloom": ("BloomConfig", {"n_embed": 64, "n_layer": 2, "n_head": 4, **_NO_IDS}),
    "mamba": ("MambaConfig", {"state_size": 16, "expand": 2, **_NO_IDS}),
    "falcon_mamba": ("FalconMambaConfig", {"state_size": 16, "expand": 2, **_NO_IDS}),
    "mamba2": (
        "Mamba2Config",
        {"num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 1, "chunk_size": 16},
    ),
    "falcon_h1": (
        "FalconH1Config",
        {
            "mamba_d_ssm": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 16,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
            "head_dim": 16,
            **_NO_IDS,
        },
    ),
    "bamba": (
        "BambaConfig",
        {
            "mamba_n_heads": 4,
            "mamba_d_head": 32,
            "mamba_d_state": 16,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
            "attn_layer_indices": [1],
            **_NO_IDS,
        },
    ),
    "jamba": (
        "JambaConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "mamba_d_state": 16,
            "mamba_dt_rank": 8,
            **_NO_IDS,
        },
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 32,
            "mamba_d_state": 16,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
            "layer_types": ["mamba", "attention"],
            **_NO_IDS,
        },
    ),
    "nemotron_h": (
        "NemotronHConfig",
        {
            "hybrid_override_pattern": "M*",
            "mamba_num_heads": 4,
            "mamba_head_dim": 32,
            "ssm_state_size": 16,
            "n_groups": 1,
            "chunk_size": 16,
            "head_dim": 16,
            **_NO_IDS,
        },
    ),
    "zamba2": (
        "Zamba2Config",
        {
            "mamba_d_state": 16,
            "mamba_headdim": 16,
            "n_mamba_heads": 8,
            "mamba_ngroups": 1,
            "chunk_size": 16,
            "layers_block_type": ["mamba", "hybrid"],
            **_NO_IDS,
        },
    ),
}
MOE_FAMILIES = (
    "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text", "jamba",
    "granitemoehybrid",
)  # fmt: skip
# State-space hybrids and pure state-space models: a depthwise conv1d per mixer (kind conv)
SSM_FAMILIES = (
    "mamba", "falcon_mamba", "mamba2", "falcon_h1", "bamba", "jamba", "granitemoehybrid",
    "nemotron_h", "zamba2",
)  # fmt: skip


def family_model(family: str, massive_channel: int | None = 7) -> torch.nn.Module:
    """A tiny random model of `family` (fp32, eval), with one residual channel of the input
    embedding x50 (a planted massive activation) unless `massive_channel` is None."""
    import transformers

    name, fields = FAMILIES[family]
    config = getattr(transformers, name)(**{**_SMALL, **fields})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if massive_channel is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, massive_channel] *= 50
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(kind, **shape) -> a small random fp32 model: 'llama', 'qwen2', 'qwen3',
    'mistral', 'qk-norm' (qbench with Qwen3's q/k norms) or a qbench variant; shape overrides
    the sizes."""
    from qbench.checkpoints.catalog import variant_options
    from qbench.checkpoints.model import QBenchConfig, QBenchForCausalLM

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


# A planted super weight: W[PLANTED_ROW, PLANTED_COLUMN] of layer 0's down_proj, with its input
# channel made loud (gate and up rows x30), so that output channel PLANTED_ROW spikes (about
# 100, some 120x the median channel's largest |y|): a massive activation in the residual stream.
PLANTED_ROW, PLANTED_COLUMN = 7, 5
MASSIVE_TOKEN = 11  # a token id whose embedding carries one huge channel (an outlier token)


def planted_llama(super_weight: bool = True, massive_token: bool = False) -> torch.nn.Module:
    """The tiny random Llama (TINY_SHAPE, fp32, eval) with a planted super weight and/or a
    token (MASSIVE_TOKEN) whose residual stream is massive in channel 3 from the embedding on."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_SHAPE)).eval()
    with torch.no_grad():
        if super_weight:
            mlp = model.model.layers[0].mlp
            mlp.gate_proj.weight[PLANTED_COLUMN] *= 30
            mlp.up_proj.weight[PLANTED_COLUMN] *= 30
            mlp.down_proj.weight[PLANTED_ROW, PLANTED_COLUMN] = 2.0
        if massive_token:
            model.model.embed_tokens.weight[MASSIVE_TOKEN, 3] = 500.0
    return model
