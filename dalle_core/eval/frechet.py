"""Frechet distance between two Gaussians fitted to feature sets (the F in FID).

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Only the trace of (S1 S2)^(1/2) is needed. S1 S2 is not symmetric, so a general
matrix square root (scipy.linalg.sqrtm, as pytorch-fid does) can return complex
noise; but S1 S2 is similar to the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), whose
eigenvalues are the same, so two symmetric eigen-decompositions give the trace
stably, also for the rank-deficient covariances of small sample sets.

From features there is a cheaper exact route when both sets have fewer samples
than dimensions (the demo's small sets in 2048-d Inception space): with centred
features A1 [n1, D], A2 [n2, D], the non-zero eigenvalues of S1 S2 are those of
M M^T, M = A1 A2^T / sqrt((n1-1)(n2-1)), so Tr (S1 S2)^(1/2) is the sum of M's
singular values: an n1 x n2 SVD instead of two D x D eigen-decompositions.
"""

from __future__ import annotations

import numpy as np


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # clip: round-off makes zero eigenvalues slightly negative


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features [N, D] (N >= 2), float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be a [N, D] array, got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to fit a Gaussian, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_features(f1, f2) -> float:
    """Frechet distance between Gaussians fitted to features f1 [N1, D] and f2 [N2, D]."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
    (n1, d), n2 = f1.shape, f2.shape[0]
    if max(n1, n2) >= d:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    if min(n1, n2) < 2:
        raise ValueError(f"need at least 2 samples to fit a Gaussian, got {n1} and {n2}")
    if not (np.isfinite(f1).all() and np.isfinite(f2).all()):
        raise ValueError("frechet_distance: features contain NaN or inf")
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    c1, c2 = n1 - 1, n2 - 1
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2.0 * tr_covmean)
