"""De-duplication across crawl batches: the reduce after the per-batch filters.

Why the split (map per batch, reduce across batches): every filter of
`filters.build_filters` - decoding, language id, sizes, the pHash, exact and
near duplicates *within* the batch, overlap with the evaluation set - needs
nothing outside its own crawl batch, and it is where the time goes, so it runs
once per batch (a Dagster partition, a pod of its own at scale). Duplicates
*across* batches need every batch, but only their hashes: the map stores, for
each pair it kept, the sha256 of the original bytes and the pHash
(`KeptHash`), and this reduce runs the same two de-duplication filters over
those records, batches in sorted order, so the first occurrence wins however
the batches were scheduled. No image is decoded here.

For exact duplicates this is the same as one pass over all batches. For near
duplicates it never keeps a pair within the distance of an earlier kept one;
it can drop a little more than one pass would in a chain across batches (b2's
x near b1's z, b2's y near x but not near z: the map dropped y for x, the
reduce then drops x for z).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from .filters import (
    MAX_EXAMPLES,
    ExactDuplicate,
    FilterPipeline,
    FilterReport,
    NearDuplicate,
    pair_phash,
)
from .pairs import Pair


@dataclass(frozen=True)
class KeptHash:
    """What the reduce needs of one pair a batch kept."""

    key: str
    caption: str
    sha256: str
    phash: str

    @classmethod
    def of(cls, pair: Pair) -> "KeptHash":
        return cls(pair.key, pair.caption, str(pair.meta["sha256"]), pair_phash(pair))

    def as_pair(self) -> Pair:
        """A pair without image bytes: all the de-duplication filters read (pHash from meta)."""
        return Pair(self.key, self.caption, b"", "png", {"sha256": self.sha256, "phash": self.phash})

    def to_dict(self) -> dict:
        return asdict(self)


def dedup_across_batches(batches: Mapping[str, Sequence[KeptHash]], near_max_distance: int) -> FilterReport:
    """Cross-batch duplicates among the pairs each batch kept; `removed_keys` names them."""
    pipeline = FilterPipeline([ExactDuplicate(), NearDuplicate(max_distance=near_max_distance)])
    for batch in sorted(batches):
        for _ in pipeline.apply(h.as_pair() for h in batches[batch]):
            pass
    return pipeline.report


def merge_reports(batch_reports: Mapping[str, FilterReport], cross: FilterReport) -> dict:
    """One report for the whole data set: every batch's filters, then the cross-batch duplicates.

    input_count sums the batches' inputs, kept_count is what survived the
    reduce, and removed counts each filter over all batches (duplicates found
    across batches under the same filter names), so removed sums to
    input - kept. `batches` and `cross_batch_removed` keep the parts.
    """
    merged = FilterReport(input_count=sum(r.input_count for r in batch_reports.values()),
                          kept_count=cross.kept_count)
    for report in [batch_reports[b] for b in sorted(batch_reports)] + [cross]:
        for name, n in report.removed.items():
            merged.removed[name] = merged.removed.get(name, 0) + n
        for name, keys in report.removed_keys.items():
            merged.removed_keys.setdefault(name, []).extend(keys)
        for name, examples in report.examples.items():
            room = MAX_EXAMPLES - len(merged.examples.setdefault(name, []))
            merged.examples[name].extend(examples[:max(0, room)])
    return {
        **merged.to_dict(),
        "batches": {b: {"input_count": r.input_count, "kept_count": r.kept_count} for b, r in sorted(batch_reports.items())},
        "cross_batch_removed": dict(cross.removed),
    }


__all__ = ["KeptHash", "dedup_across_batches", "merge_reports"]
