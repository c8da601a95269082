"""The data-quality gate in the runs the platform itself makes: a crawl batch that fails
its suite is held back from the shards whatever launches them (eager automation, the
shards_job a person starts), the stages after the shards refuse shards that failed
theirs (the weekly retrain included), and a batch fixed and re-filtered flows on."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from services import free_port

pytestmark = pytest.mark.slow

DATA = dg.AssetSelection.assets("filtered_pairs", "shards")


def _failure_text(result) -> str:
    return "\n".join(str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure)


def test_a_bad_batch_is_held_back_on_every_path_and_flows_on_once_fixed(tmp_path):
    from assets.asset_checks import shards_expectations
    from assets.data import batch_prefix, crawl_batches, filtered_prefix
    from dalle_core.data.crawl_parts import default_scratch_dir
    from dalle_core.storage import open_storage
    from orchestration.definitions import build_definitions
    from orchestration.demo import BROKEN_LIST, prepare_instance, write_demo_url_lists
    from assets.resources import demo_world_for
    from orchestration.sensors import new_url_list_sensor
    from orchestration.settings import Settings

    settings = Settings(run_dir=tmp_path / "run", profile="tiny", demo_port=free_port())
    instance = prepare_instance(settings)
    defs = build_definitions(settings)
    resources = defs.resources
    profile = resources["profile"].get()
    store = open_storage(settings.storage_root)
    lists = write_demo_url_lists(settings)  # the world's two batches and a list of mostly dead links
    good = [n for n in lists if n != BROKEN_LIST]
    assert BROKEN_LIST in lists and len(good) == 2

    def job(name, partition_key=None):
        return defs.resolve_job_def(name).execute_in_process(instance=instance, partition_key=partition_key,
                                                             raise_on_error=False)

    def automation(cursor):
        return dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=DATA, cursor=cursor)

    # the inbox sensor turns each URL list into a crawl batch and requests its crawl
    sensed = new_url_list_sensor(dg.build_sensor_context(instance=instance, resources={"crawl_source": resources["crawl_source"]}))
    instance.add_dynamic_partitions(crawl_batches.name, [r.partition_key for r in sensed.run_requests])
    cursor = automation(None).cursor
    with resources["crawl_source"].serving(profile):
        for request in sensed.run_requests:
            assert job("crawl_job", request.partition_key).success
    assert job("eval_set_job").success

    # eager automation filters every new batch; the broken one fails its blocking suite
    tick = automation(cursor)
    assert tick.get_requested_partitions(dg.AssetKey("filtered_pairs")) == set(lists)
    bad = job("filter_job", BROKEN_LIST)
    assert not bad.success and bad.get_asset_materialization_events()  # filtered, then its check failed
    [evaluation] = bad.get_asset_check_evaluations()
    result_text = evaluation.metadata["result"].value
    assert not evaluation.passed and evaluation.metadata["verdict"].value == "HELD BACK from the shards"
    assert "crawl_failure_rate" in result_text and "max_crawl_failure_rate" in result_text, result_text
    tick = automation(tick.cursor)
    assert tick.get_num_requested(dg.AssetKey("shards")) == 0  # waits: the latest blocking check failed

    for name in good:  # passing batches
        assert job("filter_job", name).success
    tick = automation(tick.cursor)
    assert tick.get_num_requested(dg.AssetKey("shards")) == 1  # the good batches flow on
    shards_run = job("shards_job")  # what the request launches (and what a person starts in the UI)
    assert shards_run.success
    meta = shards_run.get_asset_materialization_events()[0].materialization.metadata
    assert meta["held_back_batches"].value == 1
    assert BROKEN_LIST in meta["held_back"].value and "crawl_failure_rate" in meta["held_back"].value
    report = json.loads(store.get_text("shards/filter_report.json"))
    assert sorted(report["batches"]) == sorted(good)  # nothing of the broken batch entered the shards

    # a tokenizer / dVAE run (the weekly retrain's head) refuses shards that failed their suite
    manifest = json.loads(store.get_text("shards/manifest.json"))
    first = f"shards/{manifest['shards'][0]['name']}"
    original = store.get_bytes(first)
    middle = len(original) // 2
    store.put_bytes(first, original[:middle] + bytes(b ^ 0xFF for b in original[middle:middle + 64])
                    + original[middle + 64:])  # a corrupted shard
    assert not shards_expectations(storage=resources["storage"]).passed
    retrain = job("retrain_job")
    assert not retrain.success
    failure = _failure_text(retrain)
    assert "refusing the training shards" in failure and "checksum_ok" in failure, failure
    store.put_bytes(first, original)
    assert shards_expectations(storage=resources["storage"]).passed  # repaired and re-checked: accepted again

    # the broken list is fixed (its links re-listed alive), re-crawled and re-filtered: it flows on
    world = demo_world_for(profile)
    world.write_broken_url_list(settings.url_list_dir, f"http://127.0.0.1:{settings.demo_port}", BROKEN_LIST,
                                dead_fraction=0.0)
    for key in store.list(batch_prefix(BROKEN_LIST) + "/"):  # the old crawl's parts describe the old list
        store.delete(key)
    shutil.rmtree(default_scratch_dir(store, batch_prefix(BROKEN_LIST)), ignore_errors=True)
    with resources["crawl_source"].serving(profile):
        assert job("crawl_job", BROKEN_LIST).success
    tick = automation(tick.cursor)
    assert tick.get_requested_partitions(dg.AssetKey("filtered_pairs")) == {BROKEN_LIST}
    fixed = job("filter_job", BROKEN_LIST)
    assert fixed.success and fixed.get_asset_check_evaluations()[0].passed
    assert json.loads(store.get_text(f"{filtered_prefix(BROKEN_LIST)}/quality.json"))["success"]
    tick = automation(tick.cursor)
    assert tick.get_num_requested(dg.AssetKey("shards")) == 1
    rerun = job("shards_job")
    assert rerun.success
    assert rerun.get_asset_materialization_events()[0].materialization.metadata["held_back_batches"].value == 0
    assert sorted(json.loads(store.get_text("shards/filter_report.json"))["batches"]) == sorted(lists)


def test_shards_refuse_when_every_batch_is_held_back(tmp_path):
    """No batch passes: shards_job fails, naming each batch and its failed figure, and writes nothing."""
    from assets.data import crawl_batches
    from dalle_core.storage import open_storage
    from orchestration.definitions import build_definitions
    from orchestration.demo import BROKEN_LIST, prepare_instance
    from assets.resources import demo_world_for
    from orchestration.settings import Settings

    settings = Settings(run_dir=tmp_path / "run", profile="tiny", demo_port=free_port())
    instance = prepare_instance(settings)
    defs = build_definitions(settings)
    profile = defs.resources["profile"].get()
    demo_world_for(profile).write_broken_url_list(settings.url_list_dir, f"http://127.0.0.1:{settings.demo_port}",
                                                  BROKEN_LIST)
    instance.add_dynamic_partitions(crawl_batches.name, [BROKEN_LIST])
    run = lambda name, key=None: defs.resolve_job_def(name).execute_in_process(  # noqa: E731
        instance=instance, partition_key=key, raise_on_error=False)
    with defs.resources["crawl_source"].serving(profile):
        assert run("crawl_job", BROKEN_LIST).success
    assert run("eval_set_job").success
    assert not run("filter_job", BROKEN_LIST).success
    shards_run = run("shards_job")
    assert not shards_run.success
    failure = _failure_text(shards_run)
    assert "every crawl batch is held back" in failure and BROKEN_LIST in failure and "crawl_failure_rate" in failure
    assert not open_storage(settings.storage_root).exists("shards/manifest.json")
