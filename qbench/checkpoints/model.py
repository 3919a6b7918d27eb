"""The qbench model family: a Llama-style decoder with attention and norm variants.

Plain torch (RoPE, RMSNorm, SwiGLU MLP, GQA), saved and loaded through transformers'
`save_pretrained` / `from_pretrained` without trust_remote_code: importing this module
registers `model_type="qbench"` with AutoConfig and AutoModelForCausalLM.

Module names are exactly Llama's, so Llama tooling (quantizers, norm->linear maps) works:

    model.embed_tokens
    model.layers[i].input_layernorm                 (.weight as in Llama)
    model.layers[i].self_attn.{q,k,v,o}_proj        (nn.Linear, no bias)
    model.layers[i].post_attention_layernorm
    model.layers[i].mlp.{gate,up,down}_proj
    model.norm
    lm_head                                         (tied to embed_tokens if configured)

With every option off the logits equal `LlamaForCausalLM`'s for the same state_dict.
Variant options (independent, combinable) and the extra modules they add, where X is
the normed input of the attention block (the input of q_proj):

    attn_output_gate     "headwise" | "elementwise": Y <- Y * sigmoid(X W_g) on the attention
                         output, per head before o_proj (Qiu et al. 2025, G1).
                         self_attn.gate: Linear(hidden -> n_heads [* head_dim]).
    attn_kv_bias         Learnable key/value slot k', v' per KV head prepended to keys and
                         values, visible to every query, no RoPE (Sun et al. 2024).
                         self_attn.k_bias, self_attn.v_bias: Parameter [n_kv_heads, head_dim].
                         Returned attention maps then have k+1 columns; column 0 is the slot.
    attn_context_scaling Y <- 2 * sigmoid(X W_c) * Y, one scalar per head and token
                         (context-aware scaling, "Systematic Outliers").
                         self_attn.context_scale: Linear(hidden -> n_heads).
    attn_softmax         "off_by_one": e^x_i / (1 + sum_j e^x_j);
                         "softpick": relu(e^x_i - 1) / (sum_j |e^x_j - 1| + eps).
    norm                 "preaffine": RMSNorm(lambda * x), <norm>.pre_scale = lambda [hidden];
                         "gatednorm": y <- sigmoid(W_up swish(W_down y)) * y after the RMSNorm,
                         <norm>.gate_down: Linear(hidden -> rank), <norm>.gate_up: Linear(rank ->
                         hidden). <norm> is every input_layernorm, post_attention_layernorm and
                         model.norm; their `.weight` stays where Llama has it.
    qk_norm              Qwen3's per-head RMSNorm of q and k before RoPE:
                         self_attn.q_norm, self_attn.k_norm (weight [head_dim]).

New parameters start neutral or as a constant factor, so training starts stable: gate
weights zero (every gate is sigmoid(0) = 0.5; the authors' gate, fused into q_proj, starts
near that with q_proj's small random init), context_scale zero (S_c = 1), k'/v' zero (a
zero-logit, zero-value slot: with standard softmax that is off-by-one softmax), pre_scale
ones, gate_up zero (each GatedNorm halves its output; gate_down is random, so W_up learns).

forward() takes an optional 2-D padding mask; positions then count real tokens only, so a
left-padded row gives the logits of the unpadded sequence. There is no KV cache: generate()
recomputes the whole prefix at every step.

Two hooks for qbench.quant, None unless a quantizer sets them:
- `self_attn.kv_transform(q, k, v) -> (q, k, v)` after RoPE, before the attn-bias slot is
  prepended and KV heads repeated: KV-cache rounding and QuaRot's per-head Q/K rotation;
- `<norm>.stream_rotation`: the residual stream arrives rotated by an orthogonal Q (QuaRot,
  with the norm's weight folded into its readers); the norm then takes its channel-wise products
  (pre_scale, the GatedNorm gate) in the original basis, ((x Q^T) * v) Q, and computes the
  same function in the rotated basis; RMS normalization commutes with Q.
"""

import dataclasses
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from qbench.checkpoints.catalog import VARIANTS

GateKind = Literal["none", "headwise", "elementwise"]
SoftmaxKind = Literal["standard", "off_by_one", "softpick"]
NormKind = Literal["rmsnorm", "preaffine", "gatednorm"]

SOFTPICK_EPS = 1e-8

# Config fields that select the architecture variant.
_OPTIONS = (
    "attn_output_gate",
    "attn_kv_bias",
    "attn_context_scaling",
    "attn_softmax",
    "norm",
    "qk_norm",
)


