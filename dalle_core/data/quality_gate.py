"""Data-quality verdicts kept next to the data they judge, so that a failed
suite gates every later run, not only the run that checked it.

A blocking Dagster check stops the assets downstream *in the same run*; the
filters, the shards, the dVAE and the weekly retrain are separate runs (pods at
scale). So each suite's verdict is written into storage as `quality.json` beside
the data, bound to a digest of that data, and every consumer asks `gate()`
before reading: a batch that failed, was never checked, or changed since its
check does not flow on. A fixed and re-checked batch does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

VERDICT = "quality.json"


class QualityGateError(RuntimeError):
    """Data held back by its quality gate; the message names the data and the failed expectations."""


def data_digest(store, keys: list[str]) -> str:
    """sha256 over the given storage objects (name and bytes), in order: what a verdict is bound to."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode() + b"\0")
        h.update(store.get_bytes(key))
    return h.hexdigest()


def write_verdict(store, prefix: str, result, digest: str, statistics: dict | None = None) -> dict:
    """Store a suite's `QualityResult` for the data under `prefix` (digest `digest`)."""
    verdict = {**result.to_dict(), "digest": digest, "checked_at": time.time(),
               "reasons": result.failure_lines(), "batch_statistics": dict(statistics or {})}
    store.put_text(f"{prefix}/{VERDICT}", json.dumps(verdict, indent=2))
    return verdict


def read_verdict(store, prefix: str) -> dict | None:
    key = f"{prefix}/{VERDICT}"
    return json.loads(store.get_text(key)) if store.exists(key) else None


def clear_verdict(store, prefix: str) -> None:
    """Drop a verdict before its data is rewritten: new data is unchecked until its suite runs."""
    if store.exists(f"{prefix}/{VERDICT}"):
        store.delete(f"{prefix}/{VERDICT}")


@dataclass
class GateStatus:
    passed: bool
    reason: str  # why not, in a person's words (empty when passed)
    verdict: dict | None = None


def gate(store, prefix: str, digest: str, what: str, how_to_check: str) -> GateStatus:
    """Whether the data under `prefix` (now `digest`) may flow on. Fails closed: no verdict,
    a verdict of other data, or a failed suite all hold it back."""
    verdict = read_verdict(store, prefix)
    if verdict is None:
        return GateStatus(False, f"{what} has no data-quality verdict ({store.uri(prefix)}/{VERDICT}): {how_to_check}")
    if verdict.get("digest") != digest:
        return GateStatus(False, f"{what} changed since its data-quality check: {how_to_check}", verdict)
    if not verdict.get("success"):
        reasons = verdict.get("reasons") or ["(no reason recorded)"]
        return GateStatus(False, f"{what} failed its data-quality suite '{verdict.get('suite')}': "
                          + "; ".join(reasons), verdict)
    return GateStatus(True, "", verdict)


def require(status: GateStatus) -> dict:
    """The verdict of passing data; else QualityGateError with the reason."""
    if not status.passed:
        raise QualityGateError(status.reason)
    return status.verdict
