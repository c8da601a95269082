"""FID and Inception Score with torch-fidelity's Inception-v3 (pinned implementation).

FID differs between implementations by the resize filter and image compression
(clean-fid, Parmar et al. 2022), so one implementation is pinned and its settings
go into every report (`settings()`): torch-fidelity's `FeatureExtractorInceptionV3`,
a port of the TensorFlow graph `pt_inception-2015-12-05` that the original FID and
IS code used, which is also what torchmetrics wraps. Images enter as lossless uint8
RGB at their own size; the extractor resizes them to 299x299 with TF-1.x-compatible
bilinear interpolation. FID = our float64 Frechet distance of the 2048-d pool
features; IS = torch-fidelity's definition on the 1008 'logits_unbiased'.

Weights cannot be downloaded by the platform: they are read from a configured
local file (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`). With
none configured, `InceptionMetrics.from_weights(None)` returns a `NotComputed`
status, never a number.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from dalle_core.eval.frechet import frechet_distance_from_features
from dalle_core.eval.images import Progress, map_batches

WEIGHTS_ENV = "DALLE_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset
FID_LAYER = "2048"
IS_LAYER = "logits_unbiased"
IS_SPLITS = 10
IS_SEED = 2020  # torch-fidelity's default shuffle seed


@dataclass(frozen=True)
class NotComputed:
    """A metric that was not computed, and why (rendered as 'not computed: reason')."""
    reason: str

    def __str__(self) -> str:
        return f"not computed: {self.reason}"


NO_WEIGHTS = NotComputed(f"no Inception weights configured (set {WEIGHTS_ENV} or the evaluation's "
                         f"inception_weights to a local copy of torch-fidelity's {WEIGHTS_FILE})")


def _extractor_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError):
        # torch_fidelity/__init__ imports torchvision (for its CLIP/VGG extractors), which fails
        # where torchvision was built for another torch (PyPI's CUDA wheel beside a CPU torch).
        # The Inception extractor needs no torchvision: load its module under a bare package.
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise ImportError("FID/IS need torch-fidelity: pip install torch-fidelity") from None
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["torch_fidelity"] = pkg
        for name in [m for m in sys.modules if m.startswith("torch_fidelity.")]:
            del sys.modules[name]  # half-initialised by the failed import
        FeatureExtractorInceptionV3 = importlib.import_module(
            "torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3



def write_random_weights(path: Union[str, os.PathLike], seed: int = 0) -> Path:
    """A weights file in torch-fidelity's format with the extractor's architecture and
    seeded random weights (Kaiming-initialised convs keep activations O(1) through its
    ~90 layers): for tests and benchmarks, since the real file cannot be downloaded here.
    It exercises the same code and costs the same time; its FID means nothing."""
    from unittest import mock

    cls = _extractor_class()
    torch.manual_seed(seed)
    with mock.patch.object(cls, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        net = cls("inception-v3-compat", [FID_LAYER])
    sd = net.state_dict()
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(v, nonlinearity="relu")
    path = Path(path)
    torch.save(sd, path)
    return path

def inception_score(logits, splits: int = IS_SPLITS, seed: int = IS_SEED) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), as torch-fidelity computes it:
    samples shuffled with `seed`, float64, population std. Fewer samples than splits: one per split."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = x.shape[0]
    if x.ndim != 2 or n < 1:
        raise ValueError(f"logits must be [N, C] with N >= 1, got {tuple(x.shape)}")
    x = x[np.random.RandomState(seed).permutation(n)]
    splits = min(splits, n)
    p, log_p = x.softmax(1), x.log_softmax(1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(0, keepdim=True)
        scores.append((p[lo:hi] * (log_p[lo:hi] - q.log())).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionMetrics:
    """Inception features of image sets, and FID / IS from them."""

    def __init__(self, extractor: torch.nn.Module, weights_path: Path, weights_sha256: str,
                 batch_size: int = 32, device: Union[str, torch.device] = "cpu"):
        self.extractor = extractor.to(device).eval()
        self.weights_path, self.weights_sha256 = Path(weights_path), weights_sha256
        self.batch_size, self.device = batch_size, torch.device(device)
        self.version = importlib.metadata.version("torch-fidelity")

    @classmethod
    def from_weights(cls, path: Optional[Union[str, os.PathLike]], batch_size: int = 32,
                     device: Optional[str] = None) -> Union["InceptionMetrics", NotComputed]:
        """Load the extractor from a local weights file; `NO_WEIGHTS` when `path` is None/empty.
        A configured path that does not exist is an error, not a silent skip."""
        if path is None or str(path) == "":
            return NO_WEIGHTS
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {p} (configured via {WEIGHTS_ENV} "
                                    f"or inception_weights; expected torch-fidelity's {WEIGHTS_FILE})")
        ext = _extractor_class()("inception-v3-compat", [FID_LAYER, IS_LAYER], feature_extractor_weights_path=str(p))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(ext, p, _sha256(p), batch_size=batch_size, device=device)

    @classmethod
    def from_env(cls, **kw) -> Union["InceptionMetrics", NotComputed]:
        return cls.from_weights(os.environ.get(WEIGHTS_ENV) or None, **kw)

    @property
    def extractor_id(self) -> str:
        """Names everything that changes the features (the feature-cache key)."""
        return f"inception-v3-tf1bilinear299-torch-fidelity{self.version}-{self.weights_sha256[:16]}"

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image], progress: Progress = None) -> dict[str, np.ndarray]:
        """{'2048': [N, 2048] pool features, 'logits_unbiased': [N, 1008]}, float32, in batches."""
        def run(batch: torch.Tensor) -> torch.Tensor:
            pool, logits = self.extractor(batch.to(self.device))
            return torch.cat([pool.float(), logits.float()], 1)
        out = map_batches(run, images, self.batch_size, progress)
        return {FID_LAYER: out[:, :2048], IS_LAYER: out[:, 2048:]}

    @staticmethod
    def fid(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
        return frechet_distance_from_features(generated[FID_LAYER], reference[FID_LAYER])

    @staticmethod
    def inception_score(features: dict[str, np.ndarray]) -> tuple[float, float]:
        return inception_score(features[IS_LAYER])

    def settings(self) -> dict[str, str]:
        return {
            "fid_implementation": f"torch-fidelity {self.version} FeatureExtractorInceptionV3, "
                                  f"'{FID_LAYER}' pool features; Frechet distance: dalle_core.eval.frechet (float64)",
            "is_implementation": f"softmax of '{IS_LAYER}' (1008 classes), {IS_SPLITS} splits, "
                                 f"shuffle seed {IS_SEED} (torch-fidelity's definition)",
            "inception_weights": f"{self.weights_path.name} (sha256 {self.weights_sha256[:16]}...)",
            "resize": "to 299x299 by the extractor: bilinear, TensorFlow-1.x compatible, no antialias "
                      "(torch_fidelity interpolate_bilinear_2d_like_tensorflow1x)",
            "image_format": "uint8 RGB [N, 3, H, W] from PIL, lossless (no JPEG re-compression), native size",
        }
