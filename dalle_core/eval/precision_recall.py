"""Improved precision and recall (Kynkaanniemi et al., 2019) on feature sets.

Each set's manifold is the union of balls around its points, a ball's radius being
the distance to that point's k-th nearest neighbour in its own set (k = 3 in the
paper). Precision: the fraction of generated points inside the real manifold
(are samples realistic?); recall: the fraction of real points inside the
generated manifold (is the variety covered?). Distances are computed in blocks of
`batch_size` rows so memory stays O(batch_size * N), not O(N^2).
"""

from __future__ import annotations

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)  # round-off can make |a-b|^2 slightly negative


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] <= k:
        raise ValueError(f"need a [N, D] feature set with N > k={k}, got shape {f.shape}")
    out = np.empty(f.shape[0])
    for i in range(0, f.shape[0], batch_size):
        d = _sq_dists(f[i:i + batch_size], f)
        # the k+1-th smallest, since each point is its own nearest neighbour at distance 0
        out[i:i + batch_size] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return out


def manifold_coverage(query, ref, ref_radii, batch_size: int = 1024) -> float:
    """Fraction of `query` points within ref_radii[j] of some ref point j."""
    q, r = np.asarray(query, np.float64), np.asarray(ref, np.float64)
    r2 = np.asarray(ref_radii, np.float64) ** 2
    inside = 0
    for i in range(0, q.shape[0], batch_size):
        inside += int((_sq_dists(q[i:i + batch_size], r) <= r2[None, :]).any(axis=1).sum())
    return inside / q.shape[0]


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> dict[str, float]:
    """{'precision', 'recall'} of generated features `fake` [N, D] against `real` [M, D]."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {real.shape} and {fake.shape}")
    return {
        "precision": manifold_coverage(fake, real, knn_radii(real, k, batch_size), batch_size),
        "recall": manifold_coverage(real, fake, knn_radii(fake, k, batch_size), batch_size),
    }
