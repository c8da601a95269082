"""Retraining when new data lands, through the platform's own runs: a URL list lands in the inbox
(new_url_list_sensor), is crawled, filtered and merged into the shards; the weekly retrain
(retrain_job, then retrain_chain_sensor's image_codes_job runs and retrain_tail_job) must then
train every model on the new shards, not load back the finished runs of the old ones; and a
rerun on the same data must still resume rather than train again."""

import hashlib
import shutil

import dagster as dg
import pytest

from platform_jobs import execute_platform_job, retrain_chain_result


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_retrain_after_new_data_trains_every_model_on_it_and_a_rerun_resumes(demo_run, tmp_path):
    from assets.data import crawl_batches
    from assets.resources import CrawlSourceResource
    from dalle_core.data.shards import Manifest
    from dalle_core.demo.server import serve_demo_world
    from dalle_core.demo.world import DemoWorld
    from dalle_core.storage import LocalStorage
    from orchestration.demo import prepare_instance
    from orchestration.sensors import new_url_list_sensor
    from orchestration.settings import Settings
    from services import free_port

    settings, _, _ = demo_run
    shutil.copytree(settings.run_dir, tmp_path / "run")
    copy = Settings(run_dir=tmp_path / "run", profile="tiny", demo_port=settings.demo_port)
    store = LocalStorage(copy.storage_root)
    models = {name: store.path(key) for name, key in
              [("dvae", "dvae/dvae.pt"), ("prior", "prior/prior.pt"), ("reranker", "reranker/reranker.pt")]}
    before = {name: _sha(path) for name, path in models.items()}
    pairs_before = Manifest.load(store, "shards").total

    # new data: another world's pages (seed 1), served on a port of their own, listed in the inbox
    world, port = DemoWorld(seed=1, items_per_batch=120, n_batches=1, n_eval=16), free_port()
    [listed] = world.write_url_lists(tmp_path / "lists", f"http://127.0.0.1:{port}")
    shutil.copy(listed, f"{copy.url_list_dir}/landed-{listed.name}")
    instance = prepare_instance(copy)
    source = CrawlSourceResource(url_list_dir=copy.url_list_dir, demo_world=False)
    landed = new_url_list_sensor(dg.build_sensor_context(instance=instance, resources={"crawl_source": source}))
    [request] = landed.run_requests
    assert request.partition_key == f"landed-{listed.name}"
    instance.add_dynamic_partitions(crawl_batches.name, [request.partition_key])
    with serve_demo_world(world, port=port):
        assert execute_platform_job(copy, "crawl_job", {}, partition_key=request.partition_key).success
    # (eager automation requests these two next: tests/test_automation.py)
    assert execute_platform_job(copy, "filter_job", {}, partition_key=request.partition_key).success
    assert execute_platform_job(copy, "shards_job", {}).success
    assert Manifest.load(store, "shards").total > pairs_before

    # stage two alone on the new data, the dVAE kept (the paper trains its prior on codes of a fixed
    # dVAE): every shard coded by the champion, then the prior trains afresh on all of them ...
    from assets.data import code_shards

    instance = prepare_instance(copy)
    for shard in instance.get_dynamic_partitions(code_shards.name):
        assert execute_platform_job(copy, "image_codes_job", {}, partition_key=shard).success
    first = execute_platform_job(copy, "prior_job", {})
    assert first.success
    meta = first.asset_materializations_for_node("prior")[0].metadata
    assert meta["train_start_step"].value == 0 and meta["train_step"].value == 60
    assert _sha(models["prior"]) != before["prior"]
    # ... and a rerun on the same codes resumes: the finished run is loaded back, nothing trains again
    again = execute_platform_job(copy, "prior_job", {})
    assert again.success
    assert again.asset_materializations_for_node("prior")[0].metadata["train_start_step"].value == 60

    # the weekly retrain, as its schedule and retrain_chain_sensor run it: every model on the new shards
    retrain = execute_platform_job(copy, "retrain_job", {})
    assert retrain.success
    dvae_meta = retrain.asset_materializations_for_node("dvae")[0].metadata
    assert dvae_meta["resumed_from"].value == "none"  # trained on the new shards, not loaded back
    assert _sha(models["dvae"]) != before["dvae"]
    instance = prepare_instance(copy)
    codes = retrain_chain_result(instance, instance.get_run_by_id(retrain.run_id))
    assert codes and all(r.job_name == "image_codes_job" for r in codes)
    for r in codes:
        last = execute_platform_job(copy, r.job_name, {}, partition_key=r.partition_key, tags=r.tags)
        assert last.success
    instance = prepare_instance(copy)
    tail = retrain_chain_result(instance, instance.get_run_by_id(last.run_id))
    assert tail.job_name == "retrain_tail_job"
    res = execute_platform_job(copy, tail.job_name, {}, tags=tail.tags)
    assert res.success
    assert res.asset_materializations_for_node("reranker")[0].metadata["resumed_from"].value == "none"
    assert _sha(models["reranker"]) != before["reranker"]
