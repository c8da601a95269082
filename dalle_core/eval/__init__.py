"""Evaluation: FID / IS / blur, contrastive FD, human-eval aggregation."""

from dalle_core.eval.blur import blur_images
from dalle_core.eval.features import FeatureCache
from dalle_core.eval.frechet import frechet_distance, frechet_distance_from_features
from dalle_core.eval.human import aggregate_votes, majority, wilson_interval
from dalle_core.eval.inception import InceptionMetrics, NotComputed
from dalle_core.eval.precision_recall import precision_recall
from dalle_core.eval.report import render_report
from dalle_core.eval.zero_shot import zero_shot_metrics

__all__ = ["aggregate_votes", "majority", "wilson_interval", "blur_images", "FeatureCache", "frechet_distance",
           "frechet_distance_from_features", "InceptionMetrics", "NotComputed", "precision_recall",
           "render_report", "zero_shot_metrics"]
