"""Circuits found rather than written: `edges: {top: N, method: eap-ig}` (or `share:` of all
edges, or `faithfulness:` for the smallest top-ranked circuit reaching a target) on a `circuit`
claim, and MIB's integrated faithfulness (`metric: cpr | cmd` over `sizes:`). The spec class
and the measurement's steps; the tensor work is in measure/ (edge_attribution, edge_discovery,
circuit_curves)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from harness.kinds.base import Frozen

SCORE_METHODS = ("eap", "eap-ig", "exact")
SCORE_METRICS = ("logit_diff", "loss", "kl")
CURVE_METRICS = ("cpr", "cmd")


class EdgeDiscovery(Frozen):
    """How a circuit claim finds its edges: score every edge on the claim's prompts with
    `method`, then keep the `top` N, a `share` of all edges, or the fewest top-ranked edges
    whose circuit is at least `faithfulness` faithful (exactly one of the three; none with
    `metric: cpr | cmd`, which scores circuits of every size in `sizes`)."""

    method: Literal["eap", "eap-ig", "exact"] = "eap-ig"
    steps: int = Field(5, ge=1, le=1000)            # EAP-IG's interpolation steps
    score_metric: Literal["logit_diff", "loss", "kl"] = "logit_diff"
    top: int | None = Field(None, ge=1)
    share: float | None = Field(None, gt=0, le=1)
    faithfulness: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _steps_for_ig(self):
        if self.method != "eap-ig" and "steps" in self.model_fields_set:
            raise ValueError(f"`steps` is EAP-IG's number of interpolation steps; "
                             f"`method: {self.method}` takes none")
        chosen = [k for k in ("top", "share", "faithfulness") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"`edges` takes one of top, share, faithfulness; got "
                             f"{', '.join(chosen)}")
        return self

    @property
    def size_rule(self) -> str | None:
        return next((k for k in ("top", "share", "faithfulness") if getattr(self, k) is not None),
                    None)
