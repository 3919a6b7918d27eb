"""QuaRot-style rotation: outliers spread by orthogonal transforms, lossless in float (its
step: qbench.quant.steps.rotation).

Written once against the residual-stream structure that `qbench.quant.structure` reads off the
model (which norm feeds which targets, what writes the stream), so every decoder it understands
takes it: Llama-likes, Gemma's 1 + w norms and sandwich norms, OLMo 2's post-norms, LayerNorm
models (OPT, GPT-2, Pythia, Phi-2, Falcon, StableLM, Starcoder2), parallel residuals, MoE blocks
(experts, shared experts, routers) and MLA attention. Steps, as QuaRot (Ashkboos et al. 2024)
and SliceGPT (Ashkboos et al. 2024, for LayerNorm) describe them:

1. Mean folding, for norms that subtract the mean (LayerNorm): make every vector of the residual
   stream zero-mean by centering what writes it, each embedding row and each writer's output
   (W <- W - 1 mean_out(W), b <- b - mean(b), SliceGPT's `bake_mean_into_linear`). A LayerNorm
   then computes what an RMSNorm computes, and is replaced by one (`StreamRMSNorm`, the same
   eps), which commutes with a rotation. Not possible when a post-norm writes the stream (its
   output is not zero-mean): then rotation is refused.
2. Fold every residual norm's scale (w, or Gemma's 1 + w) and bias into the targets reading it:
   W <- W diag(scale), b_reader <- b_reader + W b_norm; the norm keeps scale 1 and no bias.
3. Rotate the residual stream by a random Hadamard Q: embeddings E Q, readers W Q (linears,
   routers, experts' gate/up slices, lm_head), writers Q^T W and their biases b Q. A norm with
   more than a weight (the qbench family's PreAffine, GatedNorm) takes Q through its
   `stream_rotation` attribute and applies its channel-wise products in the original basis. A
   post-norm on a writer's output (Gemma 2/3, OLMo 2) keeps the original basis inside, and its
   output is rotated online (x -> x Q, `RotatedOutput`).
4. Online Hadamard H before every linear whose output goes to the stream (o_proj, down_proj,
   each expert's down slice): x -> x H at run time (fast Walsh-Hadamard transform), W <- W H.
   QuaRot's per-head value rotation plus its online head mixing equal this H for power-of-two
   widths; here it is one online transform, so fused and MLA attention need nothing special.
5. With a quantized KV cache (`rotate_qk`): per-head Hadamard of queries and keys after RoPE,
   online, in the KV step (QK^T unchanged); a learned key slot (attn-bias) is rotated alike.

`rotate` checks its own result: the logits of a few tokens before and after must agree within
`LOSSLESS_TOLERANCE` (relative L2), else it raises QBenchError naming the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qbench.errors import QBenchError, RefusedError
from qbench.quant.formats.hadamard import HadamardTransform
from qbench.quant.methods.folding import lossless_tolerance, relative_error
from qbench.quant.methods.rtn import untie_word_embeddings
from qbench.quant.walk.experts import set_input_step
from qbench.quant.walk.inventory import (
    Target,
    replace_module,
    rows_per_chunk,
    set_rows,
    set_weight,
)
from qbench.quant.walk.kvcache import KVSite, kv_sites
from qbench.quant.walk.onload import execution_device, input_device, onloaded
from qbench.quant.walk.structure import NormGroup, Structure, probe_ids, trace_structure

Hadamard = Callable[..., HadamardTransform]  # (width, random_signs=False) -> a Hadamard


class HadamardInput(nn.Module):
    """Rotates its input by `hadamard`, then applies `linear` (whose weight is rotated to match)."""

    def __init__(self, linear: nn.Module, hadamard: HadamardTransform) -> None:
        super().__init__()
        self.linear = linear
        self.hadamard = hadamard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.hadamard(x))


class RotatedOutput(nn.Module):
    """A post-norm computed in the original basis, its output rotated: norm(x) Q."""

    def __init__(self, norm: nn.Module, rotation: HadamardTransform) -> None:
        super().__init__()
        self.norm = norm
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.norm(x))


class StreamRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dimension, in float32: what a LayerNorm
    computes on the mean-free residual stream, once its weight and bias are folded away."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@torch.no_grad()
def rotate(
    model: nn.Module,
    rotate_qk: bool = False,
    generator: torch.Generator | None = None,
    note: Callable[..., None] | None = None,
) -> None:
    """Apply QuaRot's float-equivalent rotations to `model` in place, region by region (the
    embeddings, each decoder block, the final norm and what reads it), each onloaded meanwhile
    where the model is offloaded (qbench.quant.walk.onload).

    rotate_qk: also rotate queries and keys per head after RoPE (for a quantized KV cache).
    generator: the random signs' (and any random orthogonal base's) draws (default torch's
    global RNG), drawn in one order (the stream's, each block's online
    transforms, then the queries' and keys'); note: told the Hadamard construction of every
    width rotated (as a caveat where no Hadamard matrix of that width exists: a random
    orthogonal base). Raises QBenchError where the structure cannot be rotated losslessly, or
    where the rotated model's logits differ from the original's beyond LOSSLESS_TOLERANCE
    (relative L2).
    """
    hadamard = hadamard_maker(generator, note)
    prepared = prepare(model)
    stream = hadamard(prepared.hidden, random_signs=True).to(prepared.device)
    online = online_rotations(prepared.structure, hadamard)
    rotate_stream(model, prepared.structure, stream)
    fold_online(model, online)
    if rotate_qk:
        rotate_queries_and_keys(model, hadamard)
    check_lossless(model, prepared, "rotation")


def hadamard_maker(generator: torch.Generator | None, note: Callable[..., None] | None) -> Hadamard:
    """width -> a HadamardTransform drawn from `generator` (random signs on request), each
    construction told to `note`."""

    def hadamard(n: int, random_signs: bool = False) -> HadamardTransform:
        transform = HadamardTransform(n, random_signs, generator)
        if note is not None:
            factors = transform.factorization
            note(f"rotation: width {n} rotated by {factors}", caveat=not factors.is_hadamard)
        return transform

    return hadamard


@dataclass
class Prepared:
    """A model made ready for a rotation of its residual stream (`prepare`): its structure,
    the probe tokens and the logits before any change (float64), to check the result."""

    model: nn.Module
    structure: Structure
    ids: torch.Tensor
    before: torch.Tensor

    @property
    def hidden(self) -> int:
        """The residual stream's width."""
        return self.structure.embeddings[0][1].weight.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the stream is computed (the input embedding's execution device)."""
        return input_device(self.model)


@torch.no_grad()
def prepare(model: nn.Module) -> Prepared:
    """Steps 1 and 2 of the module docstring, in place: lm_head untied, the stream made
    mean-free where LayerNorms center it, every residual norm's scale and bias folded into its
    readers. The model's function is unchanged. QBenchError where it cannot be rotated."""
    ids = probe_ids(model)
    before = model(input_ids=ids).logits.double()
    structure = trace_structure(model, ids)
    _check_rotatable(model, structure)
    untie_word_embeddings(model)  # lm_head takes the final norm's scale, the embedding does not
    centers = any(g.spec.centers for g in structure.residual_norms)
    found = structure.inventory
    with onloaded(model, *(name for name, _ in structure.embeddings)):
        for _, table in structure.embeddings if centers else ():
            set_rows(table.weight, lambda rows: rows - rows.mean(dim=1, keepdim=True))
    for block in structure.blocks:
        with onloaded(model, found.block_path(block.index)):
            for target in block.writers if centers else ():
                _center_output(target)
            for group in block.norms:
                _fold_norm(model, group)
    if (final := structure.final) is not None:
        with onloaded(model, final.name, *(t.name for t in final.readers)):
            _fold_norm(model, final)
    return Prepared(model, structure, ids, before)


@torch.no_grad()
def rotate_stream(model: nn.Module, structure: Structure, stream: nn.Module) -> None:
    """Step 3 of the module docstring: the residual stream rotated by the orthogonal `stream`
    (x -> x Q along the last dimension, with `inverse`: a HadamardTransform, QuaRot's, or a
    DenseRotation, SpinQuant's learned R1), folded into the weights around it, region by
    region, each onloaded meanwhile where the model is offloaded."""
    found = structure.inventory
    with onloaded(model, *(name for name, _ in structure.embeddings)):
        for _, table in structure.embeddings:
            set_rows(table.weight, stream)  # E Q
    for block in structure.blocks:
        with onloaded(model, found.block_path(block.index)):
            for group in block.norms:
                _rotate_readers(group, stream)
            for target in block.direct_readers:
                _rotate_input(target, stream)
            for target in block.writers:
                _rotate_output(target, stream)
            for name, norm in block.writer_norms:
                replace_module(model, name, RotatedOutput(norm, stream))
    if (final := structure.final) is not None:
        with onloaded(model, final.name, *(t.name for t in final.readers)):
            _rotate_readers(final, stream)
    with onloaded(model, *(t.name for t in structure.head_readers)):
        for target in structure.head_readers:
            _rotate_input(target, stream)


def _rotate_readers(group: NormGroup, stream: nn.Module) -> None:
    """The targets a (folded) residual norm feeds read the rotated stream."""
    if group.spec.extra:
        group.norm.stream_rotation = stream
    for target in [*group.readers, *group.inner]:
        _rotate_input(target, stream)


def online_rotations(structure: Structure, hadamard: Hadamard) -> list[OnlineRotation]:
    """The online Hadamard of every target writing the stream or a post-norm (step 4), in
    block order, each of its input width (on the target's device)."""
    found = []
    for block in structure.blocks:
        for target in [*block.writers, *block.post_normed]:
            width = target.output_matrices()[0][1].shape[1]
            online = hadamard(width).to(execution_device(target.module))
            found.append(OnlineRotation(target, online))
    return found


@torch.no_grad()
def fold_online(model: nn.Module, online: list[OnlineRotation]) -> None:
    """Step 4: x -> x H before each target's output matrices (online), W <- W H."""
    for rotation in online:
        with onloaded(model, rotation.target.name):
            _online_hadamard(model, rotation.target, rotation.hadamard)


class DenseRotation(nn.Module):
    """x -> x @ M along the last dimension, M a dense orthogonal n x n matrix kept in float64
    (a learned rotation: SpinQuant's R1); `inverse(x)` = x @ M^T, `matrix()` = M."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", matrix.detach().double(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T.to(x)

    def matrix(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"dense {self.weight.shape[0]} x {self.weight.shape[1]}"


@dataclass(frozen=True)
class OnlineRotation:
    """QuaRot's online Hadamard before a target writing the stream (o_proj, down_proj)."""

    target: Target
    hadamard: HadamardTransform


def _check_rotatable(model: nn.Module, structure: Structure) -> None:
    kind = model.config.model_type
    problems = list(structure.problems)
    norms = structure.residual_norms
    if any(g.spec and g.spec.extra and not hasattr(g.norm, "stream_rotation") for g in norms):
        problems.append("a norm has parameters beyond a weight and bias and no stream_rotation")
    if any(g.spec and g.spec.centers for g in norms) and any(
        b.writer_norms for b in structure.blocks
    ):
        problems.append("LayerNorms subtract the mean while post-norms write the residual stream")
    for group in norms:
        if group.spec and group.spec.bias and any(not _can_take_bias(t) for t in group.readers):
            problems.append(f"{group.name} has a bias its readers have no bias to take")
    if problems:
        raise RefusedError(f"rotation is not lossless on {kind}: {'; '.join(problems)}")


def _can_take_bias(target: Target) -> bool:
    """Whether the target adds a bias after its input product (a Linear can be given one)."""
    if target.experts is not None:
        return all(hasattr(target.module, f"{p}_bias") for p in target.experts.readers)
    return isinstance(target.module, nn.Linear) or isinstance(
        getattr(target.module, "bias", None), nn.Parameter
    )


def _center_output(target: Target) -> None:
    """Make a writer's output zero-mean over the stream: W <- W - 1 mean_out(W), b - mean(b)."""
    for _, matrix in target.output_matrices():  # [out, in]: center over out
        mean = matrix.mean(dim=0, keepdim=True, dtype=torch.float64)  # [1, in]
        set_rows(matrix, lambda rows, mean=mean: rows - mean)
    for bias in _output_biases(target):
        set_weight(bias, bias.double() - bias.double().mean(dim=-1, keepdim=True))


def _fold_norm(model: nn.Module, group: NormGroup) -> None:
    """Move the norm's scale and bias into its readers; the norm keeps scale 1, no bias."""
    spec, norm = group.spec, group.norm
    scale = spec.effective_scale(norm)
    for target in [*group.readers, *group.inner]:
        matrices = target.input_matrices()
        if spec.bias:  # b_reader + W b_norm, with the reader's weight before the scale
            shift = norm.bias.detach().double()
            for (_, matrix), bias in zip(matrices, _input_biases(target), strict=True):
                step = rows_per_chunk(matrix)
                for rows, part in zip(matrix.split(step), bias.split(step), strict=True):
                    set_weight(part, part.double() + rows.double() @ shift.to(rows.device))
        for _, matrix in matrices if scale is not None else ():
            set_rows(matrix, lambda rows, s=scale: rows * s.to(rows.device))
    if spec.scale is not None:
        norm.weight.fill_(1 if spec.scale == "weight" else 0)
    if spec.bias:
        norm.bias.zero_()
    if spec.centers:
        replace_module(model, group.name, StreamRMSNorm(spec.eps))


def _input_biases(target: Target) -> list[torch.Tensor]:
    """The bias added to each input matrix's product (created as zeros where missing)."""
    if target.experts is None:
        module = target.module
        if getattr(module, "bias", None) is None:
            weight = module.weight
            module.bias = nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=False)
        return [module.bias]
    return [
        getattr(target.module, f"{p}_bias")[e]
        for p in target.experts.readers
        for e in range(getattr(target.module, p).shape[0])
    ]


