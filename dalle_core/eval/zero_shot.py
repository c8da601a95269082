"""Zero-shot metrics of generated images against reference images (paper section 3.2).

For each blur radius (0 = none; the paper blurs both sets with 1, 2, 4, 8):
- contrastive FD: Frechet distance in the image space of the platform's own
  contrastive model (always available, since its weights are the platform's). This is
  the reranker that *selected* the samples, so the figure is measured in the space
  that chose them and flatters them; compare it only between evaluations with the
  same fingerprint (dalle_core.eval.fairness);
- independent FD: the same in the space of a second, independent contrastive model,
  when one is given (it had no say in which sample was kept);
- FID and Inception Score, when Inception weights are configured.
At radius 0 also improved precision / recall (k = 3) in the contrastive space.

Metric names are stable (logged as-is): the base name at radius 0 and
``<name>_blur<r>`` otherwise. Metrics that could not be computed are absent
from the numbers and listed with their reason under ``not_computed``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from dalle_core.eval.blur import BLUR_SETTING, blur_images
from dalle_core.eval.features import FeatureCache
from dalle_core.eval.frechet import frechet_distance_from_features
from dalle_core.eval.images import image_set_digest, map_batches
from dalle_core.eval.inception import NO_WEIGHTS, InceptionMetrics, NotComputed
from dalle_core.eval.precision_recall import precision_recall

ContrastiveFn = Callable[[torch.Tensor], torch.Tensor]  # float [N, 3, H, W] in [0, 1] -> [N, D]
StageProgress = Optional[Callable[[str, int, int], None]]  # progress(stage, done, total)


METRIC_DESCRIPTIONS = {
    "contrastive_fd": "Frechet distance in the reranker's own image space: the model that selected the samples "
                      "(it favours them); comparable only under the same fingerprint",
    "independent_fd": "Frechet distance in an independent contrastive model's space (it did not select the samples)",
    "contrastive_precision": "improved precision, k=3, in the reranker's own space",
    "contrastive_recall": "improved recall, k=3, in the reranker's own space",
    "fid": "FID, torch-fidelity's Inception",
}


def describe_metric(name: str) -> str:
    base = name.split("_blur", 1)[0]
    text = METRIC_DESCRIPTIONS.get(base, "")
    return f"{text} (blur {name.split('_blur', 1)[1]})" if text and "_blur" in name else text


def metric_name(base: str, radius: float) -> str:
    return base if radius == 0 else f"{base}_blur{radius:g}"


def zero_shot_metrics(generated_images: Sequence[Image.Image], reference_images: Sequence[Image.Image],
                      contrastive_features_fn: ContrastiveFn,
                      inception: Union[None, NotComputed, InceptionMetrics] = None,
                      radii: Sequence[float] = (0, 1, 2, 4, 8), progress: StageProgress = None,
                      cache: Optional[FeatureCache] = None, contrastive_id: Optional[str] = None,
                      batch_size: int = 64, k: int = 3, independent_features_fn: Optional[ContrastiveFn] = None,
                      independent_id: Optional[str] = None) -> dict:
    """Flat dict of float metrics, plus 'not_computed' {name: reason} and 'settings' {name: text}.

    `contrastive_id` names the contrastive model's version; without it its features are not
    cached (a stale entry of another model could not be told apart). `independent_features_fn`:
    a second contrastive model that did not select the samples; its FD is `independent_fd`."""
    if len(generated_images) < 2 or len(reference_images) < 2:
        raise ValueError(f"need at least 2 generated and 2 reference images, got "
                         f"{len(generated_images)} and {len(reference_images)}")
    sets = {"generated": generated_images, "reference": reference_images}
    digests = {s: image_set_digest(ims) for s, ims in sets.items()} if cache is not None else {}

    def contrastive(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return contrastive_features_fn(batch.float() / 255.0).float()

    blurred: dict = {}  # (set, radius) -> images, so each set is blurred once per radius

    def feats(kind: str, extractor_id: Optional[str], run, which: str, r: float) -> dict[str, np.ndarray]:
        def compute():
            stage = f"{kind} {which} blur {r:g}"
            cb = (lambda d, t: progress(stage, d, t)) if progress else None
            if (which, r) not in blurred:
                for key in [key for key in blurred if key[1] != r]:
                    del blurred[key]  # keep one radius in memory
                blurred[(which, r)] = blur_images(sets[which], r)
            return run(blurred[(which, r)], cb)
        if cache is None or extractor_id is None:
            return compute()
        return cache.get_or_compute(extractor_id, sets[which], r, compute, set_digest=digests[which])

    run_contrastive = lambda ims, cb: {"features": map_batches(contrastive, ims, batch_size, cb)}

    def independent(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return independent_features_fn(batch.float() / 255.0).float()

    run_independent = lambda ims, cb: {"features": map_batches(independent, ims, batch_size, cb)}
    inc_reason = (inception.reason if isinstance(inception, NotComputed)
                  else NO_WEIGHTS.reason if inception is None else None)

    out: dict = {"num_generated": float(len(generated_images)), "num_reference": float(len(reference_images))}
    not_computed: dict[str, str] = {}
    for r in radii:
        g = feats("contrastive", contrastive_id, run_contrastive, "generated", r)["features"]
        ref = feats("contrastive", contrastive_id, run_contrastive, "reference", r)["features"]
        out[metric_name("contrastive_fd", r)] = frechet_distance_from_features(g, ref)
        if independent_features_fn is not None:
            gi_ = feats("independent", independent_id, run_independent, "generated", r)["features"]
            ri_ = feats("independent", independent_id, run_independent, "reference", r)["features"]
            out[metric_name("independent_fd", r)] = frechet_distance_from_features(gi_, ri_)
        if r == 0:
            if min(len(g), len(ref)) > k:
                out.update({f"contrastive_{m}": v for m, v in precision_recall(ref, g, k=k).items()})
            else:
                for m in ("precision", "recall"):
                    not_computed[f"contrastive_{m}"] = f"needs more than k={k} images per set"
        names = [metric_name(n, r) for n in ("fid", "inception_score", "inception_score_std")]
        if inc_reason is not None:
            not_computed.update({n: inc_reason for n in names})
            continue
        gi = feats("inception", inception.extractor_id, inception.features, "generated", r)
        ri = feats("inception", inception.extractor_id, inception.features, "reference", r)
        out[names[0]] = inception.fid(gi, ri)
        out[names[1]], out[names[2]] = inception.inception_score(gi)

    settings = {
        "contrastive_features": "the platform's contrastive reranker image_features (unit length) on float "
                                "RGB in [0, 1], resized by the reranker to its own image size"
                                + (f"; model {contrastive_id}" if contrastive_id else "")
                                + "; the same model selected the samples, so contrastive_fd is measured in "
                                  "the space that chose them",
        "independent_features": (f"a second contrastive model that did not select the samples; model {independent_id}"
                                 if independent_features_fn is not None else "none configured"),
        "blur": BLUR_SETTING,
        "blur_radii": ", ".join(f"{r:g}" for r in radii),
        "precision_recall": f"improved precision/recall (Kynkaanniemi et al. 2019), k={k}, contrastive space, radius 0",
        "num_captions": str(len(generated_images)),
        "num_reference_images": str(len(reference_images)),
    }
    if isinstance(inception, InceptionMetrics):
        settings.update(inception.settings())
    out["not_computed"] = not_computed
    out["settings"] = settings
    return out
