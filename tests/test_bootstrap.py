"""Paired bootstrap intervals against independent computations: a direct numpy loop,
scipy.stats.bootstrap, and cases whose spread is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qbench.recipe.schema import BootstrapSpec
from qbench.report.bootstrap import (
    Windows,
    degradation_difference,
    group_degradation,
    paired_perplexity,
    paired_scores,
)

SPEC = BootstrapSpec(iterations=2000, seed=3)


def _windows(nll: np.ndarray, tokens: int = 127, sha: str = "same") -> Windows:
    return Windows(np.asarray(nll, dtype=float), np.full(len(nll), tokens), sha)


def _pair(rng: np.random.Generator, count: int = 64, shift: float = 0.05, sha: str = "same"):
    """fp and quantized windows: shared difficulty per window, a noisy extra NLL per token."""
    fp = rng.gamma(20.0, 20.0, size=count)
    quantized = fp + 127 * (shift + 0.02 * rng.standard_normal(count))
    return _windows(fp, sha=sha), _windows(quantized, sha=sha)


def test_paired_perplexity_equals_a_direct_loop():
    rng = np.random.default_rng(0)
    fp, quantized = _pair(rng)
    delta, ratio = paired_perplexity(fp, quantized, SPEC)

    draws = np.random.default_rng(SPEC.seed)
    deltas, ratios = [], []
    for _ in range(SPEC.iterations):
        index = draws.integers(0, len(fp.nll), size=len(fp.nll))
        base = math.exp(fp.nll[index].sum() / (127 * len(index)))
        value = math.exp(quantized.nll[index].sum() / (127 * len(index)))
        deltas.append(value - base)
        ratios.append(value / base)
    base = math.exp(fp.nll.sum() / (127 * len(fp.nll)))
    value = math.exp(quantized.nll.sum() / (127 * len(fp.nll)))
    assert delta.estimate == pytest.approx(value - base, rel=1e-12)
    assert ratio.estimate == pytest.approx(value / base, rel=1e-12)
    assert (delta.low, delta.high) == pytest.approx(tuple(np.quantile(deltas, [0.025, 0.975])))
    assert (ratio.low, ratio.high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
    assert delta.excludes(0) and ratio.low > 1


def test_pairing_cancels_the_windows_shared_difficulty():
    """Unpaired (fp and quantized windows drawn separately), the spread of window difficulty
    would dominate; paired, only the per-window quantization noise is left."""
    rng = np.random.default_rng(1)
    fp, quantized = _pair(rng, count=256)
    delta, _ = paired_perplexity(fp, quantized, SPEC)
    draws = np.random.default_rng(7)
    unpaired = [
        quantized.perplexity(draws.integers(0, 256, 256))
        - fp.perplexity(draws.integers(0, 256, 256))
        for _ in range(2000)
    ]
    width = np.subtract(*np.quantile(unpaired, [0.975, 0.025]))
    assert delta.high - delta.low < width / 5


def test_cells_on_other_windows_are_refused():
    rng = np.random.default_rng(2)
    fp, _ = _pair(rng, sha="a")
    _, quantized = _pair(rng, sha="b")
    with pytest.raises(ValueError, match="same windows"):
        paired_perplexity(fp, quantized, SPEC)


def test_score_interval_has_the_known_width_of_a_mean_difference():
    """Differences with standard deviation σ over n documents: the 95% interval of their
    mean is ±1.96 σ/√n (normal approximation, exact enough at n = 4000)."""
    rng = np.random.default_rng(4)
    n, sigma = 4000, 0.5
    fp = rng.integers(0, 2, n).astype(float)
    quantized = fp + rng.normal(-0.03, sigma, n)
    interval = paired_scores([fp], [quantized], BootstrapSpec(iterations=4000, seed=0))
    half = 1.96 * np.std(quantized - fp, ddof=1) / math.sqrt(n)
    assert interval.estimate == pytest.approx(np.mean(quantized - fp))
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.06)


def _scipy_paired(a: np.ndarray, b: np.ndarray):
    """scipy's paired percentile bootstrap interval of mean(a) − mean(b), 20000 resamples."""
    return stats.bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        random_state=np.random.default_rng(9),
    ).confidence_interval


def test_score_interval_agrees_with_scipy_paired_bootstrap():
    rng = np.random.default_rng(5)
    fp = rng.integers(0, 2, 500).astype(float)
    flips = rng.random(500) < 0.15
    quantized = np.where(flips, 1 - fp, fp)
    ours = paired_scores([fp], [quantized], BootstrapSpec(iterations=20000, seed=1))
    reference = _scipy_paired(quantized, fp)
    width = reference.high - reference.low
    assert ours.low == pytest.approx(reference.low, abs=0.05 * width)
    assert ours.high == pytest.approx(reference.high, abs=0.05 * width)