def _output_biases(target: Target) -> list[torch.Tensor]:
    if target.experts is None:
        bias = getattr(target.module, "bias", None)
        return [bias] if bias is not None else []
    return [
        getattr(target.module, f"{p}_bias")
        for p in target.experts.writers
        if getattr(target.module, f"{p}_bias", None) is not None
    ]


def _rotate_input(target: Target, rotation: HadamardTransform) -> None:
    """x -> x Q before the target: W <- W Q (W [..., out, in]; fast transform along in)."""
    for _, matrix in target.input_matrices():
        set_rows(matrix, rotation)


def _rotate_output(target: Target, rotation: HadamardTransform) -> None:
    """y -> y Q: W <- Q^T W = (W^T Q)^T, b <- b Q."""
    for _, matrix in target.output_matrices():
        set_rows(matrix.transpose(-1, -2), rotation)  # the rows of W^T: W's columns
    for bias in _output_biases(target):
        set_weight(bias, rotation(bias.double()))


def _online_hadamard(model: nn.Module, target: Target, online: HadamardTransform) -> None:
    """x -> x H before the target's output matrices, W <- W H (H orthogonal, H^-1 = H^T)."""
    for _, matrix in target.output_matrices():
        set_rows(matrix, online)  # W H
    if target.experts is None:
        replace_module(model, target.name, HadamardInput(target.module, online))
        return
    for parameter in target.experts.writers:
        set_input_step(target.module, parameter, "rotate", lambda x, _e, t=online: t(x))


