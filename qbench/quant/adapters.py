"""Architecture adapters: which norm feeds which linears, where attention and MLP sit.

One `Architecture` per `config.model_type` names the modules; `decoder_view(model)` resolves
them into a `DecoderView` that smoothing and rotation are written against, once for all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from qbench.errors import QBenchError
from qbench.registry import Registry


@dataclass(frozen=True)
class Architecture:
    """Module paths of a pre-norm decoder, relative to the model or to one decoder layer.

    `*_readers` are the linears that read a norm's output; `norm_readers` are linears inside
    the norm module that read its scaled output (GatedNorm's gate). `optional` lists paths a
    variant may lack (absent or None). `value_rotatable(attention)`: whether the attention
    output may be rotated per head (false when something multiplies it channel by channel).
    """

    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attn_norm: str = "input_layernorm"
    attn_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention: str = "self_attn"
    value: str = "self_attn.v_proj"
    value_bias: str | None = None
    attn_out: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_readers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    norm_readers: tuple[str, ...] = ()
    optional: frozenset[str] = frozenset()
    value_rotatable: Callable[[nn.Module], bool] = lambda attention: True


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
        value_bias="self_attn.v_bias",
        norm_readers=("gate_down",),
        optional=frozenset(
            {"self_attn.gate", "self_attn.context_scale", "self_attn.v_bias", "gate_down"}
        ),
        # an elementwise output gate multiplies each channel of each head: no per-head rotation
        value_rotatable=lambda attention: (
            attention.gate is None or attention.gate.out_features == attention.n_heads
        ),
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
    value_bias: nn.Parameter | None
    attn_out: nn.Linear
    mlp_out: nn.Linear
    mlp_out_path: str
    value_rotatable: bool


@dataclass
class DecoderView:
    """The resolved modules of one model."""

    embed: nn.Embedding
    layers: list[LayerView]
    final: NormGroup
    head_dim: int


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
                value_bias=find(layer, arch.value_bias) if arch.value_bias else None,
                attn_out=find(layer, arch.attn_out),
                mlp_out=find(layer, arch.mlp_out),
                mlp_out_path=f"{arch.layers}.{i}.{arch.mlp_out}",
                value_rotatable=arch.value_rotatable(attention),
            )
        )
    final = group(model, arch.final_norm, ())
    final.readers = [model.get_output_embeddings()]
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderView(model.get_input_embeddings(), layers, final, head_dim)
