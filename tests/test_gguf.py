"""GGUF checkpoints: a tiny llama written with the gguf package's writer loads through qbench
with the logits of the model it was written from, is converted once and keyed by its sha256;
unreadable architectures and tensor types are plan-time errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SHAPE, write_recipe
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFWriter,
    TokenType,
    dequantize,
    quantize,
)
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qbench.checkpoints.gguf import dequantized_from, read_gguf
from qbench.checkpoints.load import checkpoint_identity, load_checkpoint
from qbench.cli import main
from qbench.errors import QBenchError
from qbench.plan import plan
from qbench.recipe import CheckpointSpec, load_recipe

Q8_0, Q8_1, F32 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_1, GGMLQuantizationType.F32
GGUF_NAMES = {  # transformers' llama names -> llama.cpp's, per block
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    config = model.config
    tensors = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    for i, block in enumerate(model.model.layers):
        for hf, name in GGUF_NAMES.items():
            tensors[f"blk.{i}.{name}.weight"] = block.get_submodule(hf).weight
    arrays = {name: t.detach().float().numpy() for name, t in tensors.items()}
    for i in range(config.num_hidden_layers):
        q, k = f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"
        arrays[q] = _permute(arrays[q], config.num_attention_heads)
        arrays[k] = _permute(arrays[k], config.num_key_value_heads)
    return arrays


def write_gguf(
    model: LlamaForCausalLM,
    tokenizer_dir: Path,
    path: Path,
    quantized: tuple[str, ...] = ("attn", "ffn"),
    architecture: str = "llama",
    blocks_of: tuple[str, GGMLQuantizationType] | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` (tied embeddings) and the tokenizer of `tokenizer_dir` as a GGUF file: the
    2-D tensors whose names contain one of `quantized` in Q8_0, the rest in F32; `blocks_of`
    (name, ggml type): that tensor as zero bytes of that type instead. Returns the weights as
    the file holds them, dequantized ({gguf name: array})."""
    config = model.config
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer = GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    kinds = [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens]
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[next(iter(special))])
    writer.add_eos_token_id(vocab[next(iter(special))])
    stored = {}
    for name, array in _gguf_tensors(model).items():
        if blocks_of is not None and name == blocks_of[0]:
            elements, size = GGML_QUANT_SIZES[blocks_of[1]]
            packed = np.zeros((array.shape[0], array.shape[1] // elements * size), np.uint8)
            writer.add_tensor(name, packed, raw_dtype=blocks_of[1])
        elif array.ndim == 2 and any(part in name for part in quantized):
            packed = quantize(array, Q8_0)
            writer.add_tensor(name, packed, raw_dtype=Q8_0)
            stored[name] = dequantize(packed, Q8_0)
        else:
            writer.add_tensor(name, array, raw_dtype=F32)
            stored[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="session")
def source_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_SHAPE | {"intermediate_size": 128, "tie_word_embeddings": True})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory, source_model, tokenizer_dir) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    return path, write_gguf(source_model, tokenizer_dir, path)


def _reference(source: LlamaForCausalLM, stored: dict[str, np.ndarray]) -> LlamaForCausalLM:
    """The source model with the weights the file holds (its Q8_0 tensors dequantized)."""
    reference = LlamaForCausalLM(source.config).eval()
    reference.load_state_dict(source.state_dict())
    with torch.no_grad():
        for i, block in enumerate(reference.model.layers):
            for hf, name in GGUF_NAMES.items():
                weight = stored[f"blk.{i}.{name}.weight"]
                if name in ("attn_q", "attn_k"):  # undo the file's permutation
                    heads = source.config.num_attention_heads
                    if name == "attn_k":
                        heads = source.config.num_key_value_heads
                    weight = _unpermute(weight, heads)
                block.get_submodule(hf).weight.copy_(torch.from_numpy(weight))
    return reference


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    dim = weight.shape[0] // heads // 2
    return weight.reshape(heads, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def test_gguf_checkpoint_has_the_logits_and_tokenizer_of_its_source(
    gguf_path, source_model, tokenizer_dir
):
    path, stored = gguf_path
    model, tokenizer = load_checkpoint(CheckpointSpec(name="g", gguf=str(path)))
    reference = _reference(source_model, stored)
    text = "The return statement leaves the current function call."
    expected = AutoTokenizer.from_pretrained(tokenizer_dir)(text).input_ids
    assert tokenizer(text).input_ids == expected  # the tokenizer comes from the file
    ids = torch.tensor([expected])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        plain = source_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-5)  # Q8_0 changed the weights: a real check
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gguf_identity_is_its_sha256_and_the_folder_is_converted_once(gguf_path, monkeypatch):
    import hashlib

    import qbench.checkpoints.gguf as gguf_module

    path, _ = gguf_path
    spec = CheckpointSpec(name="g", gguf=str(path))
    identity = checkpoint_identity(spec)
    assert identity.gguf == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity.gguf_types == {"Q8_0": 14, "F32": 6}  # 2 x 7 linears; norms and embedding
    assert dequantized_from(identity.gguf_types) == "Q8_0"
    load_checkpoint(spec)
    calls = []
    monkeypatch.setattr(gguf_module, "_convert", lambda *args: calls.append(args))
    load_checkpoint(spec)  # the cached folder: no second conversion
    assert calls == []
    (folder,) = (Path(p) for p in gguf_module.cache_dir().glob("checkpoints/gguf-*"))
    assert folder.name.startswith(f"gguf-{identity.gguf[:16]}-float32-")
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"] == identity.gguf