def rotate_queries_and_keys(model: nn.Module, hadamard: Hadamard) -> None:
    """Step 5: queries and keys rotated per head after RoPE, online (QK^T unchanged)."""
    install_qk(qk_rotations(model, hadamard))


def qk_rotations(model: nn.Module, hadamard: Hadamard) -> list[tuple[KVSite, HadamardTransform]]:
    """Every attention's KV step (installed where missing) with its per-head Hadamard."""
    return [(site, hadamard(site.head_dim).to(site.device)) for site in kv_sites(model)]


@torch.no_grad()
def install_qk(rotations: list[tuple[KVSite, HadamardTransform]]) -> None:
    """Each KV step rotates queries and keys by its Hadamard; a learned key slot alike."""
    for site, rotation in rotations:
        site.transform.qk_rotation = rotation
        key_slot = getattr(site.attention, "k_bias", None)  # the qbench family's learned slot
        if isinstance(key_slot, nn.Parameter):
            set_weight(key_slot, rotation(key_slot.double()))


@torch.no_grad()
def check_lossless(model: nn.Module, prepared: Prepared, method: str) -> None:
    """QBenchError when the logits of the probe tokens moved from `prepared.before` beyond
    LOSSLESS_TOLERANCE (relative L2) for the model's dtype; `method` names the change."""
    after = model(input_ids=prepared.ids).logits.double()
    error = relative_error(after, prepared.before)
    dtype = next(model.parameters()).dtype
    tolerance = lossless_tolerance(dtype)
    if not error <= tolerance:
        raise QBenchError(
            f"{method} changed the logits of {model.config.model_type} by {error:.2e} "
            f"(relative L2; allowed {tolerance:g} in {dtype}): qbench's structure trace "
            "misread this model; use smoothquant, gptq or rtn for it"
        )
