"""Great Expectations suites as blocking Dagster asset checks: a failing suite
stops the assets downstream and says which expectation failed on how many rows."""


import json

import dagster as dg

from assets.data import FILTER_REPORT, SHARDS, filtered_pairs, filtered_prefix, load_eval_phashes, shards_asset
from assets.metadata import md
from dalle_core.data import expectations, shards
from dalle_core.data.shards import Manifest
from orchestration.resources import ProfileResource, StorageResource


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
# batch checked is in the result's metadata.)
@dg.asset_check(asset=filtered_pairs, blocking=True, description="Great Expectations suite over one crawl batch's filtered pairs")
def filtered_pairs_expectations(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, profile: ProfileResource
) -> dg.AssetCheckResult:
    store, prof = storage.get(), profile.get()
    pairs = shards.read_shards(store, filtered_prefix(context.partition_key))
    frame = expectations.pairs_frame(pairs, eval_phashes=load_eval_phashes(store))
    return _result(expectations.validate_filtered_pairs(frame, prof.data), len(frame), crawl_batch=context.partition_key)


@dg.asset_check(asset=shards_asset, blocking=True, description="Shard checksums and counts match the manifest and the filtered pairs")
def shards_expectations(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.get()
    manifest = Manifest.load(store, SHARDS)
    problems = shards.verify_shards(store, SHARDS)
    n_expected = json.loads(store.get_text(FILTER_REPORT))["kept_count"]
    return _result(expectations.validate_shards(manifest, problems, n_expected), len(manifest.shards))


data_checks = [filtered_pairs_expectations, shards_expectations]
