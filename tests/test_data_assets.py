"""The data stage as Dagster assets, materialized in process on the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest



def _store(settings):
    from dalle_core.storage import open_storage

    return open_storage(settings.storage_root)


def _world(settings):
    from dalle_core.profiles import get_profile
    from assets.resources import demo_world_for

    return demo_world_for(get_profile(settings.profile))


def test_definitions_load_with_every_asset_and_check():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw_pairs", "coco_eval_set", "filtered_pairs", "shards"} <= keys
    check_names = {k.name for k in graph.asset_check_keys}
    assert {"filtered_pairs_expectations", "shards_expectations"} <= check_names


def test_filters_and_codes_fan_out_as_partitions():
    """Crawl and filters: one partition per crawl batch; image codes: one per shard; the reduces are not partitioned."""
    from assets.data import code_shards, crawl_batches
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    partitions = {k: graph.get(dg.AssetKey(k)).partitions_def
                  for k in ("raw_pairs", "filtered_pairs", "shards", "image_codes", "image_codes_manifest")}
    assert partitions == {"raw_pairs": crawl_batches, "filtered_pairs": crawl_batches, "shards": None,
                          "image_codes": code_shards, "image_codes_manifest": None}
    assert {crawl_batches.name, code_shards.name} == {"crawl_batches", "code_shards"}
    # filtered_pairs depends on the same crawl batch of raw_pairs (identity), shards on every batch
    dep = graph.get(dg.AssetKey("filtered_pairs")).partition_mappings.get(dg.AssetKey("raw_pairs"))
    assert dep is None or isinstance(dep, dg.IdentityPartitionMapping)
    for job, pdef in (("crawl_job", crawl_batches), ("filter_job", crawl_batches), ("image_codes_job", code_shards),
                      ("shards_job", None), ("prior_job", None)):
        assert defs.resolve_job_def(job).partitions_def == pdef, job


@pytest.mark.slow
def test_demo_lineage_keeps_exactly_what_the_world_says(demo_run):
    """Every item the demo world marks 'keep' is in the shards, and nothing else."""
    from dalle_core.data import shards

    settings, summary, lines = demo_run
    store = _store(settings)
    world = _world(settings)
    items = [it for b in range(world.n_batches) for it in world.batch_items(b)]
    expected_keep = {it.key for it in items if it.expected == "keep"}
    kept = [p for p in shards.read_shards(store, "shards")]
    kept_keys = {p.meta["url"].rsplit("/", 1)[-1] for p in kept}
    assert len(kept) == len(kept_keys), "duplicates in shards"
    assert kept_keys == expected_keep, (
        f"missing {sorted(expected_keep - kept_keys)[:5]}, unexpected {sorted(kept_keys - expected_keep)[:5]}"
    )
    report = json.loads(store.get_text("shards/filter_report.json"))
    by_expectation: dict[str, int] = {}
    for it in items:
        by_expectation[it.expected] = by_expectation.get(it.expected, 0) + 1
    # each drop reason the world planted was removed by some filter
    assert sum(report["removed"].values()) == report["input_count"] - report["kept_count"]
    assert report["kept_count"] == len(expected_keep)
    batches = report["batches"]
    assert len(batches) == world.n_batches and sum(b["input_count"] for b in batches.values()) == report["input_count"]
    assert any("done in" in l for l in lines)


@pytest.mark.slow
def test_demo_checks_pass_and_metadata_is_there(demo_run):
    from dagster import DagsterInstance

    settings, summary, lines = demo_run
    instance = DagsterInstance.from_config(str(settings.dagster_home))
    for key in ("raw_pairs", "coco_eval_set", "filtered_pairs", "shards"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    meta = instance.get_latest_materialization_event(dg.AssetKey("filtered_pairs")).asset_materialization.metadata
    assert "data:image/png;base64," in meta["accepted_preview"].value
    assert "non_english" in meta["removed_per_filter"].value
    assert any("check filtered_pairs_expectations: passed" in l for l in lines)
    assert any("check shards_expectations: passed" in l for l in lines)
    manifest = json.loads(_store(settings).get_text("shards/manifest.json"))
    assert manifest["total"] == sum(s["count"] for s in manifest["shards"])


@pytest.mark.slow
def test_shards_registers_one_code_shards_partition_per_shard(demo_run):
    from assets.data import code_shards

    settings, _, _ = demo_run
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    manifest = json.loads(_store(settings).get_text("shards/manifest.json"))
    assert instance.get_dynamic_partitions(code_shards.name) == [s["name"] for s in manifest["shards"]]


def test_sensor_adds_a_partition_per_new_url_list(tmp_path):
    from assets.data import crawl_batches
    from assets.resources import CrawlSourceResource
    from orchestration.sensors import new_url_list_sensor

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "batch-000.csv").write_text("url,caption\nhttp://127.0.0.1:1/img/a,a red circle above a blue square\n")
    (inbox / "notes.txt").write_text("ignored")
    instance = dg.DagsterInstance.ephemeral()
    source = CrawlSourceResource(url_list_dir=str(inbox), demo_world=False)
    ctx = dg.build_sensor_context(instance=instance, resources={"crawl_source": source})
    result = new_url_list_sensor(ctx)
    assert [r.partition_key for r in result.run_requests] == ["batch-000.csv"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["batch-000.csv"]
    instance.add_dynamic_partitions(crawl_batches.name, ["batch-000.csv"])
    skipped = new_url_list_sensor(dg.build_sensor_context(instance=instance, resources={"crawl_source": source}))
    assert isinstance(skipped, dg.SkipReason)


def test_sensor_watches_an_s3_prefix(s3_endpoint, s3_bucket, monkeypatch):
    from dalle_core.storage import open_storage
    from assets.resources import CrawlSourceResource
    from orchestration.sensors import new_url_list_sensor

    monkeypatch.setenv("DALLE_S3_ENDPOINT_URL", s3_endpoint)
    inbox = open_storage(f"s3://{s3_bucket}/inbox", endpoint_url=s3_endpoint)
    csv = "url,caption\nhttp://127.0.0.1:1/img/a,a red circle above a blue square\n"
    inbox.put_text("batch-007.csv", csv)
    inbox.put_text("old/batch-000.csv", csv)  # a sub-folder is not the inbox
    inbox.put_text("readme.txt", "ignored")
    source = CrawlSourceResource(url_list_dir=f"s3://{s3_bucket}/inbox", demo_world=False)
    ctx = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources={"crawl_source": source})
    result = new_url_list_sensor(ctx)
    assert [r.partition_key for r in result.run_requests] == ["batch-007.csv"]
    assert source.url_list_path("batch-007.csv").read_text() == csv
    with pytest.raises(FileNotFoundError, match="batch-404.csv"):
        source.url_list_path("batch-404.csv")


@pytest.mark.slow
def test_sharding_killed_half_way_reruns_to_complete_shards(demo_run, monkeypatch):
    """A shards run that dies after writing two shards leaves no manifest (so nothing
    downstream reads a half-written prefix); the rerun writes every kept pair once."""
    from dalle_core.data import shards
    from dalle_core.storage import LocalStorage
    from orchestration.definitions import build_definitions

    settings, _, _ = demo_run
    store = _store(settings)
    before = json.loads(store.get_text("shards/manifest.json"))
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    defs = build_definitions(settings)
    job = defs.resolve_job_def("shards_job")
    real_put = LocalStorage.put_file
    calls = {"n": 0}

    def dying_put(self, key, path):
        if key.startswith("shards/shard-"):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError("killed while writing shards")
        return real_put(self, key, path)

    monkeypatch.setattr(LocalStorage, "put_file", dying_put)
    # (the step's retry policy retries twice, ~30 s; each retry dies the same way)
    res = job.execute_in_process(instance=instance, raise_on_error=False, asset_selection=[dg.AssetKey("shards")])
    assert not res.success
    assert not store.exists("shards/manifest.json")  # the prefix reads as incomplete
    with pytest.raises(Exception, match="manifest"):
        list(shards.read_shards(store, "shards"))

    monkeypatch.setattr(LocalStorage, "put_file", real_put)
    res = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("shards")])
    assert res.success
    after = json.loads(store.get_text("shards/manifest.json"))
    assert after["total"] == before["total"] and [s["sha256"] for s in after["shards"]] == \
        [s["sha256"] for s in before["shards"]]  # the same seeded shuffle: byte-identical shards
    keys = [p.key for p in shards.read_shards(store, "shards")]
    assert len(keys) == len(set(keys)) == before["total"]
    assert sorted(k for k in store.list("shards/") if k.endswith(".tar")) == \
        sorted(f"shards/{s['name']}" for s in after["shards"])


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, copy_function=shutil.copy2)


def _new_batch_with_cross_batch_duplicates(kept: list) -> list:
    """A crawl batch of three pairs: an exact copy of one pair another batch kept, a JPEG
    re-encoding (a near duplicate) of a second, and a rotated third (new to the data set)."""
    import hashlib
    import io

    from dalle_core.data.pairs import Pair

    def raw(key: str, source, image_bytes: bytes, ext: str) -> Pair:
        meta = {k: v for k, v in source.meta.items() if k != "phash"}  # as the crawler wrote it
        if image_bytes != source.image_bytes:
            meta["sha256"] = hashlib.sha256(image_bytes).hexdigest()
        return Pair(key=key, caption=source.caption, image_bytes=image_bytes, image_ext=ext, meta=meta)

    def encoded(image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()

    exact, near, other = kept[0], kept[1], kept[2]
    return [
        raw("b900-000000", exact, exact.image_bytes, exact.image_ext),
        raw("b900-000001", near, encoded(near.image, "JPEG"), "jpg"),
        raw("b900-000002", other, encoded(other.image.rotate(90), "PNG"), "png"),
    ]


@pytest.mark.slow
def test_a_new_crawl_batch_is_filtered_alone_and_shards_drop_cross_batch_duplicates_once(demo_run, tmp_path):
    """The demo's data on a fresh instance, plus a new crawl batch holding an exact and a near copy of
    pairs an earlier batch kept: its filtered_pairs partition touches no other batch's output, and
    shards keeps every first occurrence exactly once and drops the two copies."""
    from assets.data import code_shards, crawl_batches
    from dalle_core.data import shards
    from orchestration.definitions import build_definitions
    from orchestration.settings import Settings

    demo_settings, _, _ = demo_run
    settings = Settings(run_dir=tmp_path / "run", profile="tiny")
    root = Path(settings.storage_root)
    for part in ("raw_pairs", "coco_eval", "filtered_pairs"):
        _copy_tree(Path(demo_settings.storage_root) / part, root / part)
    store = _store(settings)
    old_batches = sorted(dg.DagsterInstance.from_config(str(demo_settings.dagster_home))
                         .get_dynamic_partitions(crawl_batches.name))
    first_kept = list(shards.read_shards(store, "filtered_pairs/batch-000"))
    new = _new_batch_with_cross_batch_duplicates(first_kept)
    shards.write_shards(new, store, "raw_pairs/batch-900", 100)
    store.put_text("raw_pairs/batch-900/summary.json", json.dumps({"n_rows": 3, "n_ok": 3, "n_failed": 0}))

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_batches.name, old_batches + ["batch-900.csv"])
    instance.add_dynamic_partitions(code_shards.name, ["shard-99999.tar"])  # a stale key shards must remove
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "filtered_pairs").rglob("*") if p.is_file()}
    defs = build_definitions(settings)

    res = defs.resolve_job_def("filter_job").execute_in_process(instance=instance, partition_key="batch-900.csv")
    assert res.success and all(e.passed for e in res.get_asset_check_evaluations())
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "filtered_pairs").rglob("*") if p.is_file()}
    assert {p: v for p, v in after.items() if p in before} == before, "another batch's filtered output changed"
    assert all(p.parts[-2] == "batch-900" for p in set(after) - set(before))
    batch_report = json.loads(store.get_text("filtered_pairs/batch-900/report.json"))
    assert batch_report["input_count"] == 3 and batch_report["kept_count"] == 3  # no duplicate within the batch

    res = defs.resolve_job_def("shards_job").execute_in_process(instance=instance)
    assert res.success
    report = json.loads(store.get_text("shards/filter_report.json"))
    assert report["cross_batch_removed"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert set(report["removed_keys"]["exact_duplicate"]) >= {"b900-000000"}
    assert "b900-000001" in report["removed_keys"]["near_duplicate"]
    kept_per_batch = {b: r["kept_count"] for b, r in report["batches"].items()}
    assert report["kept_count"] == sum(kept_per_batch.values()) - 2
    assert sum(report["removed"].values()) == report["input_count"] - report["kept_count"]
    keys = [p.key for p in shards.read_shards(store, "shards")]
    assert len(keys) == len(set(keys)) == report["kept_count"]
    assert "b900-000002" in keys and not {"b900-000000", "b900-000001"} & set(keys)
    assert {first_kept[0].key, first_kept[1].key} <= set(keys)  # the first occurrences stay, once
    manifest = shards.Manifest.load(store, "shards")
    assert instance.get_dynamic_partitions(code_shards.name) == [s.name for s in manifest.shards]