class QBenchConfig(PretrainedConfig):
    """Hyper-parameters of the family (Llama's names) plus the variant options."""

    model_type = "qbench"

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Variant options (see the module docstring).
    attn_output_gate: GateKind = "none"
    attn_kv_bias: bool = False
    attn_context_scaling: bool = False
    attn_softmax: SoftmaxKind = "standard"
    norm: NormKind = "rmsnorm"
    gatednorm_rank: int = 16
    qk_norm: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for option, kind in [
            ("attn_output_gate", GateKind),
            ("attn_softmax", SoftmaxKind),
            ("norm", NormKind),
        ]:
            if getattr(self, option) not in get_args(kind):
                raise ValueError(
                    f"{option}={getattr(self, option)!r} is not one of {get_args(kind)}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.gatednorm_rank < 1:
            raise ValueError(f"gatednorm_rank={self.gatednorm_rank} must be >= 1")
        super().__post_init__(**kwargs)

    def variant_name(self) -> str | None:
        """The VARIANTS name whose options this config has (all others at defaults), if any."""
        defaults = {f.name: f.default for f in dataclasses.fields(QBenchConfig)}
        for name, options in VARIANTS.items():
            if all(getattr(self, o) == options.get(o, defaults[o]) for o in _OPTIONS):
                return name
        return None


def zero_init_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free Linear that `_init_weights` starts at zero (a neutral gate or scale)."""
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.zero_init = True
    return linear


class QBenchRMSNorm(nn.Module):
    """RMSNorm in fp32 like Llama's, optionally PreAffine (pre_scale) or GatedNorm (gate_*)."""

    def __init__(self, dim: int, eps: float, kind: NormKind = "rmsnorm", rank: int = 16):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.pre_scale = nn.Parameter(torch.ones(dim)) if kind == "preaffine" else None
        self.gate_down = nn.Linear(dim, rank, bias=False) if kind == "gatednorm" else None
        self.gate_up = zero_init_linear(rank, dim) if kind == "gatednorm" else None
        self.stream_rotation: nn.Module | None = None  # see the module docstring

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_scale is not None:
            x = self._channel_scale(x, self.pre_scale)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * h.to(x.dtype)
        if self.gate_down is not None and self.gate_up is not None:
            y = self._channel_scale(y, torch.sigmoid(self.gate_up(F.silu(self.gate_down(y)))))
        return y

    def _channel_scale(self, x: Tensor, scale: Tensor) -> Tensor:
        """x * scale channel by channel, in the original basis if the stream is rotated."""
        if self.stream_rotation is None:
            return x * scale
        return self.stream_rotation(self.stream_rotation.inverse(x) * scale)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [b, 1, t, head_dim] for positions [b, t], in fp32 like Llama's."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., seq, head_dim] by the RoPE angles (Llama's rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_probs(scores: Tensor, keep: Tensor, kind: SoftmaxKind) -> Tensor:
    """Attention probabilities from logits [..., q, k]; positions where `keep` is False get 0.

    Fully masked rows give uniform weights (standard) or zeros (the other two), never NaN.
    """
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    if kind == "standard":
        return scores.softmax(dim=-1)
    if kind == "off_by_one":
        # softmax_1: append a zero logit (the "1" in the denominator), softmax, drop it.
        zero = scores.new_zeros(*scores.shape[:-1], 1)
        return torch.cat((scores, zero), dim=-1).softmax(dim=-1)[..., :-1]
    # softpick: numerator and denominator are multiplied by e^-m, m = max(0, max_j x_j),
    # so every exponential is <= 1; eps is scaled alike, so this is the exact formula.
    m = scores.amax(dim=-1, keepdim=True).clamp_min(0)
    shifted = (torch.exp(scores - m) - torch.exp(-m)).masked_fill(~keep, 0)
    denominator = shifted.abs().sum(dim=-1, keepdim=True) + SOFTPICK_EPS * torch.exp(-m)
    return F.relu(shifted) / denominator


def causal_keep_mask(seq_len: int, device: torch.device) -> Tensor:
    """Boolean [1, 1, q, k] mask, True where query i may attend key j (j <= i)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[b, kv_heads, t, d] -> [b, kv_heads * n_rep, t, d] (each KV head serves n_rep heads)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class QBenchAttention(nn.Module):
    """Causal GQA self-attention with RoPE and the attention variants of the config."""

    def __init__(self, config: QBenchConfig):
        super().__init__()
        hidden, self.head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.softmax_kind = config.attn_softmax
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)

        eps = config.rms_norm_eps
        self.q_norm = QBenchRMSNorm(self.head_dim, eps) if config.qk_norm else None
        self.k_norm = QBenchRMSNorm(self.head_dim, eps) if config.qk_norm else None
        gate_dim = {"none": 0, "headwise": 1, "elementwise": self.head_dim}
        gate_out = self.n_heads * gate_dim[config.attn_output_gate]
        self.gate = zero_init_linear(hidden, gate_out) if gate_out else None
        self.context_scale = (
            zero_init_linear(hidden, self.n_heads) if config.attn_context_scaling else None
        )
        kv_shape = (self.n_kv_heads, self.head_dim)
        self.k_bias = nn.Parameter(torch.zeros(kv_shape)) if config.attn_kv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(kv_shape)) if config.attn_kv_bias else None
        self.kv_transform: nn.Module | None = None  # see the module docstring

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Return (output [b, t, hidden], probabilities [b, heads, t, (1+) t] if asked).

        attention_mask: boolean keep mask [b|1, 1, t, t] (causal included); None = causal.
        """
        x = hidden_states
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if self.kv_transform is not None:  # KV-cache rounding, Q/K rotation (qbench.quant)
            q, k, v = self.kv_transform(q, k, v)

        keep = attention_mask
        if self.k_bias is not None and self.v_bias is not None:
            # The bias slot goes first (key index 0), unrotated and never masked.
            k = torch.cat((self.k_bias.to(k.dtype)[None, :, None].expand(b, -1, 1, -1), k), 2)
            v = torch.cat((self.v_bias.to(v.dtype)[None, :, None].expand(b, -1, 1, -1), v), 2)
            keep = causal_keep_mask(t, x.device) if keep is None else keep
            keep = torch.cat((keep.new_ones(*keep.shape[:-1], 1), keep), dim=-1)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)

        probs = None
        if self.softmax_kind == "standard" and not output_attentions:
            if keep is None:  # fast path: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
            else:  # additive mask with a finite minimum so fully masked rows stay finite
                neg = torch.finfo(q.dtype).min
                bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill(~keep, neg)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        else:
            keep = causal_keep_mask(t, x.device) if keep is None else keep
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            probs = attention_probs(scores.float(), keep, self.softmax_kind).to(q.dtype)
            y = torch.matmul(probs, v)

        y = y.transpose(1, 2)  # [b, t, heads, head_dim]
        if self.context_scale is not None:
            y = y * (2 * torch.sigmoid(self.context_scale(x)))[..., None]
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).view(b, t, self.n_heads, -1)
        return self.o_proj(y.reshape(b, t, -1)), probs if output_attentions else None


class QBenchMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: QBenchConfig):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(config: QBenchConfig) -> QBenchRMSNorm:
    return QBenchRMSNorm(
        config.hidden_size, config.rms_norm_eps, config.norm, config.gatednorm_rank
    )


class QBenchDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: QBenchConfig):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = QBenchAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = QBenchMLP(config)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        """Return the block output (a tensor, as Llama's layers in transformers 5).

        If `attentions` is a list, this layer's attention probabilities are appended to it.
        """
        a, probs = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            output_attentions=attentions is not None,
        )
        if attentions is not None and probs is not None:
            attentions.append(probs)
        h = hidden_states + a
        return h + self.mlp(self.post_attention_layernorm(h))


class QBenchModel(nn.Module):
    """Embeddings, decoder layers and final norm (the `model.` part of the state dict)."""

    def __init__(self, config: QBenchConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            QBenchDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = _norm(config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPast:
        """attention_mask: optional [b, t] padding mask, 1 = real token, 0 = padding."""
        h = self.embed_tokens(input_ids)
        t = input_ids.shape[1]
        keep = None
        positions = torch.arange(t, device=h.device)[None]
        if attention_mask is not None:
            keep = causal_keep_mask(t, h.device) & attention_mask.bool()[:, None, None, :]
            # Count positions from each row's first real token (as generate() does for Llama),
            # so left padding changes nothing; RoPE alone would not care, the kv-bias slot does.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        hidden_states = [h]
        attentions: list[Tensor] | None = [] if output_attentions else None
        for layer in self.layers:
            h = layer(h, rope, keep, attentions)
            hidden_states.append(h)
        h = self.norm(h)
        hidden_states[-1] = h  # like Llama: the last hidden state is taken after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )


class QBenchForCausalLM(PreTrainedModel, GenerationMixin):
    """The family's causal LM; no KV cache (generate() recomputes the prefix each step)."""

    config_class = QBenchConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["QBenchDecoderLayer"]
    # transformers 5 format: target -> source; applied only if config.tie_word_embeddings.
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QBenchConfig):
        super().__init__(config)
        self.model = QBenchModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Called per module by post_init() and for tensors missing from a checkpoint;
        # `init.*` leaves loaded tensors alone. Initial values: see the module docstring.
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, QBenchRMSNorm):
            for scale in (module.weight, module.pre_scale):
                if scale is not None:
                    init.ones_(scale)
        elif isinstance(module, QBenchAttention):
            for bias in (module.k_bias, module.v_bias):
                if bias is not None:
                    init.zeros_(bias)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """Logits [b, t, vocab]; loss = next-token cross-entropy over labels != -100.

        hidden_states: embeddings + one per layer (the last after the final norm);
        attentions: per layer [b, heads, t, t] (t + 1 columns with attn_kv_bias, slot first).
        Other kwargs (use_cache, past_key_values, ...) are accepted and ignored.
        """
        out = self.model(input_ids, attention_mask, output_attentions, output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """No cache: every generation step feeds the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def register() -> None:
    """Register model_type "qbench" with AutoConfig / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(QBenchConfig.model_type, QBenchConfig, exist_ok=True)
    AutoModelForCausalLM.register(QBenchConfig, QBenchForCausalLM, exist_ok=True)


register()
