"""Paired percentile bootstrap intervals for degradations (numpy only; no records here).

Perplexity (`paired_perplexity`): a quantized cell and its fp cell scored the same windows
(the same tokens, checked by the windows' hash). One resample draws W window indices with
replacement; on that resample both perplexities are recomputed, exp(sum NLL / sum tokens),
and their difference and ratio taken. The interval is the (α/2, 1 − α/2) quantile pair of
those B values (α = 1 − confidence); the estimate is the value on all windows. Drawing the
same windows for both cells is what makes it paired: the variation of difficulty between
windows, shared by both models, cancels. Windows are the resampled units, as if independent;
consecutive windows cut from one long document are somewhat correlated, which this interval
does not model (a block bootstrap would widen it a little).

Task scores (`paired_scores`): the same, over documents, per task (a stratified resample:
each task's documents are drawn within that task), for the difference of the mean score;
over several tasks the statistic is the difference of the average of their means.

Degradation over seeds (`degradation_difference`): a hierarchical bootstrap (resample the
top level, then within it; Davison & Hinkley 1997, §3.8). A group (a variant trained with
several seeds) has members m with ratio r_m = ppl_quantized / ppl_fp on the windows. One
resample draws the members (seeds) with replacement and the windows with replacement, and
takes the mean of r over the drawn members, for the variant and for the baseline, and their
difference. Seeds are drawn jointly for the two groups when they hold the same seeds (matched
runs: seed s of every variant saw the same data order and started from the same shared
weights), independently otherwise; windows are drawn jointly for every member when all scored
the same tokens, per member otherwise. With few seeds the seed level is coarse: n = 3 seeds
give 10 distinct resamples of the members, and a bootstrap of a mean of n values has variance
(n − 1)/n of the usual estimate, so the interval is narrower than a t interval over seeds
would be; treat "excludes 0" at n = 3 as indicative.

All draws come from numpy's default_rng(seed), one generator per interval, so every interval
is reproducible and does not depend on which other intervals were computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qbench.recipe.schema import BootstrapSpec


@dataclass(frozen=True)
class Interval:
    """A statistic's value on all the data and its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def excludes(self, value: float = 0.0) -> bool:
        """True when `value` lies outside [low, high]."""
        return not self.low <= value <= self.high

    def format(self, pattern: str, signed: bool = False, scale: float = 1.0) -> str:
        """'estimate [low, high]', each times `scale` with `pattern` (e.g. '{:.3f}'), with a
        sign on every number if `signed` (as format's '+')."""

        def shown(x: float) -> str:
            text = pattern.format(scale * x)
            return f"+{text}" if signed and not text.startswith("-") else text

        return f"{shown(self.estimate)} [{shown(self.low)}, {shown(self.high)}]"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Windows:
    """One cell's perplexity windows: summed NLL (nats) and predicted tokens per window, and
    the hash of their token ids."""

    nll: np.ndarray
    tokens: np.ndarray
    sha: str

    def perplexity(self, index: np.ndarray | None = None) -> np.ndarray | float:
        """exp(sum NLL / sum tokens) over all windows, or per row of an index array."""
        if index is None:
            return float(np.exp(self.nll.sum() / self.tokens.sum()))
        return np.exp(self.nll[index].sum(axis=-1) / self.tokens[index].sum(axis=-1))


def _percentiles(values: np.ndarray, spec: BootstrapSpec) -> tuple[float, float]:
    alpha = 1 - spec.confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _interval(estimate: float, values: np.ndarray, spec: BootstrapSpec) -> Interval:
    return Interval(float(estimate), *_percentiles(values, spec))


def _draw(rng: np.random.Generator, count: int, spec: BootstrapSpec) -> np.ndarray:
    """[iterations, count] indices drawn with replacement from range(count)."""
    return rng.integers(0, count, size=(spec.iterations, count))


def paired_perplexity(
    fp: Windows, quantized: Windows, spec: BootstrapSpec
) -> tuple[Interval, Interval]:
    """(quantized − fp, quantized / fp) perplexity with intervals over the same windows.

    Raises ValueError when the two cells did not score the same tokens.
    """
    if fp.sha != quantized.sha or len(fp.nll) != len(quantized.nll):
        raise ValueError("the two cells did not score the same windows")
    index = _draw(np.random.default_rng(spec.seed), len(fp.nll), spec)
    base, value = fp.perplexity(index), quantized.perplexity(index)
    full_base, full_value = fp.perplexity(), quantized.perplexity()
    return (
        _interval(full_value - full_base, value - base, spec),
        _interval(full_value / full_base, value / base, spec),
    )


