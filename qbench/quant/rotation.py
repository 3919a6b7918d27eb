"""QuaRot-style rotation, then RTN: outliers spread by orthogonal transforms, lossless in float.

1. Fold every norm's weight into the linears reading it (the norm's weight becomes 1).
2. Rotate the residual stream by a random Hadamard Q: embeddings E Q, readers W Q (q/k/v and
   gate/context-scale linears, gate/up, lm_head, GatedNorm's gate_down), writers Q^T W
   (o_proj, down_proj). RMS normalization commutes with Q. A norm with more than a weight
   (PreAffine's pre_scale, GatedNorm's gate) takes Q through the architecture adapter's
   `norm_rotation` hook and takes its channel-wise products in the original basis,
   ((x Q^T) * v) Q, by two online Hadamard transforms; so the logits do not change.
3. Online Hadamard before down_proj: x -> x H at run time, down_proj's weight W H.
4. Per-head Hadamard H on the value path: v_proj rows and v_bias per head H^T, o_proj columns
   per head H; skipped when an elementwise output gate multiplies the heads channel by channel.
5. With a quantized KV cache (`rotate_qk`): per-head Hadamard of queries and keys after RoPE,
   online (QK^T is unchanged), so the keys are rounded in the rotated basis; a learned key slot
   (attn-bias) is rotated alike.

Online transforms use the fast Walsh-Hadamard transform for the power-of-two factor
(qbench/quant/hadamard.py, which also says which matrix each width gets).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from qbench.errors import QBenchError
from qbench.quant.adapters import DecoderView, NormGroup, decoder_view, head_dim
from qbench.quant.hadamard import HadamardTransform, hadamard_construction, hadamard_versions
from qbench.quant.kvcache import kv_transforms
from qbench.quant.method import METHODS, replace_module, untie_word_embeddings
from qbench.quant.rtn import RTNConfig


class HadamardInput(nn.Module):
    """Rotates its input by `hadamard`, then applies `linear` (whose weight is rotated to match)."""

    def __init__(self, linear: nn.Linear, hadamard: HadamardTransform) -> None:
        super().__init__()
        self.linear = linear
        self.hadamard = hadamard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.hadamard(x))


@METHODS.register("rotation")
class RotationConfig(RTNConfig):
    """QuaRot's rotations (random Hadamard, online Hadamard before down_proj), then RTN."""

    method: Literal["rotation"] = "rotation"

    def versions(self) -> dict[str, str]:
        return hadamard_versions()

    def transform(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        rotate(model, rotate_qk=self.kv is not None)


@torch.no_grad()
def rotate(model: nn.Module, rotate_qk: bool = False) -> None:
    """Apply QuaRot's float-equivalent rotations to `model` in place (torch's global RNG).

    rotate_qk: also rotate queries and keys per head after RoPE (for a quantized KV cache).
    """
    view = decoder_view(model)
    untie_word_embeddings(model)  # lm_head takes the final norm's scale, the embedding does not
    for group in view.norms:
        _fold_norm(group)
    stream = HadamardTransform(view.embed.weight.shape[1], random_signs=True)
    stream.to(view.embed.weight.device)
    _rotate_norms(model, view, stream)
    q = stream.matrix()
    _right(view.embed.weight, q)
    for group in view.norms:
        for reader in [*group.readers, *group.inner_readers]:
            _right(reader.weight, q)
    for layer in view.layers:
        for writer in (layer.attn_out, layer.mlp_out):
            _left(writer.weight, q.T)
            if writer.bias is not None:
                _right(writer.bias, q)
        online = HadamardTransform(layer.mlp_out.in_features).to(layer.mlp_out.weight.device)
        _right(layer.mlp_out.weight, online.matrix())
        replace_module(model, layer.mlp_out_path, HadamardInput(layer.mlp_out, online))
        if layer.value_rotatable:
            _rotate_value_heads(layer.value, layer.value_bias, layer.attn_out, view.head_dim)
    if rotate_qk:
        for layer, kv in zip(view.layers, kv_transforms(model), strict=True):
            kv.qk_rotation = HadamardTransform(view.head_dim).to(layer.value.weight.device)
            if layer.key_bias is not None:  # a learned key slot meets the rotated queries
                _right(layer.key_bias, kv.qk_rotation.matrix())


def rotation_constructions(config: PretrainedConfig) -> dict[str, dict[str, int | str]]:
    """The Hadamard matrix each rotated width of a model gets (for records): the residual
    stream (hidden_size), down_proj's input (intermediate_size) and the heads (head_dim),
    e.g. {"mlp": {"width": 11008, "matrix": "sylvester(64) x compressed-tensors(172)"}}."""
    widths = {
        "residual": config.hidden_size,
        "mlp": config.intermediate_size,
        "head": head_dim(config),
    }
    return {role: {"width": n, "matrix": hadamard_construction(n)} for role, n in widths.items()}


def _rotate_norms(model: nn.Module, view: DecoderView, stream: HadamardTransform) -> None:
    """Hand the stream's rotation to norms with more than a weight, through the adapter."""
    hook = view.architecture.norm_rotation
    for group in view.norms:
        extra = sorted(n for n, _ in group.norm.named_parameters() if n != "weight")
        if extra and hook is None:
            raise QBenchError(
                f"rotation is not lossless for {model.config.model_type} norms with "
                f"{', '.join(extra)}: its architecture adapter has no norm_rotation hook; "
                "use smoothquant, gptq or rtn for this checkpoint"
            )
        if extra:
            setattr(group.norm, hook, stream)


def _fold_norm(group: NormGroup) -> None:
    scale = group.norm.weight.double()
    for reader in [*group.readers, *group.inner_readers]:
        _set_tensor(reader.weight, reader.weight.double() * scale.to(reader.weight.device))
    _set_tensor(group.norm.weight, torch.ones_like(scale))


def _rotate_value_heads(
    value: nn.Linear, value_bias: nn.Parameter | None, out: nn.Linear, head_dim: int
) -> None:
    """v_proj rows per head H^T (so v -> v H), value biases alike, o_proj columns per head H."""
    h = HadamardTransform(head_dim).matrix().to(value.weight.device)
    rows = value.weight.double().reshape(-1, head_dim, value.in_features)
    _set_tensor(value.weight, (h.T @ rows).reshape(value.weight.shape))
    for bias in (value.bias, value_bias):
        if bias is not None:
            _set_tensor(bias, (bias.double().reshape(-1, head_dim) @ h).reshape(bias.shape))
    columns = out.weight.double().reshape(out.out_features, -1, head_dim)
    _set_tensor(out.weight, (columns @ h.to(out.weight.device)).reshape(out.weight.shape))


def _right(target: torch.Tensor, m: torch.Tensor) -> None:
    """target <- target @ m, in float64 on target's device."""
    _set_tensor(target, target.double() @ m.to(target.device))


def _left(target: torch.Tensor, m: torch.Tensor) -> None:
    """target <- m @ target, in float64 on target's device."""
    _set_tensor(target, m.to(target.device) @ target.double())


def _set_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    target.copy_(value.to(target.dtype))
