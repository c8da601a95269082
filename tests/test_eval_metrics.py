"""Automatic zero-shot metrics: Frechet distance, precision/recall, blur, feature cache,
FID/IS (against torchmetrics, with seeded random Inception weights), report."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dalle_core.eval.blur import blur_images
from dalle_core.eval.features import FeatureCache
from dalle_core.eval.frechet import frechet_distance, frechet_distance_from_features
from dalle_core.eval.images import image_set_digest
from dalle_core.eval.inception import NO_WEIGHTS, InceptionMetrics, NotComputed, inception_score
from dalle_core.eval.precision_recall import knn_radii, precision_recall
from dalle_core.eval.report import render_report
from dalle_core.eval.zero_shot import zero_shot_metrics


def make_images(n: int, seed: int, size: int = 64, shift: int = 0) -> list[Image.Image]:
    """Coloured ellipses on a noisy background: structure for blur and features to see."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4 + shift
        im = Image.fromarray(bg.astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out.append(im)
    return out


# --- Frechet distance ------------------------------------------------------------------------

def pytorch_fid_formula(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm)."""
    from scipy import linalg
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ref = pytorch_fid_formula(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_rank_deficient_matches_eigvals():
    # fewer samples than dimensions (a small eval set): torch-fidelity's eigvals formula as reference
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    d = a.mean(0) - b.mean(0)
    ref = d @ d + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance_from_features(a, b) == pytest.approx(ref, rel=1e-6)  # the sample-space route
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(ref, rel=1e-6)  # the D x D route


def test_frechet_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance_from_features(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- precision / recall ------------------------------------------------------------------------

def brute_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def cov(q, r, rad):
        d = np.linalg.norm(q[:, None] - r[None], axis=-1)
        return float(np.mean([(d[i] <= rad).any() for i in range(len(q))]))

    return cov(fake, real, radii(real)), cov(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(size=(50, 5)) * 0.7 + 0.8
    got = precision_recall(real, fake, k=3, batch_size=7)
    p, r = brute_precision_recall(real, fake, 3)
    assert (got["precision"], got["recall"]) == (pytest.approx(p), pytest.approx(r))
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    assert knn_radii(real, 3, batch_size=4) == pytest.approx(np.sort(
        np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, 3])


def test_precision_recall_hand_cases():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4))
    assert precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 1000.0) == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="N > k"):
        precision_recall(x[:3], x)


# --- blur ----------------------------------------------------------------------------------------

def test_blur_radii_smooth_more():
    ims = make_images(3, seed=4)
    assert [np.asarray(a).tolist() for a in blur_images(ims, 0)] == [np.asarray(a).tolist() for a in ims]
    # a pixel's difference to its right neighbour shrinks as the radius grows
    rough = [np.abs(np.diff(np.asarray(blur_images(ims, r)[0], float), axis=1)).mean() for r in (0, 1, 2, 4, 8)]
    assert all(a > b for a, b in zip(rough, rough[1:])), rough
    assert blur_images([ims[0].convert("L")], 2)[0].mode == "RGB"
    with pytest.raises(ValueError):
        blur_images(ims, -1)


# --- feature cache ---------------------------------------------------------------------------------

def test_feature_cache(tmp_path):
    ims = make_images(5, seed=5, size=16)
    calls = []

    def compute(images):
        def run():
            calls.append(len(images))
            return {"features": np.stack([np.asarray(i, np.float32).mean((0, 1)) for i in images])}
        return run

    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_compute("ext-v1", ims, 0, compute(ims))
    again = cache.get_or_compute("ext-v1", ims, 0, compute(ims))
    assert calls == [5] and cache.hits == 1
    np.testing.assert_array_equal(first["features"], again["features"])
    changed = ims[:4] + [make_images(1, seed=99, size=16)[0]]
    cache.get_or_compute("ext-v1", changed, 0, compute(changed))  # a changed image set recomputes
    cache.get_or_compute("ext-v1", ims, 2, compute(ims))  # another radius too
    cache.get_or_compute("ext-v2", ims, 0, compute(ims))  # and another extractor version
    assert calls == [5, 5, 5, 5]
    path = cache.path("ext-v1", image_set_digest(ims), 0)
    path.write_bytes(b"not a zip")  # corrupt entry: recomputed, then read again
    cache.get_or_compute("ext-v1", ims, 0, compute(ims))
    cache.get_or_compute("ext-v1", ims, 0, compute(ims))
    assert calls == [5, 5, 5, 5, 5]


# --- Inception ---------------------------------------------------------------------------------------

def test_inception_not_configured(tmp_path):
    status = InceptionMetrics.from_weights(None)
    assert isinstance(status, NotComputed) and status is NO_WEIGHTS
    assert str(status).startswith("not computed: no Inception weights configured (set ")
    with pytest.raises(FileNotFoundError, match="Inception weights file not found"):
        InceptionMetrics.from_weights(tmp_path / "missing.pth")


def test_inception_score_formula():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(40, 7)) * 3
    mean, std = inception_score(logits, splits=4, seed=0)
    x = logits[np.random.RandomState(0).permutation(40)]
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [math.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0))), 1))) for c in np.split(p, 4)]
    assert (mean, std) == (pytest.approx(np.mean(scores)), pytest.approx(np.std(scores)))
    assert inception_score(np.zeros((10, 7)))[0] == pytest.approx(1.0)  # no class information: IS = 1


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file in torch-fidelity's format with seeded random weights (the real ones
    cannot be downloaded here)."""
    import importlib.util

    from services import require_service

    if importlib.util.find_spec("torch_fidelity") is None:  # fails under CI=true, skips otherwise
        require_service("torch-fidelity is not installed (make setup installs it with --no-deps)")
    from dalle_core.eval.inception import write_random_weights

    return write_random_weights(tmp_path_factory.mktemp("inception") / "weights-random.pth")


def _torchmetrics_fid():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        from services import require_service

        require_service(f"torchmetrics unusable here: {e}")  # fails under CI=true, skips otherwise
    return FrechetInceptionDistance


@pytest.mark.slow
@pytest.mark.service
def test_fid_matches_torchmetrics(random_inception_weights):
    inc = InceptionMetrics.from_weights(random_inception_weights, batch_size=3, device="cpu")
    FrechetInceptionDistance = _torchmetrics_fid()
    gen, ref = make_images(4, seed=7), make_images(4, seed=8, shift=40)
    seen = []
    fg = inc.features(gen, progress=lambda d, t: seen.append((d, t)))
    fr = inc.features(ref)
    assert seen == [(3, 4), (4, 4)] and fg["2048"].shape == (4, 2048) and fg["logits_unbiased"].shape == (4, 1008)
    ours = inc.fid(fg, fr)

    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights),
                                  antialias=False)  # the TF1-compatible resize, as torch-fidelity's extractor
    tm.set_dtype(torch.float64)
    to_u8 = lambda ims: torch.from_numpy(np.stack([np.asarray(i.convert("RGB")).transpose(2, 0, 1) for i in ims]))
    tm.update(to_u8(gen), real=False)
    tm.update(to_u8(ref), real=True)
    assert ours > 0 and ours == pytest.approx(float(tm.compute()), rel=1e-3)

    mean, std = inc.inception_score(fg)
    assert math.isfinite(mean) and mean >= 1.0 and std >= 0
    s = inc.settings()
    assert "TensorFlow-1.x" in s["resize"] and "uint8" in s["image_format"] and "torch-fidelity" in s["fid_implementation"]


