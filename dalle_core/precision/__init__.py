"""Mixed precision as the paper trains the 12B prior (section 2.4): fp16 with
per-resblock gradient scaling (`PerResblockGradScaler`, `ScaledResblock`,
`apply_per_resblock_grad_scaling`)."""

from .grad_scaling import PerResblockGradScaler, ScaledResblock, apply_per_resblock_grad_scaling

__all__ = ["PerResblockGradScaler", "ScaledResblock", "apply_per_resblock_grad_scaling"]
