"""Architecture adapters: which norm feeds which linears, where attention and MLP sit.

One `Architecture` per `config.model_type` names the modules; `decoder_view(model)` resolves
them into a `DecoderView` that smoothing and rotation are written against, once for all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from qbench.errors import QBenchError
from qbench.registry import Registry


@dataclass(frozen=True)
class Architecture:
    """Module paths of a pre-norm decoder, relative to the model or to one decoder layer.

    `*_readers` are the linears that read a norm's output; `norm_readers` are linears inside
    the norm module that read its scaled output (GatedNorm's gate). `optional` lists paths a
    variant may lack (absent or None). `value_rotatable(attention)`: whether the attention
    output may be rotated per head (false when something multiplies it channel by channel).
    `key_bias` / `value_bias`: learned key/value slots of the attention (float parameters).
    `norm_rotation`: the attribute through which a norm with more than a weight (PreAffine,
    GatedNorm) takes the residual stream's rotation and then computes its channel-wise
    products in the original basis; None where norms are a weight only.
    `attention_interface`: whether attention runs through transformers' AttentionInterface
    (qbench's KV step is then a registered attention implementation); otherwise the attention
    module calls its own `kv_transform` after RoPE.
    """

    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attn_norm: str = "input_layernorm"
    attn_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention: str = "self_attn"
    value: str = "self_attn.v_proj"
    key_bias: str | None = None
    value_bias: str | None = None
    attn_out: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_readers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    norm_readers: tuple[str, ...] = ()
    optional: frozenset[str] = frozenset()
    value_rotatable: Callable[[nn.Module], bool] = lambda attention: True
    norm_rotation: str | None = None
    attention_interface: bool = True


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
for _name in ("llama", "mistral", "qwen2", "qwen3"):
    ARCHITECTURES.register(_name)(Architecture())
ARCHITECTURES.register("qbench")(
    Architecture(
        attn_readers=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.gate",
            "self_attn.context_scale",
        ),
        key_bias="self_attn.k_bias",
        value_bias="self_attn.v_bias",
        norm_readers=("gate_down",),
        optional=frozenset(
            {
                "self_attn.gate",
                "self_attn.context_scale",
                "self_attn.k_bias",
                "self_attn.v_bias",
                "gate_down",
            }
        ),
        # an elementwise output gate multiplies each channel of each head: no per-head rotation
        value_rotatable=lambda attention: (
            attention.gate is None or attention.gate.out_features == attention.n_heads
        ),
        norm_rotation="stream_rotation",
        attention_interface=False,
    )
)


@dataclass
class NormGroup:
    """A norm, the linears reading its output, and linears inside it reading its scaled output."""

    norm: nn.Module
    readers: list[nn.Linear]
    inner_readers: list[nn.Linear]


@dataclass
class LayerView:
    attn: NormGroup
    mlp: NormGroup
    attention: nn.Module
    value: nn.Linear
    key_bias: nn.Parameter | None
    value_bias: nn.Parameter | None
    attn_out: nn.Linear
    mlp_out: nn.Linear
    mlp_out_path: str
    value_rotatable: bool


@dataclass
class DecoderView:
    """The resolved modules of one model."""

    architecture: Architecture
    embed: nn.Embedding
    layers: list[LayerView]
    final: NormGroup
    head_dim: int

    @property
    def norms(self) -> list[NormGroup]:
        """Every norm on the residual stream with its readers, in order, the final one last."""
        return [g for layer in self.layers for g in (layer.attn, layer.mlp)] + [self.final]


def head_dim(config: PretrainedConfig) -> int:
    """The attention head width of a model config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def architecture(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    try:
        return ARCHITECTURES.get(model_type)
    except KeyError as error:
        raise QBenchError(f"no architecture adapter: {error.args[0]}") from None


def decoder_view(model: nn.Module) -> DecoderView:
    """Resolve `model`'s architecture into modules; QBenchError if it has no adapter."""
    arch = architecture(model)

    def find(root: nn.Module, path: str) -> nn.Module | None:
        module: object = root
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is None and path not in arch.optional:
            raise QBenchError(f"{model.config.model_type} model has no module '{path}'")
        return module

    def group(root: nn.Module, norm: str, readers: tuple[str, ...]) -> NormGroup:
        norm_module = find(root, norm)
        inner = [find(norm_module, p) for p in arch.norm_readers]
        linears = [find(root, p) for p in readers]
        return NormGroup(
            norm_module, [m for m in linears if m is not None], [m for m in inner if m]
        )

    layers = []
    for i, layer in enumerate(find(model, arch.layers)):
        attention = find(layer, arch.attention)
        layers.append(
            LayerView(
                attn=group(layer, arch.attn_norm, arch.attn_readers),
                mlp=group(layer, arch.mlp_norm, arch.mlp_readers),
                attention=attention,
                value=find(layer, arch.value),
                key_bias=find(layer, arch.key_bias) if arch.key_bias else None,
                value_bias=find(layer, arch.value_bias) if arch.value_bias else None,
                attn_out=find(layer, arch.attn_out),
                mlp_out=find(layer, arch.mlp_out),
                mlp_out_path=f"{arch.layers}.{i}.{arch.mlp_out}",
                value_rotatable=arch.value_rotatable(attention),
            )
        )
    final = group(model, arch.final_norm, ())
    final.readers = [model.get_output_embeddings()]
    return DecoderView(arch, model.get_input_embeddings(), layers, final, head_dim(model.config))
