"""Fair champion / challenger comparison: figures are only compared when they were
measured under the same conditions.

An evaluation's *fingerprint* names everything its figures depend on besides the
model under test: the evaluation captions (and reference images), candidates per
caption, seed, the weights of the scoring models (the contrastive reranker that
selects the samples and defines the feature space, Inception when used, an
independent contrastive model when configured), the blur radii and the code
version. Frechet distance moves with every one of them, so a challenger's
contrastive FD on 8 captions with the reranker of today is no evidence against a
champion's FD on 16 captions with last week's reranker.

Pure logic only (no MLflow, no Dagster): `assets.model_registry` stores the
figures per fingerprint on the registered versions and calls `decide` here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

SHORT = 12  # hex characters of the fingerprint digest used in tag names


def digest_texts(texts: Iterable[str]) -> str:
    """sha256 of an ordered list of strings (the evaluation captions)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def make_fingerprint(**fields) -> dict[str, str]:
    """The conditions of one evaluation, as a flat {field: text} dict (sorted, all strings,
    floats written with `g` so 1.0 and 1 agree). Lists become comma-separated."""
    def text(v) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, (list, tuple)):
            return ",".join(text(x) for x in v)
        return "" if v is None else str(v)
    return {k: text(fields[k]) for k in sorted(fields)}


def fingerprint_id(fp: Mapping[str, str]) -> str:
    """Short, stable name of a fingerprint (used in MLflow tag names)."""
    return hashlib.sha256(json.dumps(dict(fp), sort_keys=True).encode()).hexdigest()[:SHORT]


def fingerprint_diff(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """'field: A -> B' for each field that differs (long digests shortened)."""
    def short(v: Optional[str]) -> str:
        if v is None:
            return "(absent)"
        return v[:12] if len(v) >= 32 and all(c in "0123456789abcdef+" for c in v[:32]) else v
    return [f"{k}: {short(a.get(k))} -> {short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass
class Decision:
    promote: bool
    reason: str
    compared: dict[str, tuple[float, Optional[float]]] = field(default_factory=dict)  # metric -> (ours, theirs)


def check_rules(rules: Mapping[str, str], metrics: Mapping[str, float]) -> None:
    for metric, direction in rules.items():
        if direction not in ("lower", "higher"):
            raise ValueError(f"promotion rule for {metric!r} must be 'lower' or 'higher', got {direction!r}")
        if metric not in metrics:
            raise ValueError(f"promotion metric {metric!r} was not computed (have: {sorted(metrics)})")


def decide(label: str, champion_label: str, ours: Mapping[str, float], theirs: Optional[Mapping[str, float]],
           rules: Mapping[str, str], fp_id: str, other_fingerprints: Sequence[str] = ()) -> Decision:
    """Promote only if the challenger beats the champion on every rule's metric, both
    measured under fingerprint `fp_id`. No champion figures under that fingerprint, or
    a rule's metric missing (or not a number) on the champion: refused, never a win."""
    if theirs is None:
        where = (f" (it has figures only under fingerprint(s) {', '.join(other_fingerprints)}: other conditions)"
                 if other_fingerprints else " (it was never evaluated)")
        return Decision(False, f"{label} not promoted, {champion_label} kept: the champion has no figures under "
                               f"this evaluation's fingerprint {fp_id}{where}; figures measured under other conditions "
                               "are not comparable: re-score the champion under these conditions")
    worse, missing, compared = [], [], {}
    for metric, direction in rules.items():
        mine, best = float(ours[metric]), theirs.get(metric)
        if best is None or not math.isfinite(float(best)):
            missing.append(metric)
            compared[metric] = (mine, None)
            continue
        best = float(best)
        compared[metric] = (mine, best)
        better = mine < best if direction == "lower" else mine > best
        if not better:
            worse.append(f"{metric} {mine:.4g} vs champion's {best:.4g} ({direction} is better)")
    if missing:
        return Decision(False, f"{label} not promoted, {champion_label} kept: the champion has no "
                               f"{', '.join(missing)} under fingerprint {fp_id}; a metric the champion lacks is "
                               "never a win", compared)
    if worse:
        return Decision(False, f"{label} stays challenger (fingerprint {fp_id}), {champion_label} kept: "
                        + "; ".join(worse), compared)
    return Decision(True, f"{label} beat {champion_label} on {', '.join(rules)} under fingerprint {fp_id}: "
                          "promoted to champion", compared)


def comparison_table(challenger: str, champion: str, ours: Mapping[str, float],
                     theirs: Optional[Mapping[str, float]], rules: Mapping[str, str],
                     names: Optional[Sequence[str]] = None) -> list[tuple[str, str, str, str]]:
    """Rows (metric, challenger, champion, rule) of both versions' figures side by side."""
    theirs = theirs or {}
    keys = list(names) if names is not None else list(dict.fromkeys([*ours, *theirs]))

    def fmt(v) -> str:
        return "-" if v is None else f"{float(v):.4g}"
    return [(k, fmt(ours.get(k)), fmt(theirs.get(k)), f"{rules[k]} is better" if k in rules else "")
            for k in keys]
