"""Muon for a model's weight matrices, AdamW for the rest: a laptop-profile choice, not the paper's.

The paper trains with AdamW (the prior: appendix B, betas 0.9 / 0.96, eps 1e-8, weight
decay 4.5e-2; the dVAE: appendix A.2), and its presets keep it. The 2-core demo gives
the prior ~1,000 updates and the reranker 400, the foot of their learning curves, so what
one update learns is what the demo shows. Muon (K. Jordan et al. 2024, "Muon: an
optimizer for hidden layers"; `torch.optim.Muon`) replaces a weight matrix's momentum
by the nearest semi-orthogonal matrix (five Newton-Schulz iterations), so that every
direction of the update moves at the same rate instead of the few the raw gradient
favours. Measured on the demo (docs/benchmarks.md, "Muon for the laptop profiles'
prior"): at 900 updates a held-out draw of the small prior matches ~3x as often, an
update costing ~1.1-1.2x; the small reranker at 200 updates picks the true image among
8 near-misses ~1.7x as often.

What goes where, as Muon's authors (and Moonlight, "Muon is scalable for LLM
training", 2025) do: the 2-D weights of the linear layers inside the network take
Muon (the model decides which: `dalle_core.prior.model.hidden_matrices`,
`dalle_core.rerank.train.reranker_matrices`); embeddings, output heads, gains, biases
and convolutions (4-D: torch's Muon takes matrices only) take AdamW with the config's
settings. Weight decay as for AdamW alone. Muon's step per matrix is `lr x
muon_lr_ratio x 0.2 sqrt(max(rows, cols))` (torch's "match_rms_adamw": Moonlight's
scale, which gives the orthogonalised update the RMS of an AdamW update, so one
schedule serves both; `muon_lr_ratio` then says how much faster the matrices move).

Why a container of two optimizers and not one class: torch has no optimizer that runs
Muon on some parameters and AdamW on others, and the trainers, the per-resblock
gradient scaler and the checkpoints need one object: `param_groups` (the trainers set
every group's rate from their schedule, x the group's `lr_ratio`), `step`,
`zero_grad`, `state_dict`; DCP's `get_state_dict` / `set_state_dict` take the list in
`optimizers` (dalle_core.distributed.checkpoint). Resumed runs equal uninterrupted
ones (tests/test_muon.py).

Sharded parameters (FSDP2 inside a machine): Newton-Schulz must see each whole matrix,
not each rank's rows. torch's Muon works on the DTensors, whose matmuls gather what
they need, so the whole matrix is orthogonalised: a 4-rank prior run follows one
process (tests/test_distributed.py; in fp32 arithmetic the update of a 2-rank shard
equals the unsharded one to 6e-7, against 4e-2 for shard-by-shard orthogonalisation).
That costs collectives inside every Newton-Schulz step: fine for the laptop profiles,
not measured at scale, where the paper presets keep AdamW.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

# the extra key a param group carries: its rate = the trainer's schedule x this
LR_RATIO = "lr_ratio"


class MuonWithAdamW:
    """Muon on some matrices, AdamW on every other parameter, stepped as one optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # the inner optimizers' own group dicts: a rate set here is the rate they step with
        return [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Both optimizers' own state dicts (the prior's checkpoints use DCP instead)."""
        return {"muon": self.optimizers[0].state_dict(), "adamw": self.optimizers[1].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a MuonWithAdamW state dict (an AdamW checkpoint?): keys "
                             f"{sorted(state)[:4]}")
        self.optimizers[0].load_state_dict(state["muon"])
        self.optimizers[1].load_state_dict(state["adamw"])

    def __repr__(self) -> str:
        n = [sum(p.numel() for g in o.param_groups for p in g["params"]) for o in self.optimizers]
        return f"MuonWithAdamW(muon: {n[0]:,} parameters, adamw: {n[1]:,})"


def build_muon_with_adamw(matrices: Sequence[torch.nn.Parameter], param_groups: list[dict[str, Any]], *,
                          lr: float, muon_lr_ratio: float, weight_decay: float,
                          betas: tuple[float, float], eps: float) -> MuonWithAdamW:
    """`matrices` on Muon (decay `weight_decay`); `param_groups`, the AdamW groups of the
    whole model, less those matrices, on AdamW."""
    if not matrices:
        raise ValueError("optimizer='muon': the model has no weight matrices for Muon")
    if any(p.ndim != 2 for p in matrices):
        raise ValueError("Muon takes 2-D weight matrices only")
    ids = {id(p) for p in matrices}
    rest = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in param_groups]
    adamw = torch.optim.AdamW([g for g in rest if g["params"]], lr=lr, betas=betas, eps=eps)
    muon = torch.optim.Muon(list(matrices), lr=lr * muon_lr_ratio, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    for g in muon.param_groups:
        g[LR_RATIO] = muon_lr_ratio
    return MuonWithAdamW(muon, adamw)


__all__ = ["LR_RATIO", "MuonWithAdamW", "build_muon_with_adamw"]
