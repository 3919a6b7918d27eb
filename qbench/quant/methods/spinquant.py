"""SpinQuant (Liu et al. 2024; facebookresearch/SpinQuant): rotations learned against the
quantized network's loss, then folded as QuaRot's are (its step: qbench.quant.steps.spinquant).

The rotated network is qbench.quant.methods.rotation's with learned matrices:
- R1 [hidden, hidden] on the residual stream (embeddings E R1, readers W R1, writers R1^T W),
  in place of QuaRot's random Hadamard Q;
- R2 [head_dim, head_dim], one per block, on each attention head's values: v_proj's output
  rows per head (W_v <- blockdiag(R2)^T W_v, its bias b R2), o_proj's input columns per head
  (W_o <- W_o blockdiag(R2)), a learned value slot (the qbench family's attn-bias) v' R2; the
  KV cache then holds values in R2's basis;
- R3 (queries and keys per head after RoPE, where the KV cache or the loss rounds it) and R4
  (before every writer of the stream: down_proj, and o_proj after R2) are the rotation's
  online Hadamards, fixed.

Training, as SpinQuant's optimize_rotation.py: R1 and the R2s start from random Hadamard
matrices (R1 is the one QuaRot's rotation draws with the same seed; the R2s are drawn after
the online Hadamards), the model's weights are frozen, and Cayley SGD on the Stiefel manifold
(`cayley_step`: SGDG of SpinQuant's train_utils/optimizer.py, after Li et al. 2020, momentum
0) follows the gradient of the next-token cross-entropy of the network that rounds
activations, KV cache and optionally weights with straight-through gradients (`ste`), the
learning rate decaying by a cosine to 0 (Hugging Face's "cosine" schedule, no warm-up).

How the network is computed while it trains: the residual stream stays in the model's basis,
and each target that rounds something in the loss (or carries R2) is replaced by a
`TrainedLinear` computing what the rotated target computes: a reader rounds x R1 and
multiplies it by W R1; a writer multiplies x (after R4) by R1^T W H and returns its output
by R1^T. Norms (plain RMS norms once `prepare` folded their scales), PreAffine / GatedNorm
norms and post-norms compute in the model's basis in the rotated model too, so nothing else
changes, and the embedding table and an unrounded lm_head need no product with R1. Before it
trains, that network with nothing rounded must give the model's logits (a check of the
construction on every model); afterwards R1 and R2 are folded with the rotation's functions
and the result is checked lossless against the logits before any change.

Deviations from SpinQuant's code: the online Hadamard before o_proj (QuaRot's, which SpinQuant
replaces by R2 alone) stays, after R2; the QR retraction onto the manifold runs after every
step (SpinQuant: with probability 1/101 per step), so the matrices stay orthogonal to float64
precision for the lossless fold; the windows are random offsets into the calibration text
(SpinQuant: consecutive 2048-token blocks of WikiText-2 train).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from qbench.data.sources import load_text, text_fingerprint
from qbench.errors import QBenchError, RefusedError
from qbench.quant.artifacts import Learned, StaleArtifact
from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.hadamard import HadamardTransform
from qbench.quant.formats.spec import KVQuant, TensorQuant
from qbench.quant.methods.folding import lossless_tolerance, relative_error
from qbench.quant.methods.rotation import (
    DenseRotation,
    OnlineRotation,
    Prepared,
    check_lossless,
    fold_online,
    hadamard_maker,
    install_qk,
    online_rotations,
    prepare,
    qk_rotations,
    rotate_stream,
)
from qbench.quant.steps.base import transforms_key
from qbench.quant.walk.inventory import Inventory, Target, replace_module, set_weight
from qbench.quant.walk.kvcache import KVTransform
from qbench.quant.walk.onload import offloaded_modules
from qbench.quant.walk.select import quantized_targets
from qbench.quant.walk.structure import Structure

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.steps.spinquant import LossFormats, SpinQuant

ARTIFACT_SCHEMA = 1  # what the kept tensors are: {"R1": [h, h], "R2.<block>": [d, d]}, float64
ORTHOGONAL_TOLERANCE = 1e-8  # max |R R^T - I| of a matrix read back


def refusal(found: Inventory) -> str | None:
    """Why spinquant cannot train on a model with these targets (read on the skeleton)."""
    if experts := found.of_kind("experts"):
        return (
            f"spinquant trains through linear layers, and {next(iter(experts))} holds "
            "experts as 3-D tensors: use rotation"
        )
    for index in range(len(found.blocks)):
        names = found.in_block(index)
        if not any(n.endswith(".v_proj") for n in names) or not any(
            n.endswith(".o_proj") for n in names
        ):
            return (
                f"spinquant's R2 rotates values between v_proj and o_proj, and block {index} "
                "has no such pair (fused or latent attention): use rotation"
            )
    return None


# ---------------------------------------------------------------- the step


def spinquant(context: StepContext, step: SpinQuant) -> None:
    """Learn (or load) R1 and the R2s for `context.quantizer` and fold them into
    `context.model` in place (see the module docstring). QBenchError where the model cannot be
    rotated, where the training network is not the model in float, or where the folded model's
    logits moved."""
    if offloaded := offloaded_modules(context.model):
        raise RefusedError(
            f"spinquant learns its rotations on the whole model in memory, and {len(offloaded)} "
            f"modules are offloaded (e.g. {offloaded[0]}): load it without offloading, or use "
            "rotation"
        )
    formats = step.loss_formats(context.quantizer)
    rounds_kv = formats.kv is not None or context.quantizer.kv is not None
    network = rotated_network(context.model, rounds_kv, context.generator, context.note)
    if step.iterations:
        learn_or_load(context, step, formats, network)
    else:
        context.note("spinquant: iterations 0: R1 and R2 are the random Hadamard matrices")
    fold(context.model, network)
    check_lossless(context.model, network.prepared, "spinquant")


@dataclass(frozen=True)
class Network:
    """A model prepared for SpinQuant (qbench.quant.methods.rotation.prepare) with what its
    rotated network is made of: the value paths R2 rotates, the online Hadamards (R4) and the
    rotations, at their random Hadamard start."""

    prepared: Prepared
    paths: list[HeadPath]
    online: list[OnlineRotation]
    rotations: Rotations


def rotated_network(
    model: nn.Module,
    rounds_kv: bool,
    generator: torch.Generator | None = None,
    note: Callable[[str], None] | None = None,
) -> Network:
    """Prepare `model` in place and draw its rotations' start from `generator`: R1 first (the
    Q that QuaRot's rotation draws with the same generator), R4, the R2s, then R3 (installed,
    online, where `rounds_kv`: the KV cache or the loss rounds keys)."""
    hadamard = hadamard_maker(generator, note)
    prepared = prepare(model)
    r1 = hadamard(prepared.hidden, random_signs=True).matrix()
    online = online_rotations(prepared.structure, hadamard)
    paths = head_paths(model, prepared.structure)
    r2 = [hadamard(path.head_dim, random_signs=True).matrix() for path in paths]
    install_qk(qk_rotations(model, hadamard) if rounds_kv else [])
    return Network(prepared, paths, online, Rotations(r1, r2).to(prepared.device))


@dataclass(frozen=True)
class HeadPath:
    """One attention's value path: `value` (v_proj) writes the values of heads of `head_dim`,
    `output` (o_proj) reads them; `attention` holds both (and a value slot, if any)."""

    value: Target
    output: Target
    attention: nn.Module
    head_dim: int


def head_paths(model: nn.Module, structure: Structure) -> list[HeadPath]:
    """Each block's v_proj (a norm's reader) and o_proj (a writer), under one attention."""
    config = model.config.get_text_config()
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    paths = []
    for block in structure.blocks:
        readers = [t for g in block.norms for t in g.readers if t.name.endswith(".v_proj")]
        writers = [t for t in [*block.writers, *block.post_normed] if t.name.endswith(".o_proj")]
        pairs = [
            (v, o) for v in readers for o in writers if v.name[:-7] == o.name[:-7]
        ]  # same parent: ".v_proj" and ".o_proj" are 7 characters
        if len(pairs) != 1 or not all(isinstance(t.module, nn.Linear) for t in pairs[0]):
            raise QBenchError(
                f"spinquant: block {block.index} has no v_proj reading a norm and o_proj "
                "writing the stream under one attention module: use rotation"
            )
        value, output = pairs[0]
        paths.append(HeadPath(value, output, model.get_submodule(value.name[:-7]), width))
    return paths


class Rotations(nn.Module):
    """What SpinQuant trains: `r1` [hidden, hidden] and one `r2` [head_dim, head_dim] per
    block, float64, applied as x @ R. `rounding` False: the training network in float."""

    def __init__(self, r1: torch.Tensor, r2: list[torch.Tensor]) -> None:
        super().__init__()
        self.r1 = nn.Parameter(r1.double().clone(), requires_grad=False)
        self.r2 = nn.ParameterList(nn.Parameter(r.double().clone(), False) for r in r2)
        self.rounding = True

    def matrices(self) -> dict[str, torch.Tensor]:
        """{"R1": ..., "R2.<block>": ...}: what the artifact keeps."""
        return {"R1": self.r1.detach(), **{f"R2.{i}": r.detach() for i, r in enumerate(self.r2)}}


@torch.no_grad()
def fold(model: nn.Module, network: Network) -> None:
    """R1 into the stream, R2 into each value path, then the online Hadamards (R4)."""
    rotations = network.rotations
    rotate_stream(model, network.prepared.structure, DenseRotation(rotations.r1))
    for path, r2 in zip(network.paths, rotations.r2, strict=True):
        weight = path.value.module.weight  # [heads * d, in]: rows per head <- R2^T rows
        set_weight(weight, _heads_out(weight.double(), r2))
        if path.value.module.bias is not None:
            bias = path.value.module.bias
            set_weight(bias, _heads(bias.double(), r2))
        weight = path.output.module.weight  # [out, heads * d]: columns per head <- cols R2
        set_weight(weight, _heads(weight.double(), r2))
        slot = getattr(path.attention, "v_bias", None)
        if isinstance(slot, nn.Parameter):
            set_weight(slot, _heads(slot.double(), r2))
    fold_online(model, network.online)


def _heads(x: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """x [..., heads * d] -> each head's d-vector times R2 (x blockdiag(R2))."""
    d = r2.shape[0]
    return (x.reshape(*x.shape[:-1], -1, d) @ r2.to(x)).reshape(x.shape)