def test_average_over_tasks_resamples_each_task_within_itself():
    """Two tasks of very different sizes: the interval of the average of their Δs has the
    variance (v1/n1 + v2/n2)/4, not that of the pooled documents."""
    rng = np.random.default_rng(6)
    small = rng.normal(0.0, 1.0, 100), rng.normal(-0.2, 1.0, 100)
    large = rng.normal(0.0, 0.2, 5000), rng.normal(-0.1, 0.2, 5000)
    interval = paired_scores(
        [small[0], large[0]], [small[1], large[1]], BootstrapSpec(iterations=8000, seed=0)
    )
    d1, d2 = small[1] - small[0], large[1] - large[0]
    assert interval.estimate == pytest.approx((d1.mean() + d2.mean()) / 2)
    sd = math.sqrt(d1.var(ddof=1) / 100 + d2.var(ddof=1) / 5000) / 2
    assert (interval.high - interval.low) / 2 == pytest.approx(1.96 * sd, rel=0.08)
    with pytest.raises(ValueError, match="same documents"):
        paired_scores([d1], [d2], SPEC)


def _constant_ratio_member(rng: np.random.Generator, log_ratio: float, windows: int = 32):
    """A member whose ×fp is exp(log_ratio) on every window resample (no window noise)."""
    fp = rng.gamma(20.0, 20.0, size=windows)
    return _windows(fp), _windows(fp + 127 * log_ratio)


def test_over_seeds_without_window_noise_it_is_a_paired_bootstrap_of_the_seed_means():
    """Each member's ×fp is fixed, so only the seed level varies: the interval is scipy's
    paired percentile bootstrap of mean(variant) − mean(baseline) over seeds."""
    rng = np.random.default_rng(8)
    seeds = 30
    base_logs = rng.normal(0.04, 0.01, seeds)  # seed-to-seed spread, shared by both groups
    variant_logs = base_logs + rng.normal(0.005, 0.002, seeds)
    baseline = [_constant_ratio_member(rng, x) for x in base_logs]
    variant = [_constant_ratio_member(rng, x) for x in variant_logs]
    spec = BootstrapSpec(iterations=20000, seed=2)
    paired = degradation_difference(variant, baseline, spec, paired_seeds=True)
    r_v, r_b = np.exp(variant_logs), np.exp(base_logs)
    reference = _scipy_paired(r_v, r_b)
    width = reference.high - reference.low
    assert paired.difference.estimate == pytest.approx(np.mean(r_v) - np.mean(r_b))
    assert paired.difference.low == pytest.approx(reference.low, abs=0.05 * width)
    assert paired.difference.high == pytest.approx(reference.high, abs=0.05 * width)
    assert paired.paired_seeds and paired.shared_windows
    # Drawn independently, the shared seed-to-seed spread no longer cancels.
    unpaired = degradation_difference(variant, baseline, spec, paired_seeds=False)
    assert unpaired.difference.high - unpaired.difference.low > 3 * width
    assert not unpaired.difference.excludes(0) and paired.difference.excludes(0)


def test_with_one_seed_it_is_the_windows_bootstrap_of_the_ratio_difference():
    rng = np.random.default_rng(10)
    variant, baseline = _pair(rng, shift=0.06), _pair(rng, shift=0.05)
    result = degradation_difference([variant], [baseline], SPEC, paired_seeds=True)
    draws = np.random.default_rng(SPEC.seed)
    index = draws.integers(0, 64, size=(SPEC.iterations, 64))  # one draw shared by all members
    differences = [
        variant[1].perplexity(i) / variant[0].perplexity(i)
        - baseline[1].perplexity(i) / baseline[0].perplexity(i)
        for i in index
    ]
    assert (result.difference.low, result.difference.high) == pytest.approx(
        tuple(np.quantile(differences, [0.025, 0.975]))
    )
    alone = group_degradation([variant], SPEC)
    assert alone.estimate == pytest.approx(variant[1].perplexity() / variant[0].perplexity())
    assert alone.low < alone.estimate < alone.high


def test_members_on_other_tokens_draw_their_own_windows_and_fp_quantized_must_match():
    rng = np.random.default_rng(12)
    variant = [_pair(rng, sha="x"), _pair(rng, sha="x")]
    baseline = [_pair(rng, sha="y"), _pair(rng, sha="y")]
    result = degradation_difference(variant, baseline, SPEC, paired_seeds=True)
    assert not result.shared_windows
    broken = [(variant[0][0], baseline[0][1])]
    with pytest.raises(ValueError, match="same windows"):
        group_degradation(broken, SPEC)
    with pytest.raises(ValueError, match="same number"):
        degradation_difference(variant, baseline[:1], SPEC, paired_seeds=True)


def test_spec_is_validated():
    with pytest.raises(ValueError, match="greater than or equal to 100"):
        BootstrapSpec(iterations=10)
    with pytest.raises(ValueError, match=r"greater than 0\.5"):
        BootstrapSpec(confidence=0.4)
