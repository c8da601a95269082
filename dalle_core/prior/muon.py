"""Muon for the prior's hidden matrices, AdamW for the rest: a laptop-profile choice, not the paper's.

The paper trains the transformer with AdamW (appendix B: betas 0.9 / 0.96, eps 1e-8,
weight decay 4.5e-2; `model.build_optimizer`), and its presets keep it. The 2-core
demo gives the prior ~900 updates, the foot of its learning curve, so what one update
learns is what the demo shows. Muon (K. Jordan et al. 2024, "Muon: an optimizer for
hidden layers"; `torch.optim.Muon`) replaces a weight matrix's momentum by the nearest
semi-orthogonal matrix (five Newton-Schulz iterations), so that every direction of the
update moves at the same rate instead of the few the raw gradient favours. Measured on
the demo's codes (docs/benchmarks.md, "Muon for the laptop profiles' prior"): at 900
updates a held-out draw matches ~2.5x as often as with AdamW, at no measurable cost in
the step.

What goes where, as Muon's authors (and Moonlight, "Muon is scalable for LLM
training", 2025) do: the 2-D weights inside the resblocks (attention qkv and output,
MLP in and out) take Muon; the embeddings, the two heads, LayerNorm gains and biases
take AdamW with the config's (the paper's) settings. Weight decay is decided as for
AdamW alone (`model.optimizer_param_groups`: the resblocks' matrices decay). Muon's
step per matrix is `lr x muon_lr_ratio x 0.2 sqrt(max(rows, cols))` (torch's
"match_rms_adamw": Moonlight's scale, which gives the orthogonalised update the RMS of
an AdamW update, so one schedule serves both; `muon_lr_ratio` then says how much
faster the matrices move than AdamW would move them).

Why a container of two optimizers and not one class: torch has no optimizer that
runs Muon on some parameters and AdamW on others, and the trainer, the per-resblock
gradient scaler and the checkpoints need one object: `param_groups` (the trainer
sets every group's rate from the schedule, x the group's `lr_ratio`), `step`,
`zero_grad`; DCP's `get_state_dict` / `set_state_dict` take the list in
`optimizers` (dalle_core.distributed.checkpoint), and a resumed run equals an
uninterrupted one (tests/test_muon.py).

Sharded parameters (FSDP2 inside a machine): Newton-Schulz must see each whole matrix,
not each rank's rows. torch's Muon works on the DTensors, whose matmuls gather what
they need, so the whole matrix is orthogonalised: a 4-rank run follows one process
(tests/test_distributed.py; in fp32 arithmetic the update of a 2-rank shard equals the
unsharded one to 6e-7, against 4e-2 for shard-by-shard orthogonalisation). That costs
collectives inside every Newton-Schulz step: fine for the laptop profiles, not measured
at scale, where the paper presets keep AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# the name of the extra key a param group carries: its rate = the schedule's x this
LR_RATIO = "lr_ratio"


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The resblocks' 2-D weights (what Muon is for): not embeddings, heads, gains or biases."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and n.startswith("blocks.")]


class MuonWithAdamW:
    """Muon on `hidden_matrices(model)`, AdamW on every other parameter, stepped as one optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # the inner optimizers' own group dicts: a rate set here is the rate they step with
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

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
        """Both optimizers' own state dicts (id-keyed); the checkpoints use DCP instead."""
        return {"muon": self.optimizers[0].state_dict(), "adamw": self.optimizers[1].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizers[0].load_state_dict(state["muon"])
        self.optimizers[1].load_state_dict(state["adamw"])

    def __repr__(self) -> str:
        n = [sum(p.numel() for g in o.param_groups for p in g["params"]) for o in self.optimizers]
        return f"MuonWithAdamW(muon: {n[0]:,} parameters, adamw: {n[1]:,})"


def build_muon_with_adamw(model: nn.Module, config: Any, param_groups: list[dict[str, Any]]) -> MuonWithAdamW:
    """`config`: a PriorTrainingConfig; `param_groups`: the AdamW groups of the whole model
    (`model.optimizer_param_groups`), from which the hidden matrices are taken out."""
    mats = [p for _, p in hidden_matrices(model)]
    if not mats:
        raise ValueError("optimizer='muon': the model has no 2-D weights inside its resblocks")
    ids = {id(p) for p in mats}
    rest = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in param_groups]
    rest = [g for g in rest if g["params"]]
    adamw = torch.optim.AdamW(rest, lr=config.lr, betas=config.betas, eps=config.eps)
    muon = torch.optim.Muon(mats, lr=config.lr * config.muon_lr_ratio, weight_decay=config.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    for g in muon.param_groups:
        g[LR_RATIO] = config.muon_lr_ratio
    return MuonWithAdamW(muon, adamw)


__all__ = ["LR_RATIO", "MuonWithAdamW", "build_muon_with_adamw", "hidden_matrices"]