def _heads_out(weight: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """W [heads * d, in] -> blockdiag(R2)^T W: each head's output rows rotated."""
    return _heads(weight.T, r2).T


# ---------------------------------------------------------------- learn or load


def learn_or_load(
    context: StepContext, step: SpinQuant, formats: LossFormats, network: Network
) -> None:
    """Set the network's rotations to the kept matrices of this training, or train them (and
    keep them)."""
    rotations = network.rotations
    rounded = sorted(quantized_targets(network.prepared.structure.inventory, context.quantizer))
    determinants = {
        "method": "spinquant",
        "schema": ARTIFACT_SCHEMA,
        "step": step.model_dump(exclude={"loss"}),
        "loss": formats.model_dump(),
        "rounded": rounded,
        "before": transforms_key(context.before),
        "seed": context.seed,
        "calibration": text_fingerprint(load_text(step.calibration.data, step.calibration.split)),
        "versions": {p: version(p) for p in ("torch", "transformers", "compressed-tensors")},
    }
    store = context.artifacts
    key = store.key(determinants) if store is not None else None
    if store is not None and key is not None:
        try:
            learned = store.load(key)
        except StaleArtifact as reason:
            context.note(f"spinquant: kept rotations not used ({reason}): trained again")
            learned = None
        if learned is not None and (problem := _misfit(learned, rotations)) is None:
            rotations.load_state_dict(_as_state(learned.tensors), strict=True)
            context.note(
                f"spinquant: rotations loaded from {_short(learned.path)} (sha256 checked)"
            )
            context.note(_training_note(learned.info))
            return
        if learned is not None:
            context.note(f"spinquant: kept rotations not used ({problem}): trained again")
    ids = context.calibration_ids(step.calibration, "spinquant")
    info = train(context.model, network, formats, rounded, ids, step, context.progress)
    context.note(_training_note(info))
    if store is not None and key is not None:
        path = store.save(key, rotations.matrices(), info, determinants)
        context.note(f"spinquant: rotations kept in {_short(path)}")
    else:
        context.note("spinquant: rotations not kept (no artifacts folder): a rerun trains again")


def _short(path: Path) -> str:
    """learned/<first 16 hex digits of the key>... (what notes show of a kept file)."""
    return f"{path.parent.name}/{path.name[:16]}...{path.suffix}"


def _misfit(learned: Learned, rotations: Rotations) -> str | None:
    """Why tensors read back are not this model's rotations (names, shapes, orthogonality)."""
    expected = rotations.matrices()
    if set(learned.tensors) != set(expected):
        return f"{learned.path.name} holds {sorted(learned.tensors)}, not {sorted(expected)}"
    for name, tensor in learned.tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != torch.float64:
            return f"{learned.path.name}: {name} is {tuple(tensor.shape)} {tensor.dtype}"
        eye = torch.eye(tensor.shape[0], dtype=torch.float64)
        if not (tensor @ tensor.T - eye).abs().max() <= ORTHOGONAL_TOLERANCE:
            return f"{learned.path.name}: {name} is not orthogonal"
    return None


def _as_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The artifact's names ("R1", "R2.<i>") as Rotations' state dict names."""
    return {name.replace("R1", "r1").replace("R2.", "r2."): t for name, t in tensors.items()}


def _training_note(info: dict[str, Any]) -> str:
    return (
        f"spinquant: trained {info['iterations']} iterations x {info['windows_per_iteration']} "
        f"windows of {info['seq_len']} tokens in {info['seconds']:.1f} s "
        f"({info['cpu_seconds']:.1f} s of CPU); calibration loss on "
        f"the first iteration's windows {info['loss_start']:.4f} (random Hadamard) -> "
        f"{info['loss_end']:.4f} (learned); loss per iteration {info['losses'][0]:.4f} -> "
        f"{info['losses'][-1]:.4f}"
    )


# ---------------------------------------------------------------- training


def ste(x: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """fake_quant(x) in the forward pass, the identity in the backward (straight-through)."""
    with torch.no_grad():
        rounded = fake_quant(x.detach(), spec)
    return rounded + (x - x.detach())


class TrainedLinear(nn.Module):
    """One target of the rotated network while R1 / R2 train, computed in the model's basis
    (see the module docstring); x [..., in] -> y [..., out] as the folded, rounded target
    computes it, with gradients to the rotations.

    stream_in: reads the residual stream (x -> x R1, W -> W R1); stream_out: writes it
    (W -> R1^T W, y -> y R1^T); online: R4 before it (x -> x H, W -> W H); heads_in /
    heads_out: the block whose R2 rotates its input columns / output rows per head.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rotations: Rotations,
        weights: TensorQuant | None,
        activations: TensorQuant | None,
        stream_in: bool = False,
        stream_out: bool = False,
        online: HadamardTransform | None = None,
        heads_in: int | None = None,
        heads_out: int | None = None,
    ) -> None:
        super().__init__()
        self.linear, self.rotations = linear, [rotations]  # a list: not a submodule
        self.weights, self.activations = weights, activations
        self.stream_in, self.stream_out, self.online = stream_in, stream_out, online
        self.heads_in, self.heads_out = heads_in, heads_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotations = self.rotations[0]
        r1 = rotations.r1.to(x.dtype)
        if self.stream_in:
            x = x @ r1
        if self.online is not None:
            x = self.online(x)
        if self.activations is not None and rotations.rounding:
            x = ste(x, self.activations)
        weight = self.rotated_weight(r1)
        if self.weights is not None and rotations.rounding:
            weight = ste(weight, self.weights)
        y = F.linear(x, weight)  # [..., out]
        if self.stream_out:
            y = y @ r1.T
        bias = self.linear.bias
        if bias is not None and self.heads_out is not None:
            bias = _heads(bias, rotations.r2[self.heads_out].to(x.dtype))
        return y if bias is None else y + bias

    def rotated_weight(self, r1: torch.Tensor) -> torch.Tensor:
        """The weight [out, in] the folded model holds (before rounding)."""
        weight = self.linear.weight
        if self.stream_in:
            weight = weight @ r1
        if self.heads_in is not None:
            weight = _heads(weight, self.rotations[0].r2[self.heads_in].to(weight.dtype))
        if self.online is not None:
            weight = self.online(weight)
        if self.stream_out:
            weight = r1.T @ weight
        if self.heads_out is not None:
            weight = _heads_out(weight, self.rotations[0].r2[self.heads_out].to(weight.dtype))
        return weight