def paired_scores(
    fp: Sequence[np.ndarray], quantized: Sequence[np.ndarray], spec: BootstrapSpec
) -> Interval:
    """Δ of the mean over tasks of each task's mean document score (quantized − fp), with
    documents resampled within each task; fp[t] and quantized[t] score the same documents.

    Raises ValueError when a task's two score lists differ in length or are empty.
    """
    rng = np.random.default_rng(spec.seed)
    estimate, resampled = 0.0, np.zeros(spec.iterations)
    for base, value in zip(fp, quantized, strict=True):
        if len(base) != len(value) or len(base) == 0:
            raise ValueError("the two cells did not score the same documents")
        difference = np.asarray(value, dtype=float) - np.asarray(base, dtype=float)
        estimate += difference.mean()
        resampled += difference[_draw(rng, len(difference), spec)].mean(axis=1)
    return _interval(estimate / len(fp), resampled / len(fp), spec)


Member = tuple[Windows, Windows]  # (fp, quantized) of one checkpoint


@dataclass(frozen=True)
class Degradation:
    """Variant − baseline mean ×fp with its interval, and how the resamples were drawn."""

    difference: Interval
    paired_seeds: bool
    shared_windows: bool


def group_degradation(members: Sequence[Member], spec: BootstrapSpec) -> Interval:
    """The mean ×fp (quantized / fp perplexity) over a group's members, with an interval
    from the hierarchical bootstrap over members (seeds) and windows."""
    rng = np.random.default_rng(spec.seed)
    ratios, _ = _member_ratios(members, rng, spec)
    means = _seed_means(ratios, _draw(rng, len(members), spec))
    return _interval(_full_mean(members), means, spec)


def degradation_difference(
    variant: Sequence[Member],
    baseline: Sequence[Member],
    spec: BootstrapSpec,
    paired_seeds: bool,
) -> Degradation:
    """Mean ×fp of `variant`'s members minus the baseline's, by the hierarchical bootstrap
    of the module docstring. With `paired_seeds`, variant[i] and baseline[i] are the same
    seed and are drawn together.

    Raises ValueError when a member's fp and quantized cells scored different windows, or
    paired groups differ in size.
    """
    if paired_seeds and len(variant) != len(baseline):
        raise ValueError("paired seeds need the same number of members in both groups")
    rng = np.random.default_rng(spec.seed)
    ratios, shared = _member_ratios([*variant, *baseline], rng, spec)
    seeds_v = _draw(rng, len(variant), spec)
    seeds_b = seeds_v if paired_seeds else _draw(rng, len(baseline), spec)
    resampled = _seed_means(ratios[: len(variant)], seeds_v)
    resampled -= _seed_means(ratios[len(variant) :], seeds_b)
    estimate = _full_mean(variant) - _full_mean(baseline)
    return Degradation(_interval(estimate, resampled, spec), paired_seeds, shared)


def _member_ratios(
    members: Sequence[Member], rng: np.random.Generator, spec: BootstrapSpec
) -> tuple[np.ndarray, bool]:
    """[members, iterations] ×fp per window resample, and whether all members share the
    windows (then one draw of windows serves every member; else each member draws its own)."""
    if any(fp.sha != quantized.sha for fp, quantized in members):
        raise ValueError("a checkpoint's fp and quantized cells did not score the same windows")
    shared = len({fp.sha for fp, _ in members}) == 1
    common = _draw(rng, len(members[0][0].nll), spec) if shared else None
    ratios = [
        quantized.perplexity(index) / fp.perplexity(index)
        for fp, quantized in members
        for index in [common if shared else _draw(rng, len(fp.nll), spec)]
    ]
    return np.stack(ratios), shared


def _seed_means(ratios: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Per resample b, the mean of ratios[seeds[b, j], b] over the drawn members j."""
    rows = np.arange(ratios.shape[1])[:, None]
    return ratios[seeds, rows].mean(axis=1)


def _full_mean(members: Sequence[Member]) -> float:
    return float(np.mean([quantized.perplexity() / fp.perplexity() for fp, quantized in members]))
