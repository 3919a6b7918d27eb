"""QuaRot-style rotation, then RTN: outliers spread by orthogonal transforms, lossless in float.

1. Fold every RMSNorm's weight into the linears reading it (the norm becomes weight 1).
2. Rotate the residual stream by a random Hadamard Q: embeddings E Q, readers W Q (q/k/v and
   gate/context-scale linears, gate/up, lm_head), writers Q^T W (o_proj, down_proj).
   RMSNorm without weight commutes with Q, so the logits do not change.
3. Online Hadamard before down_proj: x -> x (A (x) B) at run time, down_proj's weight W (A (x) B).
4. Per-head Hadamard H on the value path: v_proj rows and v_bias per head H^T, o_proj columns
   per head H; skipped when an elementwise output gate multiplies the heads channel by channel.

A norm with more than a weight (PreAffine's pre_scale, GatedNorm's gate) acts on the residual
stream channel by channel in a way no rotation commutes with; such models raise QBenchError.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.errors import QBenchError
from qbench.quant.adapters import DecoderView, NormGroup, decoder_view
from qbench.quant.hadamard import hadamard_factors, kronecker_apply, random_hadamard
from qbench.quant.method import METHODS, replace_module
from qbench.quant.rtn import RTNConfig


class HadamardInput(nn.Module):
    """Rotates its input by A (x) B, then applies `linear` (whose weight is rotated to match)."""

    def __init__(self, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("a", a.to(linear.weight.dtype))
        self.register_buffer("b", b.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(kronecker_apply(x, self.a, self.b))


@METHODS.register("rotation")
class RotationConfig(RTNConfig):
    """QuaRot's rotations (random Hadamard, online Hadamard before down_proj), then RTN."""

    method: Literal["rotation"] = "rotation"

    def transform(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        rotate(model)


@torch.no_grad()
def rotate(model: nn.Module) -> None:
    """Apply QuaRot's float-equivalent rotations to `model` in place (torch's global RNG)."""
    view = decoder_view(model)
    _check_rotatable(model, view)
    _untie_lm_head(model)
    groups = [g for layer in view.layers for g in (layer.attn, layer.mlp)] + [view.final]
    for group in groups:
        _fold_norm(group)
    q = random_hadamard(view.embed.weight.shape[1])
    _set(view.embed, view.embed.weight.double() @ q)
    for group in groups:
        for reader in group.readers:
            _set(reader, reader.weight.double() @ q)
    for layer in view.layers:
        for writer in (layer.attn_out, layer.mlp_out):
            _set(writer, q.T @ writer.weight.double())
            if writer.bias is not None:
                _set_tensor(writer.bias, writer.bias.double() @ q)
        a, b = hadamard_factors(layer.mlp_out.in_features)
        _set(layer.mlp_out, layer.mlp_out.weight.double() @ torch.kron(a, b))
        replace_module(model, layer.mlp_out_path, HadamardInput(layer.mlp_out, a, b))
        if layer.value_rotatable:
            _rotate_value_heads(layer.value, layer.value_bias, layer.attn_out, view.head_dim)


def _check_rotatable(model: nn.Module, view: DecoderView) -> None:
    norms = [g.norm for layer in view.layers for g in (layer.attn, layer.mlp)] + [view.final.norm]
    for norm in norms:
        extra = sorted(n for n, _ in norm.named_parameters() if n != "weight")
        if extra:
            raise QBenchError(
                f"rotation is not lossless for {model.config.model_type} norms with "
                f"{', '.join(extra)} (PreAffine / GatedNorm act channel by channel on the "
                "residual stream); use smoothquant, gptq or rtn for this checkpoint"
            )


def _untie_lm_head(model: nn.Module) -> None:
    """lm_head gets its own weight: it takes the final norm's scale, the embeddings do not."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def _fold_norm(group: NormGroup) -> None:
    scale = group.norm.weight.double()
    for reader in group.readers:
        _set(reader, reader.weight.double() * scale)
    _set_tensor(group.norm.weight, torch.ones_like(scale))


def _rotate_value_heads(
    value: nn.Linear, value_bias: nn.Parameter | None, out: nn.Linear, head_dim: int
) -> None:
    h = torch.kron(*hadamard_factors(head_dim))
    rows = value.weight.double().reshape(-1, head_dim, value.in_features)
    _set(value, (h.T @ rows).reshape(value.weight.shape))
    for bias in (value.bias, value_bias):
        if bias is not None:
            _set_tensor(bias, (bias.double().reshape(-1, head_dim) @ h).reshape(bias.shape))
    columns = out.weight.double().reshape(out.out_features, -1, head_dim)
    _set(out, (columns @ h).reshape(out.weight.shape))


def _set(module: nn.Module, weight: torch.Tensor) -> None:
    _set_tensor(module.weight, weight)


def _set_tensor(target: torch.Tensor, value: torch.Tensor) -> None:
    target.copy_(value.to(target.dtype))