class TrainedKV(nn.Module):
    """An attention's KV step while training: its own step (R3 on queries and keys), then
    keys and values rounded straight-through."""

    def __init__(self, step: KVTransform, spec: KVQuant, rotations: Rotations) -> None:
        super().__init__()
        self.step, self.spec, self.rotations = step, spec, [rotations]

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value = self.step(query, key, value)
        if self.rotations[0].rounding:
            key, value = ste(key, self.spec), ste(value, self.spec)
        return query, key, value

    def mask(
        self, attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
    ) -> torch.Tensor | None:
        """The attention mask its step would use (KVTransform.mask)."""
        return self.step.mask(attention_mask, query, key)


@contextmanager
def trained_network(
    model: nn.Module, network: Network, formats: LossFormats, rounded: list[str]
) -> Iterator[None]:
    """The model computing the rotated network (module docstring), rounding as `formats` say
    on the targets named `rounded`; put back as it was on exit."""
    structure, paths, rotations = network.prepared.structure, network.paths, network.rotations
    roles: dict[str, dict[str, Any]] = {}
    for group in structure.residual_norms:
        for target in [*group.readers, *group.inner]:
            roles.setdefault(target.name, {})["stream_in"] = True
    for target in structure.head_readers:
        roles.setdefault(target.name, {})["stream_in"] = True
    for block in structure.blocks:
        for target in block.direct_readers:
            roles.setdefault(target.name, {})["stream_in"] = True
        for target in block.writers:
            roles.setdefault(target.name, {})["stream_out"] = True
    for rotation in network.online:
        roles.setdefault(rotation.target.name, {})["online"] = rotation.hadamard
    for index, path in enumerate(paths):
        roles[path.value.name]["heads_out"] = index
        roles[path.output.name]["heads_in"] = index
    targets = structure.inventory.targets
    carries_r2 = {p.value.name for p in paths} | {p.output.name for p in paths}
    with ExitStack() as stack:
        for name, role in roles.items():
            if name not in rounded and name not in carries_r2:
                continue  # unrounded, it computes the same in either basis
            module = targets[name].module
            if not isinstance(module, nn.Linear):
                raise QBenchError(
                    f"spinquant trains through nn.Linear targets; {name} is a "
                    f"{type(module).__name__}: use rotation"
                )
            weights = formats.weights if name in rounded else None
            activations = formats.activations if name in rounded else None
            trained = TrainedLinear(module, rotations, weights, activations, **role)
            replace_module(model, name, trained)
            stack.callback(replace_module, model, name, module)
        for index, path in enumerate(paths):
            stack.enter_context(_rotated_value_slot(path.attention, rotations, index))
        if formats.kv is not None:
            for site in _kv_steps(model):
                site.kv_transform = TrainedKV(site.kv_transform, formats.kv, rotations)
                stack.callback(setattr, site, "kv_transform", site.kv_transform.step)
        yield


