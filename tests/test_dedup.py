"""The reduce after the per-batch filters: duplicates across crawl batches, removed once."""

from dalle_core.data.dedup import KeptHash, dedup_across_batches, merge_reports
from dalle_core.data.filters import FilterReport


def _h(key: str, sha: str, phash: str) -> KeptHash:
    return KeptHash(key, f"caption of {key}", sha * 64, phash)


def test_first_occurrence_in_sorted_batch_order_wins():
    batches = {  # given out of order: the reduce sorts them
        "b2.csv": [_h("b2-0", "a", "00000000000000ff"), _h("b2-1", "c", "ff00000000000000")],
        "b1.csv": [_h("b1-0", "a", "0f0f0f0f0f0f0f0f"), _h("b1-1", "b", "00000000000000fe")],
    }
    report = dedup_across_batches(batches, near_max_distance=6)
    assert report.removed_keys == {"exact_duplicate": ["b2-0"]}  # b2-0's bytes equal b1-0's
    assert report.input_count == 4 and report.kept_count == 3
    batches["b3.csv"] = [_h("b3-0", "d", "00000000000000fc")]  # 1 bit from b1-1
    report = dedup_across_batches(batches, near_max_distance=6)
    assert report.removed_keys["near_duplicate"] == ["b3-0"]
    assert "b1-1" in report.examples["near_duplicate"][0]["reason"]


def test_merged_report_adds_up():
    b1 = FilterReport(input_count=10, kept_count=7, removed={"non_english": 2, "near_duplicate": 1},
                      removed_keys={"non_english": ["x", "y"], "near_duplicate": ["z"]})
    b2 = FilterReport(input_count=5, kept_count=2, removed={"non_english": 3, "near_duplicate": 0})
    cross = dedup_across_batches({"b1": [_h(f"k{i}", str(i), f"{i:016x}") for i in range(7)],
                                  "b2": [_h("dup", "3", "f0f0f0f0f0f0f0f0"), _h("new", "e", "0f" * 8)]},
                                 near_max_distance=0)
    merged = merge_reports({"b2": b2, "b1": b1}, cross)
    assert merged["input_count"] == 15 and merged["kept_count"] == cross.kept_count == 8
    assert sum(merged["removed"].values()) == merged["input_count"] - merged["kept_count"]
    assert merged["removed"]["exact_duplicate"] == 1 and merged["cross_batch_removed"]["exact_duplicate"] == 1
    assert merged["removed_keys"]["non_english"] == ["x", "y"] and list(merged["batches"]) == ["b1", "b2"]