RECIPE = """
name: gguf-run
checkpoints:
  - {name: tiny, gguf: GGUF}
quantizers:
  - {name: w8a8, method: rtn, weights: {bits: 8}, activations: {bits: 8}}
eval:
  perplexity: [{data: embedded, seq_len: 32, max_windows: 2}]
"""


def test_recipe_with_a_gguf_checkpoint_says_what_its_weights_are(tmp_path, gguf_path):
    path, _ = gguf_path
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("GGUF", str(path)))
    results = tmp_path / "results"
    assert main(["run", str(recipe), "--results", str(results), "--no-progress"]) == 0
    records = [json.loads(p.read_text()) for p in (results / "gguf-run" / "runs").glob("*.json")]
    assert {r["status"] for r in records} == {"ok"}
    assert all(r["checkpoint"]["identity"]["gguf_types"]["Q8_0"] == 14 for r in records)
    board = (results / "gguf-run" / "LEADERBOARD.md").read_text()
    assert "dequantized from Q8_0" in board and "tiny.Q8_0.gguf" in board and "gguf 0." in board


def test_a_changed_gguf_file_is_refused_at_load(tmp_path, source_model, tokenizer_dir):
    from qbench.checkpoints.load import load_identified

    path = tmp_path / "changing.gguf"
    write_gguf(source_model, tokenizer_dir, path)
    spec = CheckpointSpec(name="g", gguf=str(path))
    identity = checkpoint_identity(spec)
    write_gguf(source_model, tokenizer_dir, path, quantized=("ffn",))
    with pytest.raises(QBenchError, match="changed since the plan"):
        load_identified(spec, identity)


def _one_error_line(capsys, recipe: Path) -> str:
    assert main(["run", str(recipe), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbench: error: ")
    return lines[0]


def test_unreadable_architecture_is_a_plan_time_error(
    tmp_path, source_model, tokenizer_dir, capsys
):
    path = tmp_path / "other.gguf"
    write_gguf(source_model, tokenizer_dir, path, architecture="rwkv6")
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("GGUF", str(path)))
    line = _one_error_line(capsys, recipe)
    assert "checkpoints[0].gguf" in line and str(path) in line and "'rwkv6'" in line


def test_unreadable_tensor_type_is_a_plan_time_error(tmp_path, source_model, tokenizer_dir, capsys):
    path = tmp_path / "q8_1.gguf"  # Q8_1: llama.cpp's type for activations; no dequantizer
    write_gguf(source_model, tokenizer_dir, path, blocks_of=("blk.0.ffn_up.weight", Q8_1))
    with pytest.raises(QBenchError, match="Q8_1"):
        read_gguf(path)
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.replace("GGUF", str(path)))
    line = _one_error_line(capsys, recipe)
    assert str(path) in line and "ggml type Q8_1" in line and "blk.0.ffn_up.weight" in line


def test_gguf_fields_are_checked():
    with pytest.raises(ValueError, match="gguf_file: applies to hf"):
        CheckpointSpec(name="x", path="p", gguf_file="m.gguf")
    with pytest.raises(ValueError, match=r"not a \.gguf file name"):
        CheckpointSpec(name="x", hf="a/b", gguf_file="../m.gguf")
    with pytest.raises(ValueError, match="exactly one of hf:, path:, gguf:"):
        CheckpointSpec(name="x", path="p", gguf="m.gguf")


def test_hub_gguf_file_resolves_in_the_offline_cache(tmp_path, monkeypatch, gguf_path):
    """`hf:` with `gguf_file:` offline: the hub cache's snapshot at the ref's commit."""
    path, _ = gguf_path
    commit = "0" * 39 + "1"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tiny.Q8_0.gguf").write_bytes(path.read_bytes())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        RECIPE.replace("gguf: GGUF", "hf: org/tiny, gguf_file: tiny.Q8_0.gguf"),
    )
    (cell, *_) = plan(load_recipe(recipe), recipe)
    assert cell.identity.commit == commit and cell.identity.gguf_types["Q8_0"] == 14
    model, _ = load_checkpoint(cell.checkpoint, commit=commit)
    assert model.config.num_hidden_layers == 2


def test_probe_reads_a_gguf_file(tmp_path, gguf_path, capsys):
    path, _ = gguf_path
    out = tmp_path / "probe.json"
    args = ["probe", "--path", str(path), "--samples", "2", "--seq-len", "32", "--out", str(out)]
    assert main([*args, "--quantizer", "none", "--windows", "document"]) == 0
    data = json.loads(out.read_text())
    assert data["checkpoint"]["gguf"] == str(path) and data["probe"]["windows"] == "document"
    assert "(windows from document starts)" in capsys.readouterr().out
