"""Sink tokens kept in float: which tokens of each forward call keep unrounded activations and
KV (a quantizer's `keep_float:` tokens; the rules: qbench.quant.steps.sinks).

`TokenExemption` is installed on a rounded model (`exempt_tokens`): a forward pre-hook on the
model decides, once per call, a bool mask [batch, tokens] of the tokens that stay in float, and
every rounded linear (`QuantLinear`) and KV step (`KVTransform`) reads it while the call runs:
their rows of those tokens are neither rounded nor part of any scale
(qbench.quant.formats.fake.fake_quant_except). A forward hook clears it when the call ends.

- positions: from the call's `position_ids` (generation passes them, padding-aware), else
  0..t-1 after the tokens a KV cache already holds;
- outlier tokens: a pre-pass through the decoder (the same rounded weights) with every token
  in float (the mask all true) measures m_l[b, t] = max_c |h_l[b, t, c]| after each decoder
  block l; a token is an outlier of its sequence where m_l > ratio x median_t m_l[b, t] in some
  block. Refused for a call that extends a KV cache (its sequence's other tokens are not in it).
- the KV cache: the keys of a call that extends a cache are the cached tokens' then the call's;
  the mask of the cached ones is kept from the calls that put them there.

Counts (`report`): the tokens of every call (a token counted once, not once per layer) and
those kept in float, for the cell's record (a meter: qbench.quant.walk.meters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbench.errors import QBenchError
from qbench.quant.steps.sinks import KeepFloat
from qbench.quant.walk.inventory import Inventory
from qbench.quant.walk.meters import add_meter


class TokenExemption:
    """The tokens of the current forward call that keep float activations and KV (module
    docstring). `current` [batch, tokens] (None between calls); `keys` [batch, cached + call
    tokens]; `kept` / `total`: tokens counted so far."""

    key = "float_tokens"

    def __init__(self, rule: KeepFloat, decoder: nn.Module, blocks: nn.ModuleList, roles: list):
        self.rule, self.decoder, self.blocks, self.roles = rule, decoder, blocks, roles
        self.current: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self._detecting = False
        self.reset()

    def reset(self) -> None:
        self.kept = self.total = 0

    # ------------------------------------------------------------ what the rounding reads

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The mask for an activation x [..., features] of the current call: shape x.shape[:-1]
        (x's leading dimensions must hold the call's tokens in order: [b, t] or [b * t])."""
        mask = self._current()
        if x.shape[:-1].numel() != mask.numel():
            raise QBenchError(
                f"keep_float tokens: an input of {x.shape[:-1].numel()} rows in a call of "
                f"{mask.numel()} tokens: this layer does not see the sequence's tokens"
            )
        return mask.reshape(x.shape[:-1])

    def key_rows(self, key: torch.Tensor) -> torch.Tensor:
        """The mask for keys / values [batch, heads, tokens, head_dim]: [batch, 1, tokens]."""
        self._current()
        if self.keys is None or self.keys.shape != (key.shape[0], key.shape[2]):
            have = None if self.keys is None else tuple(self.keys.shape)
            raise QBenchError(
                f"keep_float tokens: attention holds {key.shape[2]} keys of {key.shape[0]} "
                f"sequences, the calls so far {have}: a cache qbench did not fill"
            )
        return self.keys[:, None, :]

    def _current(self) -> torch.Tensor:
        if self.current is None:
            raise QBenchError(
                "keep_float tokens: a rounded layer ran outside a forward call of the model, so "
                "its tokens' positions are unknown; call the model itself"
            )
        return self.current

    # ------------------------------------------------------------ hooks

    def begin(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """The model's forward pre-hook: this call's mask, counted."""
        if self._detecting:  # the pre-pass of a model that is its own decoder
            return
        inputs = {
            "input_ids": kwargs.get("input_ids", args[0] if args else None),
            "inputs_embeds": kwargs.get("inputs_embeds"),
            "attention_mask": kwargs.get("attention_mask"),
            "position_ids": kwargs.get("position_ids"),
        }
        given = next(inputs[k] for k in ("input_ids", "inputs_embeds") if inputs[k] is not None)
        shape, device = given.shape[:2], given.device
        past = _cached_tokens(kwargs.get("past_key_values"))
        mask = torch.zeros(shape, dtype=torch.bool, device=device)
        if self.rule.first_tokens:
            positions = inputs["position_ids"]
            if positions is None:
                positions = past + torch.arange(shape[1], device=device)
            mask |= (positions < self.rule.first_tokens).expand(shape)
        if self.rule.outlier_tokens is not None:
            if past:
                raise QBenchError(
                    "keep_float.outlier_tokens judges a token against its sequence's median "
                    "token: a call that extends a KV cache (generation) has not its sequence; "
                    "use first_tokens for generation"
                )
            mask |= self._outliers(inputs, torch.ones_like(mask))
        self.current = mask
        self.keys = mask if not past or self.keys is None else torch.cat((self.keys, mask), 1)
        self.kept += int(mask.sum())
        self.total += mask.numel()

    def end(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """The model's forward hook (also on an exception): no call runs."""
        if not self._detecting:
            self.current = None

    @torch.no_grad()
    def _outliers(self, inputs: dict[str, Any], everything: torch.Tensor) -> torch.Tensor:
        """[batch, tokens]: PrefixQuant's outlier tokens of the call with `inputs`, measured in
        a pre-pass through the decoder with every token in float (`everything`: all true)."""
        peaks: list[torch.Tensor] = []

        def measure(_: nn.Module, __: tuple, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            peaks.append(h.detach().abs().amax(dim=-1).float())  # [b, t]

        handles = [block.register_forward_hook(measure) for block in self.blocks]
        self._detecting, self.current, self.keys = True, everything, everything
        try:
            self.decoder(**inputs, use_cache=False)
        finally:
            self._detecting = False
            for handle in handles:
                handle.remove()
        m = torch.stack(peaks)  # [blocks, b, t]
        median = m.median(dim=-1, keepdim=True).values  # [blocks, b, 1]: the median token's
        return (m > self.rule.outlier_tokens.ratio * median).any(dim=0).to(everything.device)

    # ------------------------------------------------------------ the record

    def report(self) -> dict[str, Any]:
        """{rule, roles (activations / kv: what the rule keeps in float), tokens: [kept,
        total]} over every call so far."""
        rule = self.rule.tokens_label()
        return {"rule": rule, "roles": self.roles, "tokens": [self.kept, self.total]}


def _cached_tokens(cache: Any) -> int:
    """Tokens a transformers cache already holds (0 for none)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def exempt_tokens(model: nn.Module, found: Inventory, rule: KeepFloat, kv_sites: list) -> None:
    """Keep the tokens `rule` names in float in every rounded linear of `model` with rounded
    inputs and in every KV step of `kv_sites` (qbench.quant.walk.kvcache.KVSite)."""
    from qbench.quant.walk.linear import rounded_linear

    linears = [m for t in found.targets.values() if (m := rounded_linear(t.module)) is not None]
    linears = [m for m in linears if m.activations is not None]
    roles = (["activations"] if linears else []) + (["kv"] if kv_sites else [])
    decoder = model.get_submodule(found.blocks_path.rpartition(".")[0])
    exemption = TokenExemption(rule, decoder, found.blocks, roles)
    for module in linears:
        module.float_tokens = exemption
    for site in kv_sites:
        site.transform.float_tokens = exemption
    model.register_forward_pre_hook(exemption.begin, with_kwargs=True)
    model.register_forward_hook(exemption.end, with_kwargs=True, always_call=True)
    add_meter(model, exemption)
