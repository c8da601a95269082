"""Two priors with the same weights, one per way of computing attention."""

from __future__ import annotations

import torch

from dalle_core.prior import DalleTransformer, PriorConfig


def sdpa_and(cfg: PriorConfig, attention: str) -> tuple[DalleTransformer, DalleTransformer]:
    """(the SDPA model, the same weights with `PriorConfig.attention = attention`)."""
    torch.manual_seed(0)
    sdpa = DalleTransformer(cfg.replace(attention="sdpa"))
    other = DalleTransformer(cfg.replace(attention=attention))
    other.load_state_dict(sdpa.state_dict())
    return sdpa, other
