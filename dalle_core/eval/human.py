"""Human evaluation (paper section 3.1): pairwise preference with majority of 5 votes.

Raters see two models' samples for one caption and answer two questions: which
image is more realistic, and which matches the caption better. Each item goes to
`raters_per_item` raters (the paper: 5); an item's answer to a question is the
majority of its votes, and the result is the rate at which model A wins that
majority, with a Wilson score interval.

Ties (possible only with an even number of raters) count as no preference: the
item stays in the denominator but is a win for neither model, so
pref_a + pref_b + tie_rate = 1.

This module is plain Python: it knows votes, not databases or web apps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

QUESTIONS = ("realism", "caption_match")
ANSWERS = ("A", "B")  # in model terms: A = model A, B = model B


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0 (no information)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def majority(answers: Sequence[str]) -> Optional[str]:
    """"A" or "B" by simple majority; None for a tie (no preference)."""
    bad = [a for a in answers if a not in ANSWERS]
    if bad:
        raise ValueError(f"answers must be 'A' or 'B', got {bad[0]!r}")
    a, b = answers.count("A"), answers.count("B")
    return "A" if a > b else "B" if b > a else None


@dataclass(frozen=True)
class Vote:
    """One rater's answers for one item, in model terms ("A" = model A preferred)."""

    item: object
    rater: object
    realism: str
    caption_match: str


def _as_vote(v) -> Vote:
    if isinstance(v, Vote):
        return v
    if isinstance(v, Mapping):
        return Vote(v["item"], v["rater"], v["realism"], v["caption_match"])
    return Vote(v.item, v.rater, v.realism, v.caption_match)


def aggregate_votes(votes: Iterable, raters_per_item: int = 5, z: float = 1.96) -> dict:
    """Majority-of-k preference rates per question over the items that have all k votes.

    `votes`: `Vote`s, or mappings/objects with item, rater, realism, caption_match
    (answers "A"/"B" in model terms). Items with fewer than k votes are counted as
    pending and left out of the rates; a second vote by the same rater on the same
    item, or more than k votes on an item, is an error naming the item.
    Returns {"items", "items_complete", "items_pending", "raters_per_item",
    "realism": {...}, "caption_match": {...}} where each question has
    pref_a, pref_b, ci_low, ci_high (for pref_a), wins_a, wins_b, ties, n,
    votes_a, votes.
    """
    if raters_per_item < 1:
        raise ValueError(f"raters_per_item must be at least 1, got {raters_per_item}")
    by_item: dict = defaultdict(dict)
    for v in map(_as_vote, votes):
        for q in QUESTIONS:
            if getattr(v, q) not in ANSWERS:
                raise ValueError(f"item {v.item!r}, rater {v.rater!r}: {q} must be 'A' or 'B', got {getattr(v, q)!r}")
        if v.rater in by_item[v.item]:
            raise ValueError(f"item {v.item!r}: rater {v.rater!r} voted twice")
        by_item[v.item][v.rater] = v
    over = [i for i, vs in by_item.items() if len(vs) > raters_per_item]
    if over:
        raise ValueError(f"item {over[0]!r} has {len(by_item[over[0]])} votes, expected {raters_per_item}")
    complete = {i: list(vs.values()) for i, vs in by_item.items() if len(vs) == raters_per_item}
    out = {"items": len(by_item), "items_complete": len(complete), "items_pending": len(by_item) - len(complete),
           "raters_per_item": raters_per_item}
    for q in QUESTIONS:
        winners = [majority([getattr(v, q) for v in vs]) for vs in complete.values()]
        n, wins_a, wins_b = len(winners), winners.count("A"), winners.count("B")
        low, high = wilson_interval(wins_a, n, z)
        all_votes = [getattr(v, q) for vs in complete.values() for v in vs]
        out[q] = {
            "n": n, "wins_a": wins_a, "wins_b": wins_b, "ties": n - wins_a - wins_b,
            "pref_a": wins_a / n if n else float("nan"), "pref_b": wins_b / n if n else float("nan"),
            "ci_low": low, "ci_high": high,
            "votes_a": all_votes.count("A"), "votes": len(all_votes),
        }
    return out
