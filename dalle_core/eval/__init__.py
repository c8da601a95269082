"""Evaluation: FID / IS / blur, contrastive FD, human-eval aggregation."""

from dalle_core.eval.human import aggregate_votes, majority, wilson_interval

__all__ = ["aggregate_votes", "majority", "wilson_interval"]
