"""The unigram baseline a prior must beat: the cross-entropy of predicting every
token from its overall frequency alone (the entropy of the unigram
distribution), for text positions (pads included, as the prior predicts them)
and image positions, weighted like the prior's loss."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_baseline(pairs: Iterable, text_weight: float = 1 / 8, image_weight: float = 7 / 8) -> dict[str, float]:
    """`pairs` yield objects with `.text` (int ids) and `.codes` (int grid), e.g. CodedPair."""
    text_counts: dict[int, int] = {}
    image_counts: dict[int, int] = {}
    for p in pairs:
        for ids, counts in ((np.asarray(p.text).ravel(), text_counts), (np.asarray(p.codes).ravel(), image_counts)):
            values, n = np.unique(ids, return_counts=True)
            for v, c in zip(values.tolist(), n.tolist()):
                counts[v] = counts.get(v, 0) + c
    if not image_counts:
        raise ValueError("no coded pairs to compute a unigram baseline from")
    text = entropy_nats(np.array(list(text_counts.values()), dtype=np.float64))
    image = entropy_nats(np.array(list(image_counts.values()), dtype=np.float64))
    return {"text": text, "image": image, "total": text_weight * text + image_weight * image}