def _kv_steps(model: nn.Module) -> list[nn.Module]:
    """The attention modules holding a KV step (installed with R3 before training)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "kv_transform", None), nn.Module)]
    if not found:
        raise QBenchError("spinquant: the loss rounds the KV cache, and no KV step is installed")
    return found


@contextmanager
def _rotated_value_slot(attention: nn.Module, rotations: Rotations, index: int) -> Iterator[None]:
    """A learned value slot (v_bias [kv_heads, d]) reads as v' R2 while training."""
    slot = getattr(attention, "v_bias", None)
    if not isinstance(slot, nn.Parameter):
        yield
        return
    del attention.v_bias  # the Parameter, put back on exit

    def rotate(module: nn.Module, args: tuple) -> None:
        module.v_bias = _heads(slot, rotations.r2[index].to(slot.dtype))

    hook = attention.register_forward_pre_hook(rotate)
    try:
        yield
    finally:
        hook.remove()
        attention.__dict__.pop("v_bias", None)
        attention.v_bias = slot


def calibration_loss(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `ids` [windows, tokens], `batch_size` windows per
    forward pass; differentiable (sum over passes of each pass's share)."""
    total = ids.new_zeros((), dtype=torch.float32)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        logits = model(input_ids=batch).logits  # [b, t, vocab]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        total = total + loss * (batch.shape[0] / ids.shape[0])
    return total


def cayley_step(x: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of SpinQuant's SGDG (stiefel=True, momentum 0) on an orthogonal x [n, n]
    used as v -> v @ x, with gradient `grad`; the new x, retracted onto the orthogonal
    matrices by QR (signs fixed).

    The descent direction -grad is projected onto the tangent space through the skew matrix
    W = (V X - X^T X V X / 2) - (...)^T, and the step follows the Cayley transform
    (I - a/2 W)^-1 (I + a/2 W) X^T by its 5-iteration fixed point, a = min(lr, 1 / ||W||_1).
    """
    unity = x / (x.norm(dim=1, keepdim=True) + 1e-8)  # rows normalized
    v = -grad.T  # momentum 0: the momentum buffer is the negative gradient
    mx = v @ unity
    xxmx = unity.T @ (unity @ mx)
    w_hat = mx - 0.5 * xxmx
    w = w_hat - w_hat.T  # skew-symmetric
    alpha = min(lr, 1.0 / (float(w.abs().sum(dim=0).max()) + 1e-8))
    xt = unity.T
    y = xt + alpha * v
    for _ in range(5):
        y = xt + alpha * (w @ (0.5 * (xt + y)))
    q, r = torch.linalg.qr(y)  # y = X_new^T: X_new = q^T with r's diagonal made positive
    return (q * torch.sign(torch.diagonal(r))).T


def train(
    model: nn.Module,
    network: Network,
    formats: LossFormats,
    rounded: list[str],
    ids: torch.Tensor,
    step: SpinQuant,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the network's rotations in place (module docstring) on the windows `ids` [N, seq_len],
    iteration i taking windows i*k .. i*k+k-1 (mod N), k = step.windows_per_iteration; what
    the training did: time, loss per iteration, the first iteration's windows' loss before
    (the random Hadamard start) and after. QBenchError where the training network in float
    is not the model."""
    start, cpu_start = time.perf_counter(), time.process_time()
    prepared, rotations = network.prepared, network.rotations
    ids = ids.to(prepared.device)
    k, batch = step.windows_per_iteration, step.calibration.batch_size
    windows = [torch.arange(i * k, i * k + k) % ids.shape[0] for i in range(step.iterations)]
    params = [rotations.r1, *rotations.r2]
    losses = []
    with trained_network(model, network, formats, rounded):
        _check_construction(model, prepared, rotations)
        bar = tqdm(total=step.iterations, desc="spinquant", disable=not progress, leave=False)
        for i, chosen in enumerate(windows):
            lr = step.learning_rate * 0.5 * (1 + math.cos(math.pi * i / step.iterations))
            for p in params:
                p.requires_grad_(True)
            loss = calibration_loss(model, ids[chosen], batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.requires_grad_(False)
                    if g is not None:
                        p.copy_(cayley_step(p, g, lr))
            losses.append(float(loss.detach()))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        with torch.no_grad():
            loss_end = float(calibration_loss(model, ids[windows[0]], batch))
    return {
        "iterations": step.iterations,
        "windows_per_iteration": k,
        "seq_len": ids.shape[1],
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "losses": losses,
        "loss_start": losses[0],
        "loss_end": loss_end,
    }


@torch.no_grad()
def _check_construction(model: nn.Module, prepared: Prepared, rotations: Rotations) -> None:
    """The training network with nothing rounded computes the model's logits."""
    rotations.rounding = False
    try:
        error = relative_error(model(input_ids=prepared.ids).logits, prepared.before)
    finally:
        rotations.rounding = True
    dtype = next(model.parameters()).dtype
    tolerance = lossless_tolerance(dtype)
    if not error <= tolerance:
        raise QBenchError(
            f"spinquant: the rotated network it trains differs from "
            f"{model.config.model_type} in float by {error:.2e} (relative L2; allowed "
            f"{tolerance:g}): R2 does not commute with what this attention does between "
            "v_proj and o_proj (an elementwise gate?); use rotation"
        )
