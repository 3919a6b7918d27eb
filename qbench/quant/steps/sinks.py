"""Sink-aware quantization: what a quantizer keeps in float beside its rounding (`keep_float:`).

    - name: rtn-w4a4-sink
      method: rtn
      weights: {bits: 4}
      activations: {bits: 4}
      kv: {bits: 4}
      keep_float:
        first_tokens: 1                  # IntactKV / PrefixQuant: the sink token(s)
        outlier_tokens: {ratio: 64}      # PrefixQuant's outlier-token rule
        super_weights: {max_count: 2}    # Yu et al. 2024: held out of the rounding

Tokens (the arithmetic: qbench.quant.walk.tokens). A token kept in float keeps its activations
(the input of every rounded linear) and its keys and values unrounded, in every layer; the other
tokens' scales never see it (its rows are left out of every dynamic scale, so a per-sequence
scale, `granularity: tensor`, is that of the other tokens). Which tokens, per sequence:
- `first_tokens: n`: positions 0..n-1 (IntactKV, Liu et al. 2024, keeps the KV of the [BOS] /
  prefix "pivot" tokens in full precision; PrefixQuant, Chen et al. 2024, prefixes the outlier
  tokens in a full-precision KV cache);
- `outlier_tokens: {ratio: r}`: PrefixQuant's outlier-token rule. With m_l[t] = max_c |h_l[t, c]|
  the largest magnitude of token t in the residual stream after decoder block l (the block's
  output), token t is an outlier token of its sequence when m_l[t] > r x median_t' m_l[t'] in any
  block l (the median over the sequence's tokens); r = 64 is PrefixQuant's eta. The residual
  stream is measured in a pre-pass of each forward call through the same model (its rounded
  weights) with activations and KV in float, so the same tokens stay in float in every layer.
  A call that extends a KV cache (generation) cannot be judged against its sequence: refused.

Super weights (the search: qbench.quant.methods.superweights): found on the model the rounding
receives (after the transforms) from the MLP output projections' activation spikes, as Yu et
al. and qbench's diagnostics find them; each is held out of its row's rounding (set to 0 while
the row is rounded, so it sets no scale, GPTQ's error feedback included) and put back in float.

This module imports no torch: recipes are validated with it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from qbench.config import StrictModel
from qbench.data.calibration import CalibrationSpec

PREFIXQUANT_RATIO = 64.0  # PrefixQuant's eta: a token's max |x| over the median token's


def search_calibration() -> CalibrationSpec:
    """A few windows suffice to see a spike that every sequence has (Yu et al.: one prompt)."""
    return CalibrationSpec(sequences=4, seq_len=128, batch_size=4)


class SuperWeightSearch(StrictModel):
    """Yu et al.'s iterative super-weight search on calibration text.

    Each round runs the windows through the model; at every MLP output projection (down_proj,
    fc2, ...: an MLP target that writes the residual stream) it takes the input channel (column
    c) with the largest |x| and the output channel (row r) with the largest |y|. The candidate
    W[r, c] whose output spike max|y_r| is at least `min_ratio` times the median output channel's
    max|y| and whose max|x_c| x max|y_r| is the largest is a super weight; it is zeroed for the
    following rounds (then put back), up to `max_count` weights (Yu et al. report 1 to 6 per
    model). A model without such a spike has none.
    """

    max_count: int = Field(default=4, ge=1, le=64)
    min_ratio: float = Field(default=100.0, gt=1)
    calibration: CalibrationSpec = Field(default_factory=search_calibration)

    def search_label(self) -> str:
        return f"≤{self.max_count}, spike ≥{self.min_ratio:g}x median channel"


class OutlierTokens(StrictModel):
    """PrefixQuant's outlier-token rule (see the module docstring): `ratio` over the median."""

    ratio: float = Field(default=PREFIXQUANT_RATIO, gt=1)


class KeepFloat(StrictModel):
    """What a quantizer keeps unrounded beside its rounding (see the module docstring)."""

    first_tokens: int = Field(default=0, ge=0, le=4096)
    outlier_tokens: OutlierTokens | None = None
    super_weights: SuperWeightSearch | None = None

    @model_validator(mode="after")
    def _something_kept(self) -> KeepFloat:
        if not self.tokens and self.super_weights is None:
            raise ValueError(
                "keeps nothing: give first_tokens: <n>, outlier_tokens: {ratio: ...} and/or "
                "super_weights: {...}, or remove keep_float"
            )
        return self

    @property
    def tokens(self) -> bool:
        """Whether some tokens keep float activations and KV."""
        return self.first_tokens > 0 or self.outlier_tokens is not None

    def token_rule(self) -> str:
        """Which tokens, e.g. 'first 1 token + outlier tokens' ('' if none)."""
        parts = []
        if self.first_tokens:
            parts.append(f"first {self.first_tokens} token{'s' if self.first_tokens > 1 else ''}")
        if self.outlier_tokens is not None:
            parts.append("outlier tokens")
        return " + ".join(parts)

    def qualifiers(self) -> list[str]:
        """What the precision label adds, e.g. ['first 1 token fp', 'super weights fp']."""
        found = [f"{self.token_rule()} fp"] if self.tokens else []
        return found + (["super weights fp"] if self.super_weights is not None else [])

    def label(self) -> str:
        """The leaderboard's description, e.g. 'fp: first 1 token, outlier tokens
        (residual peak > 64x median token's), super weights (≤4, spike ≥100x median
        channel)' (no '|': it reads in a markdown table)."""
        parts = [self.tokens_label()] if self.tokens else []
        if self.super_weights is not None:
            parts.append(f"super weights ({self.super_weights.search_label()})")
        return "fp: " + ", ".join(parts)

    def tokens_label(self) -> str:
        """Which tokens, with the rule's figures: 'first 1 token, outlier tokens (residual
        peak > 64x median token's)' ('' if none)."""
        parts = [self.token_rule().replace(" + outlier tokens", "")] if self.first_tokens else []
        if self.outlier_tokens is not None:
            ratio = self.outlier_tokens.ratio
            parts.append(f"outlier tokens (residual peak > {ratio:g}x median token's)")
        return ", ".join(parts)
