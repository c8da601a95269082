"""The data stage as Dagster assets: raw_pairs -> filtered_pairs -> shards, and the
zero-shot evaluation set. Crawl and filters are the map (a crawl_batches partition
each), shards the reduce (duplicates across batches, shuffle, training shards).
Thin wrappers: the work is in dalle_core.data."""


import json
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import dagster as dg
import webdataset as wds

from assets.metadata import md, md_image, md_table
from assets.resources import (
    CrawlSourceResource,
    MlflowResource,
    ProfileResource,
    StorageResource,
    data_version,
    demo_world_for,
)
from dalle_core.data import coco, crawl as crawling, filters, image_decode, quality_gate, shards
from dalle_core.data.dedup import KeptHash, dedup_across_batches, merge_reports
from dalle_core.data.filters import FilterReport
from dalle_core.data.pairs import Pair
from dalle_core.imaging import image_grid, png_bytes

crawl_batches = dg.DynamicPartitionsDefinition(name="crawl_batches")  # one per URL list (the sensor adds them)
code_shards = dg.DynamicPartitionsDefinition(name="code_shards")  # one per training shard (`shards` adds them)

RAW = "raw_pairs"
FILTERED = "filtered_pairs"
SHARDS = "shards"
FILTER_REPORT = f"{SHARDS}/filter_report.json"  # every batch's filters + the cross-batch duplicates
# a step that lost its storage connection half-way is rerun (writes are idempotent: same keys)
STORAGE_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)
EVAL = "coco_eval"
SHUFFLE_BUFFER = 10_000


def batch_stem(partition_key: str) -> str:
    """A crawl batch's name in storage: the URL list's name without its extension."""
    return partition_key.split(".")[0]


def batch_prefix(partition_key: str) -> str:
    """Storage prefix of one crawl batch's raw pairs."""
    return f"{RAW}/{batch_stem(partition_key)}"


def iter_raw_pairs(storage, prefix: str):
    """The pairs of one crawl batch, part by part."""
    for key in storage.list(prefix + "/"):
        if key.endswith(".tar"):
            yield from shards.read_tar(storage, key)


