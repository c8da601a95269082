"""Great Expectations suites as blocking Dagster asset checks: a failing suite
stops the assets downstream and says which expectation failed on how many rows.

`blocking=True` only stops the rest of the same run, and the stages after these
checks are separate runs (a pod each at scale). So each check also writes its
verdict into storage beside the data (dalle_core.data.quality_gate), and `shards`,
the tokenizer, the dVAE and the image codes read it before they read the data:
a failed batch is held back on every path (UI, jobs, automation, the retrain)."""


import json

import dagster as dg

from assets.data import (FILTER_REPORT, SHARDS, batch_prefix, crawl_batches, filtered_batch_digest, filtered_pairs, filtered_prefix,
                         load_eval_phashes, shards_asset, shards_digest)
from assets.metadata import md
from assets.resources import ProfileResource, StorageResource
from dalle_core.data import expectations, quality_gate, shards
from dalle_core.data.shards import Manifest


def _result(quality, rows: int, **extra) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=quality.success,
        metadata={
            **extra,
            "rows_checked": rows,
            "failed_expectations": len(quality.failures),
            "result": md(quality.to_markdown()),
        },
    )


# Runs in each filtered_pairs partition's run, over that crawl batch. (Not declared with
# partitions_def: partitioned asset checks are a preview feature of Dagster 1.13; the
# batch checked is in the result's metadata, and its verdict in storage is per batch.)
@dg.asset_check(asset=filtered_pairs, blocking=True,
                description="Great Expectations suite over one crawl batch: the filtered pairs' invariants, and the "
                "batch's crawl failure rate, kept fraction, filter drop rates and caption drift within the profile's "
                "bounds. A failing batch is held back from the shards until fixed and re-filtered.")
def filtered_pairs_expectations(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, profile: ProfileResource
) -> dg.AssetCheckResult:
    store, prof = storage.get(), profile.get()
    batch = context.partition_key
    out = filtered_prefix(batch)
    digest = filtered_batch_digest(store, batch)  # before reading: the verdict is about exactly this data
    frame = expectations.pairs_frame(shards.read_shards(store, out), eval_phashes=load_eval_phashes(store))
    crawl_summary = json.loads(store.get_text(f"{batch_prefix(batch)}/summary.json"))
    stats = expectations.batch_statistics(crawl_summary, json.loads(store.get_text(f"{out}/report.json")), frame)
    reference = expectations.drift_reference(earlier_passing_statistics(context.instance, store, batch))
    quality = expectations.validate_crawl_batch(frame, stats, reference, prof.data)
    quality_gate.write_verdict(store, out, quality, digest, statistics=stats)
    return _result(quality, len(frame), crawl_batch=batch,
                   verdict="passed: flows on to the shards" if quality.success else "HELD BACK from the shards",
                   crawl_failure_rate=round(stats["crawl_failure_rate"], 4),
                   kept_fraction=round(stats["kept_fraction"], 4),
                   drift_reference=f"{reference['batches']} earlier batches" if reference else "none (first batch)")


def earlier_passing_statistics(instance, store, batch: str) -> list[dict]:
    """The figures of the other crawl batches whose suite passed: the drift reference."""
    out = []
    for other in sorted(instance.get_dynamic_partitions(crawl_batches.name)):
        verdict = quality_gate.read_verdict(store, filtered_prefix(other)) if other != batch else None
        if verdict and verdict.get("success"):
            out.append(verdict.get("batch_statistics") or {})
    return out


@dg.asset_check(asset=shards_asset, blocking=True,
                description="Shard checksums and counts match the manifest and the filtered pairs; the tokenizer, "
                "dVAE and image codes refuse shards that failed it")
def shards_expectations(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.get()
    digest = shards_digest(store)
    manifest = Manifest.load(store, SHARDS)
    problems = shards.verify_shards(store, SHARDS)
    n_expected = json.loads(store.get_text(FILTER_REPORT))["kept_count"]
    quality = expectations.validate_shards(manifest, problems, n_expected)
    quality_gate.write_verdict(store, SHARDS, quality, digest)
    return _result(quality, len(manifest.shards))


data_checks = [filtered_pairs_expectations, shards_expectations]