# --- zero-shot metrics and report ----------------------------------------------------------------------

@pytest.fixture
def reranker_fn():
    from dalle_core.profiles import get_profile
    from dalle_core.rerank.model import ContrastiveReranker

    torch.manual_seed(0)
    model = ContrastiveReranker(get_profile("tiny").reranker).eval()
    calls = []

    def fn(x):
        calls.append(len(x))
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        return model.image_features(x)

    fn.calls = calls
    return fn


def test_zero_shot_metrics_without_inception(reranker_fn, tmp_path):
    gen, ref = make_images(24, seed=9), make_images(20, seed=10, shift=60)
    stages = []
    cache = FeatureCache(tmp_path / "features")
    m = zero_shot_metrics(gen, ref, reranker_fn, radii=(0, 1, 4), cache=cache, contrastive_id="rr-test",
                          progress=lambda s, d, t: stages.append(s), batch_size=16)
    for name in ("contrastive_fd", "contrastive_fd_blur1", "contrastive_fd_blur4",
                 "contrastive_precision", "contrastive_recall"):
        assert math.isfinite(m[name]) and m[name] >= 0, name
    assert "fid" not in m and "fid_blur4" not in m and "inception_score" not in m
    assert m["not_computed"]["fid"].startswith("no Inception weights configured")
    assert set(m["not_computed"]) >= {"fid", "fid_blur1", "fid_blur4", "inception_score"}
    assert "contrastive reranker" in m["settings"]["contrastive_features"] and m["settings"]["num_captions"] == "24"
    assert "contrastive generated blur 4" in stages

    n_calls = len(reranker_fn.calls)
    again = zero_shot_metrics(gen, ref, reranker_fn, radii=(0, 1, 4), cache=cache, contrastive_id="rr-test")
    assert len(reranker_fn.calls) == n_calls  # every feature set came from the cache
    assert again["contrastive_fd_blur1"] == m["contrastive_fd_blur1"]

    same = zero_shot_metrics(gen, gen, reranker_fn, radii=(0,))
    assert same["contrastive_fd"] == pytest.approx(0, abs=1e-6)
    assert same["contrastive_precision"] == same["contrastive_recall"] == 1.0