@dg.asset(
    partitions_def=crawl_batches,
    group_name="data",
    kinds={"python"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
    description="Image-text pairs downloaded from one URL list (a crawl batch); every failure recorded.",
)
def raw_pairs(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    profile: ProfileResource,
    crawl_source: CrawlSourceResource,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    url_list = crawl_source.url_list_path(context.partition_key)
    prefix = batch_prefix(context.partition_key)
    last = [0.0]

    def progress(p):
        if time.monotonic() - last[0] > 5 or p.done == p.total:
            last[0] = time.monotonic()
            context.log.info(f"crawl {context.partition_key}: {p}")

    with crawl_source.serving(prof):
        result = crawling.crawl(url_list, store, prefix, prof.data, progress=progress)
    summary = result.to_dict()
    store.put_text(f"{prefix}/summary.json", json.dumps(summary, indent=2))

    preview = []
    for pair in shards.read_tar(store, next(k for k in store.list(prefix + "/") if k.endswith(".tar"))) if result.parts else []:
        preview.append(pair.image)
        if len(preview) >= 16:
            break
    failures = sorted(result.failures_by_reason.items(), key=lambda kv: -kv[1])
    return dg.MaterializeResult(
        metadata={
            "rows": result.n_rows,
            "downloaded": result.n_ok,
            "failed": result.n_failed,
            "pairs_per_s": round(result.pairs_per_s, 1),
            "failures": md(md_table(["reason", "count"], failures) if failures else "none"),
            "preview": md(md_image(png_bytes(image_grid(preview, ncols=8)), "first downloaded pairs")),
            "location": dg.MetadataValue.path(store.uri(prefix)),
        }
    )


class EvalSetConfig(dg.Config):
    """The zero-shot evaluation set: real MS-COCO captions, or the demo world's held-out set."""

    captions_json: Optional[str] = None  # e.g. annotations/captions_val2014.json
    image_dir: Optional[str] = None  # e.g. val2014/
    limit: Optional[int] = None  # first N images (the paper used 30,000 captions)


@dg.asset(
    group_name="data",
    kinds={"python"},
    description="MS-COCO-format evaluation set (captions JSON + images) and the pHashes used to keep it out of training.",
)
def coco_eval_set(
    config: EvalSetConfig, storage: StorageResource, profile: ProfileResource
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    with tempfile.TemporaryDirectory(prefix="dalle-eval-") as tmp:
        if config.captions_json:
            captions_json, image_dir = Path(config.captions_json), config.image_dir
            source = str(captions_json)
        else:
            captions_json = demo_world_for(prof).write_eval_set(Path(tmp))
            image_dir, source = captions_json.parent / "images", "demo world (held-out compositions)"
        # everything is checked, and every image read, before anything is written to storage:
        # a refused set leaves the previous evaluation set as it was
        if not image_dir:
            raise dg.Failure(f"coco_eval_set needs image_dir to hash the evaluation images ({captions_json}): "
                             "set config image_dir to the folder the captions file's file_name entries are in")
        try:
            images = coco.load_coco_captions(captions_json, Path(image_dir), limit=config.limit)
            coco.check_eval_set(images, captions_json)
        except coco.CocoFormatError as e:
            raise dg.Failure(f"evaluation set refused: {e}", metadata={"captions_json": str(captions_json),
                                                                      "image_dir": str(image_dir)}) from e
        phashes, preview = {}, []
        for im in images:
            try:
                img = image_decode.load_rgb(im.path.read_bytes())
            except (OSError, image_decode.ImageDecodeError) as e:
                raise dg.Failure(f"evaluation set refused: {captions_json}: image {im.image_id} file {im.path} "
                                 f"cannot be read as an image ({e})") from e
            square = image_decode.resize_center_crop(img, prof.data.image_size)
            phashes[im.file_name] = filters.compute_phash(square)
            if len(preview) < 16:
                preview.append(square)
        for im in images:
            store.put_file(f"{EVAL}/images/{im.file_name}", im.path)
        coco.write_coco_captions(images, Path(tmp) / "captions.json")
        store.put_file(f"{EVAL}/captions.json", Path(tmp) / "captions.json")
    store.put_text(f"{EVAL}/phashes.json", json.dumps(phashes, indent=1))
    return dg.MaterializeResult(
        metadata={
            "images": len(images),
            "captions": sum(len(i.captions) for i in images),
            "source": source,
            "example_captions": md("\n".join(f"- {i.captions[0]}" for i in images[:8])),
            "preview": md(md_image(png_bytes(image_grid(preview)), "evaluation images")),
            "location": dg.MetadataValue.path(store.uri(EVAL)),
        }
    )


def load_eval_phashes(store) -> list[str]:
    return list(json.loads(store.get_text(f"{EVAL}/phashes.json")).values())


def filtered_prefix(partition_key: str) -> str:
    """Storage prefix of one crawl batch's filtered pairs."""
    return f"{FILTERED}/{batch_stem(partition_key)}"


def read_kept_hashes(store, partition_key: str) -> list[KeptHash]:
    return [KeptHash(**h) for h in json.loads(store.get_text(f"{filtered_prefix(partition_key)}/hashes.json"))]


def filtered_batch_digest(store, partition_key: str) -> str:
    """What a batch's quality verdict is bound to: its filter report and the hashes of the pairs it kept."""
    out = filtered_prefix(partition_key)
    return quality_gate.data_digest(store, [f"{out}/report.json", f"{out}/hashes.json"])


def batch_gate(store, partition_key: str) -> quality_gate.GateStatus:
    """May this filtered crawl batch enter the shards? Only with a passing verdict on its current data."""
    return quality_gate.gate(store, filtered_prefix(partition_key), filtered_batch_digest(store, partition_key),
                             f"crawl batch {partition_key}",
                             f"fix the URL list or the profile's bounds and re-run filter_job for {partition_key}")


def shards_digest(store) -> str:
    return quality_gate.data_digest(store, [f"{SHARDS}/manifest.json"])


def require_passing_shards(store) -> dict:
    """For every stage that reads the shards (tokenizer, dVAE, image codes): the shards' verdict,
    or a Failure naming the failed expectations. The weekly retrain goes through here too."""
    if not store.exists(f"{SHARDS}/manifest.json"):
        raise dg.Failure(f"no shards yet ({store.uri(SHARDS)}/manifest.json): materialize shards first (shards_job)")
    status = quality_gate.gate(store, SHARDS, shards_digest(store), "the training shards",
                               "re-run shards_job (it re-checks them)")
    if not status.passed:
        raise dg.Failure(f"refusing the training shards: {status.reason}",
                         metadata={"held_back": "shards", "reason": status.reason})
    return status.verdict


def read_batch_report(store, partition_key: str) -> FilterReport:
    return FilterReport.from_dict(json.loads(store.get_text(f"{filtered_prefix(partition_key)}/report.json")))


@dg.asset(
    partitions_def=crawl_batches,  # the map: one run (a pod at scale) per crawl batch
    automation_condition=dg.AutomationCondition.eager(),  # follows every new crawl batch
    retry_policy=STORAGE_RETRY,
    deps=[raw_pairs, coco_eval_set],
    group_name="data",
    kinds={"python"},
    description="One crawl batch's pairs that pass the paper's filters (caption length, English, not "
    "boilerplate dates, aspect ratio in [1/2, 2], size, exact/near duplicates within the batch, no overlap "
    "with the evaluation set); duplicates across batches are removed by `shards`.",
)
def filtered_pairs(
    context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    batch, raw, out = context.partition_key, batch_prefix(context.partition_key), filtered_prefix(context.partition_key)
    if not store.exists(f"{raw}/summary.json"):
        raise dg.Failure(f"crawl batch {batch} has not finished crawling (no {store.uri(raw)}/summary.json): "
                         "materialize its raw_pairs partition first")
    pipeline = filters.build_filters(prof.data, load_eval_phashes(store))
    rejected: dict[str, list] = {}

    def on_reject(pair: Pair, filter_name: str, reason: str) -> None:
        examples = rejected.setdefault(filter_name, [])
        if len(examples) < 4:
            examples.append(pair.image)

    accepted_preview: list = []
    kept_hashes: list[KeptHash] = []

    def kept():
        for pair in pipeline.apply(iter_raw_pairs(store, raw), on_reject=on_reject):
            if len(accepted_preview) < 16:
                accepted_preview.append(pair.image)
            kept_hashes.append(KeptHash.of(pair))
            yield pair

    if store.exists(f"{out}/report.json"):
        store.delete(f"{out}/report.json")  # the report lands last: a batch without one is not filtered
    quality_gate.clear_verdict(store, out)  # re-filtered data is held back until its suite passes again
    shards.write_shards(kept(), store, out, prof.data.shard_size)
    store.put_text(f"{out}/hashes.json", json.dumps([h.to_dict() for h in kept_hashes]))
    report = pipeline.report.to_dict()
    store.put_text(f"{out}/report.json", json.dumps(report, indent=2))
    context.log.info(f"filtered crawl batch {batch}: {report['input_count']} -> {report['kept_count']} pairs")
    return dg.MaterializeResult(
        metadata={
            "input": report["input_count"],
            "kept": report["kept_count"],
            "removed_per_filter": md(removed_table(report)),
            "accepted_preview": md(md_image(png_bytes(image_grid(accepted_preview)), "accepted")),
            "rejected_preview": md(md_image(png_bytes(image_grid([im for ims in rejected.values() for im in ims])),
                                            "rejected")),
            "location": dg.MetadataValue.path(store.uri(out)),
        }
    )


def removed_table(report: dict) -> str:
    rows = [(name, n, "; ".join(f"{e['caption'][:40]!r}: {e['reason']}" for e in report["examples"].get(name, [])[:2]))
            for name, n in report["removed"].items()]
    return md_table(["filter", "removed", "examples"], rows)


def filtered_batches(context, store) -> tuple[list[str], dict[str, str]]:
    """(batches that pass their quality gate, {held-back batch: reason}) over every crawl batch the
    instance knows, each filtered (its report written last); else a Failure naming the rest."""
    batches = sorted(context.instance.get_dynamic_partitions(crawl_batches.name))
    if not batches:
        raise dg.Failure("no crawl batch yet: add a URL list to the inbox (new_url_list_sensor) and crawl it")
    unfiltered = [b for b in batches if not store.exists(f"{filtered_prefix(b)}/report.json")]
    if unfiltered:
        raise dg.Failure(f"crawl batches not filtered yet: {', '.join(unfiltered)} "
                         "(materialize their filtered_pairs partitions first)")
    gates = {b: batch_gate(store, b) for b in batches}
    held_back = {b: g.reason for b, g in gates.items() if not g.passed}
    passing = [b for b in batches if gates[b].passed]
    if not passing:
        raise dg.Failure("every crawl batch is held back by its data-quality gate: "
                         + " | ".join(held_back.values()), metadata={"held_back": md(held_back_table(held_back))})
    return passing, held_back


def held_back_table(held_back: dict[str, str]) -> str:
    return md_table(["crawl batch", "held back because"], sorted(held_back.items())) if held_back else "none"


def register_code_shards(instance, names: list[str]) -> None:
    """One code_shards partition per shard (image_codes encodes each in its own run); stale keys removed."""
    known = set(instance.get_dynamic_partitions(code_shards.name))
    instance.add_dynamic_partitions(code_shards.name, [n for n in names if n not in known])
    for stale in sorted(known - set(names)):
        instance.delete_dynamic_partition(code_shards.name, stale)


@dg.asset(
    # waits until every known batch is filtered (eager skips while a dependency partition is missing or running),
    # and not after a batch whose blocking check failed (that batch is held back; the shards would not change)
    automation_condition=(dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed())
    .with_label("eager, once the blocking checks of its dependencies passed"),
    retry_policy=STORAGE_RETRY,
    name="shards",
    deps=[filtered_pairs],
    group_name="data",
    kinds={"python"},
    description="Shuffled WebDataset training shards of every batch's filtered pairs, duplicates across batches "
    "removed (the first occurrence wins), with a manifest of counts and checksums and the merged filter report.",
)
def shards_asset(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    profile: ProfileResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    batches, held_back = filtered_batches(context, store)
    for batch, reason in held_back.items():
        context.log.warning(f"held back from the shards: {reason}")
    quality_gate.clear_verdict(store, SHARDS)  # new shards are unchecked until shards_expectations runs
    # the reduce: over the hashes each batch kept, not its images (dalle_core.data.dedup)
    cross = dedup_across_batches({b: read_kept_hashes(store, b) for b in batches}, prof.data.near_duplicate_max_distance)
    report = merge_reports({b: read_batch_report(store, b) for b in batches}, cross)
    dropped = {k for keys in cross.removed_keys.values() for k in keys}
    kept = (p for b in batches for p in shards.read_shards(store, filtered_prefix(b)) if p.key not in dropped)
    # sample-level shuffle with webdataset's own buffered shuffle (seeded: reruns give the same shards)
    shuffle = wds.shuffle(bufsize=SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=random.Random(prof.data.demo_seed))
    store.put_text(FILTER_REPORT, json.dumps(report, indent=2))
    # write_shards drops the manifest first, writes the shards, removes stale ones and
    # saves the manifest last: a run killed half-way leaves no manifest (readers refuse
    # the prefix) and its rerun, with the same seeded shuffle, rewrites the same shards
    manifest = shards.write_shards(shuffle(kept), store, SHARDS, prof.data.shard_size)
    register_code_shards(context.instance, [s.name for s in manifest.shards])
    with mlflow.start_run("data", tags={"stage": "data", "profile": prof.name}, data_version=data_version(store)) as run:
        mlflow.log_params({"profile": prof.name, "image_size": prof.data.image_size, "shard_size": prof.data.shard_size,
                           "crawl_batches": len(batches), "held_back_batches": ",".join(sorted(held_back)) or "none"})
        mlflow.log_metrics({"pairs_in": report["input_count"], "pairs_kept": report["kept_count"], "shards": len(manifest.shards)})
        mlflow.log_metrics({f"removed_{k}": v for k, v in report["removed"].items()})
        mlflow.log_dict(manifest.to_dict(), "manifest.json")
        mlflow.log_dict(report, "filter_report.json")
        run_url = mlflow.run_url(run)
    context.log.info(f"wrote {manifest.total} samples of {len(batches)} batches in {len(manifest.shards)} shards "
                     f"({cross.removed_count} duplicates across batches removed)")
    return dg.MaterializeResult(
        metadata={
            "samples": manifest.total,
            "shards": len(manifest.shards),
            "batches": len(batches),
            "held_back_batches": len(held_back),
            "held_back": md(held_back_table(held_back)),
            "input": report["input_count"],
            "cross_batch_duplicates": cross.removed_count,
            "removed_per_filter": md(removed_table(report)),
            "shard_list": md(md_table(["shard", "samples", "sha256"], [(s.name, s.count, s.sha256[:12]) for s in manifest.shards])),
            "manifest": dg.MetadataValue.path(store.uri(f"{SHARDS}/manifest.json")),
            "filter_report": dg.MetadataValue.path(store.uri(FILTER_REPORT)),
            "mlflow_run": dg.MetadataValue.url(run_url),
        }
    )


def load_eval_images(store, image_size: int, cache_dir: Path) -> list[tuple[object, str]]:
    """(square image at `image_size`, first caption) for every evaluation image in storage."""
    captions_json = store.get_file(f"{EVAL}/captions.json", cache_dir / "captions.json")
    out = []
    for im in coco.load_coco_captions(captions_json, None):
        data = store.get_bytes(f"{EVAL}/images/{im.file_name}")
        out.append((image_decode.resize_center_crop(image_decode.load_rgb(data), image_size), im.captions[0]))
    return out
