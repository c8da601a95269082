"""The data stage as Dagster assets: raw_pairs -> filtered_pairs -> shards, and the
zero-shot evaluation set. Thin wrappers: the work is in dalle_core.data."""


import json
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import dagster as dg
import webdataset as wds

from assets.metadata import md, md_image, md_table
from dalle_core.data import coco, crawl as crawling, filters, shards
from dalle_core.data.pairs import Pair
from dalle_core.imaging import image_grid, png_bytes
from orchestration.resources import (
    CrawlSourceResource,
    MlflowResource,
    ProfileResource,
    StorageResource,
    data_version,
    demo_world_for,
)

crawl_batches = dg.DynamicPartitionsDefinition(name="crawl_batches")

RAW = "raw_pairs"
FILTERED = "filtered_pairs"
SHARDS = "shards"
# a step that lost its storage connection half-way is rerun (writes are idempotent: same keys)
STORAGE_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)
EVAL = "coco_eval"
SHUFFLE_BUFFER = 10_000


def batch_prefix(partition_key: str) -> str:
    """Storage prefix of one crawl batch: the URL list's name without its extension."""
    stem = partition_key.split(".")[0]
    return f"{RAW}/{stem}"


def completed_batches(storage) -> list[str]:
    """Crawl batches whose crawl finished (summary written last)."""
    return sorted(k.rsplit("/", 1)[0] for k in storage.list(RAW + "/") if k.endswith("/summary.json"))


def iter_raw_pairs(storage, batch_prefixes: list[str]):
    for prefix in batch_prefixes:
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
        images = coco.load_coco_captions(captions_json, Path(image_dir) if image_dir else None, limit=config.limit)
        phashes, preview = {}, []
        for im in images:
            if im.path is None:
                raise ValueError(f"coco_eval_set needs image_dir to hash the evaluation images ({captions_json})")
            store.put_file(f"{EVAL}/images/{im.file_name}", im.path)
            img = crawling.load_rgb(im.path.read_bytes())
            square = crawling.resize_center_crop(img, prof.data.image_size)
            phashes[im.file_name] = filters.compute_phash(square)
            if len(preview) < 16:
                preview.append(square)
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


@dg.asset(
    automation_condition=dg.AutomationCondition.eager(),  # follows every new crawl batch
    retry_policy=STORAGE_RETRY,
    deps=[raw_pairs, coco_eval_set],
    group_name="data",
    kinds={"python"},
    description="Pairs that pass the paper's filters (caption length, English, not boilerplate dates, "
    "aspect ratio in [1/2, 2], size, exact/near duplicates, no overlap with the evaluation set).",
)
def filtered_pairs(
    context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    batches = completed_batches(store)
    if not batches:
        raise dg.Failure("no completed crawl batch in storage: materialize raw_pairs first")
    pipeline = filters.build_filters(prof.data, load_eval_phashes(store))
    rejected: dict[str, list] = {}

    def on_reject(pair: Pair, filter_name: str, reason: str) -> None:
        examples = rejected.setdefault(filter_name, [])
        if len(examples) < 4:
            examples.append(pair.image)

    accepted_preview: list = []

    def kept():
        for pair in pipeline.apply(iter_raw_pairs(store, batches), on_reject=on_reject):
            if len(accepted_preview) < 16:
                accepted_preview.append(pair.image)
            yield pair

    for old in store.list(FILTERED + "/"):
        store.delete(old)
    manifest = shards.write_shards(kept(), store, FILTERED, prof.data.shard_size)
    report = pipeline.report.to_dict()
    store.put_text(f"{FILTERED}/report.json", json.dumps(report, indent=2))
    context.log.info(f"filtered {report['input_count']} -> {report['kept_count']} pairs from {len(batches)} batches")

    rows = [(name, n, "; ".join(f"{e['caption'][:40]!r}: {e['reason']}" for e in report["examples"].get(name, [])[:2]))
            for name, n in report["removed"].items()]
    rejected_imgs = [im for ims in rejected.values() for im in ims]
    return dg.MaterializeResult(
        metadata={
            "input": report["input_count"],
            "kept": report["kept_count"],
            "batches": md("\n".join(f"- {b}" for b in batches)),
            "removed_per_filter": md(md_table(["filter", "removed", "examples"], rows)),
            "accepted_preview": md(md_image(png_bytes(image_grid(accepted_preview)), "accepted")),
            "rejected_preview": md(md_image(png_bytes(image_grid(rejected_imgs)), "rejected")),
            "location": dg.MetadataValue.path(store.uri(FILTERED)),
        }
    )


@dg.asset(
    automation_condition=dg.AutomationCondition.eager(),  # follows every new crawl batch
    retry_policy=STORAGE_RETRY,
    name="shards",
    deps=[filtered_pairs],
    group_name="data",
    kinds={"python"},
    description="Shuffled WebDataset training shards of the filtered pairs, with a manifest of counts and checksums.",
)
def shards_asset(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    profile: ProfileResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    store, prof = storage.get(), profile.get()
    # sample-level shuffle with webdataset's own buffered shuffle (seeded: reruns give the same shards)
    shuffle = wds.shuffle(bufsize=SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=random.Random(prof.data.demo_seed))
    pairs = shuffle(shards.read_shards(store, FILTERED))
    # write_shards drops the manifest first, writes the shards, removes stale ones and
    # saves the manifest last: a run killed half-way leaves no manifest (readers refuse
    # the prefix) and its rerun, with the same seeded shuffle, rewrites the same shards
    manifest = shards.write_shards(pairs, store, SHARDS, prof.data.shard_size)
    report = json.loads(store.get_text(f"{FILTERED}/report.json"))
    with mlflow.start_run("data", tags={"stage": "data", "profile": prof.name}, data_version=data_version(store)) as run:
        import mlflow as mlf

        mlf.log_params({"profile": prof.name, "image_size": prof.data.image_size, "shard_size": prof.data.shard_size})
        mlf.log_metrics({"pairs_in": report["input_count"], "pairs_kept": report["kept_count"], "shards": len(manifest.shards)})
        mlf.log_metrics({f"removed_{k}": v for k, v in report["removed"].items()})
        mlf.log_dict(manifest.to_dict(), "manifest.json")
        mlf.log_dict(report, "filter_report.json")
        run_url = mlflow.run_url(run)
    context.log.info(f"wrote {manifest.total} samples in {len(manifest.shards)} shards")
    return dg.MaterializeResult(
        metadata={
            "samples": manifest.total,
            "shards": len(manifest.shards),
            "shard_list": md(md_table(["shard", "samples", "sha256"], [(s.name, s.count, s.sha256[:12]) for s in manifest.shards])),
            "manifest": dg.MetadataValue.path(store.uri(f"{SHARDS}/manifest.json")),
            "mlflow_run": dg.MetadataValue.url(run_url),
        }
    )


def load_eval_images(store, image_size: int, cache_dir: Path) -> list[tuple[object, str]]:
    """(square image at `image_size`, first caption) for every evaluation image in storage."""
    captions_json = store.get_file(f"{EVAL}/captions.json", cache_dir / "captions.json")
    out = []
    for im in coco.load_coco_captions(captions_json, None):
        data = store.get_bytes(f"{EVAL}/images/{im.file_name}")
        out.append((crawling.resize_center_crop(crawling.load_rgb(data), image_size), im.captions[0]))
    return out