class _CheapExtractor(torch.nn.Module):
    """Stands in for Inception in the plumbing test: (pool [N, 2048], logits [N, 1008]) from uint8."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pool, self.fc = torch.randn(192, 2048, generator=g), torch.randn(2048, 1008, generator=g) / 50

    def forward(self, x):
        assert x.dtype == torch.uint8
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1) @ self.pool
        return f, f @ self.fc


def test_zero_shot_metrics_with_inception(reranker_fn, tmp_path):
    inc = InceptionMetrics(_CheapExtractor(), tmp_path / "w.pth", "ab" * 32)
    gen, ref = make_images(12, seed=13), make_images(10, seed=14, shift=50)
    m = zero_shot_metrics(gen, ref, reranker_fn, inception=inc, radii=(0, 2), cache=FeatureCache(tmp_path / "c"))
    for name in ("fid", "fid_blur2", "inception_score", "inception_score_blur2", "contrastive_fd_blur2"):
        assert math.isfinite(m[name]) and m[name] >= 0, name
    assert m["inception_score"] >= 1 and m["not_computed"] == {}
    assert m["fid_blur2"] < m["fid"]  # blur removes detail the two sets differ in
    assert "TensorFlow-1.x" in m["settings"]["resize"]
    status = zero_shot_metrics(gen, ref, reranker_fn, inception=NotComputed("weights file unreadable"), radii=(0,))
    assert status["not_computed"]["fid"] == "weights file unreadable"


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.imgs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_html():
    metrics = {"contrastive_fd": 0.25, "contrastive_fd_blur1": 0.2, "contrastive_fd_blur2": 0.12,
               "contrastive_precision": 0.75, "contrastive_recall": 0.5,
               "not_computed": {"fid": "no Inception weights configured (set X)",
                                "inception_score": "no Inception weights configured (set X)"},
               "settings": {"blur": "PIL GaussianBlur", "num_captions": "24"}}
    samples = [{"caption": "a red <circle>", "generated": make_images(3, seed=11, size=32),
                "reference": make_images(1, seed=12, size=32)[0]}]
    history = [{"version": "v1", "metrics": {"contrastive_fd": 0.4, "fid": 31.2}}]
    rep = render_report(metrics, samples=samples, history=history, version="v2")
    p = _Collect()
    p.feed(rep.html)
    p.close()
    text = " ".join(p.text)
    for s in ("contrastive_fd_blur2", "0.12", "contrastive_precision", "0.75", "not computed: no Inception weights",
              "a red <circle>", "v1", "v2", "31.2", "PIL GaussianBlur", "num_captions"):
        assert s in text, s
    assert len(p.imgs) == 3 and all(src.startswith("data:image/png;base64,") for src in p.imgs)  # plot + 2 samples
    assert rep.plot_png.startswith(b"\x89PNG") and "table" in p.tags

    with_fid = render_report({**metrics, "fid": 27.5, "fid_blur1": 21.0, "not_computed": {}})
    assert "not computed" not in with_fid.html and "27.5" in with_fid.html and with_fid.plot_png
