"""Automation: the weekly retraining schedule, eager data assets, retry policies
on the steps that talk to storage, and the failure hook (alerts file + webhook)."""

import json
import uuid
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg

from orchestration.definitions import build_definitions
from orchestration.settings import Settings
from platform_jobs import retrain_chain_result


def test_schedule_automation_and_retries_are_declared(tmp_path):
    defs = build_definitions(Settings(run_dir=tmp_path, profile="tiny"))
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == "0 3 * * 0"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    # the weekly retrain: retrain_job, then (retrain_chain_sensor) image_codes per shard, then retrain_tail_job
    def keys(job):
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys}

    assert keys("retrain_job") == {"bpe_tokenizer", "dvae"}
    assert {"image_codes_manifest", "prior", "reranker", "samples", "coco_zero_shot_report"} <= keys("retrain_tail_job")
    assert "raw_pairs" not in keys("retrain_tail_job") | keys("retrain_job")
    graph = defs.resolve_asset_graph()
    for key in ("filtered_pairs", "shards"):  # a new crawl batch -> its filters -> shards
        cond = graph.get(dg.AssetKey(key)).automation_condition
        assert cond is not None and "eager" in (cond.get_label() or cond.name or "").lower(), key
    # shards waits for passing blocking checks (a failed batch is also held back by shards itself: test_quality_gate)
    assert "blocking checks" in graph.get(dg.AssetKey("shards")).automation_condition.get_label()
    for key in ("raw_pairs", "shards", "image_codes"):
        policy = defs.get_assets_def(key).op.retry_policy
        assert policy is not None and policy.max_retries >= 2, key
    # every job reports failures
    assert {j.name for j in defs.resolve_all_job_defs()} >= {
        "crawl_job", "eval_set_job", "filter_job", "shards_job", "dvae_job", "image_codes_job", "prior_job",
        "generation_job", "evaluation_job", "retrain_job", "retrain_tail_job"}
    for name in (j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")):
        assert any(h.name == "notify_on_failure" for h in defs.resolve_job_def(name).hook_defs), name


class _Catcher(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Catcher.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_a_failed_step_writes_an_alert_and_calls_the_webhook(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Catcher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    alerts = tmp_path / "alerts.jsonl"
    monkeypatch.setenv("DALLE_ALERTS_FILE", str(alerts))
    monkeypatch.setenv("DALLE_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
    try:
        settings = Settings(run_dir=tmp_path / "run", profile="tiny")
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        # no crawl has run: the dVAE stage has no shards to read and fails
        res = defs.resolve_job_def("dvae_job").execute_in_process(instance=instance, raise_on_error=False)
        assert not res.success
    finally:
        server.shutdown()
    records = [json.loads(l) for l in alerts.read_text().splitlines()]
    assert records and records[0]["job"] == "dvae_job" and records[0]["run_id"] == res.run_id
    assert records[0]["step"] in ("bpe_tokenizer", "dvae") and records[0]["error"]
    assert _Catcher.received and _Catcher.received[0]["run_id"] == res.run_id


def _materialized(instance, key: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))


def _checked(instance, key: str, check: str, passed: bool) -> None:
    instance.report_runless_asset_event(dg.AssetCheckEvaluation(asset_key=dg.AssetKey(key), check_name=check,
                                                                passed=passed))


def test_a_new_crawl_batch_is_filtered_then_shards_wait_for_every_batch(tmp_path):
    """Eager automation: a crawled batch requests its own filtered_pairs partition only; shards
    is requested once every known batch is filtered, not before."""
    from assets.data import crawl_batches

    defs = build_definitions(Settings(run_dir=tmp_path, profile="tiny"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_batches.name, ["a.csv", "b.csv"])
    _materialized(instance, "coco_eval_set")
    data = dg.AssetSelection.assets("filtered_pairs", "shards")
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=data).cursor
    _materialized(instance, "raw_pairs", "a.csv")
    _materialized(instance, "filtered_pairs", "a.csv")
    _materialized(instance, "raw_pairs", "b.csv")  # a new crawl batch
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=data, cursor=cursor)
    assert result.get_requested_partitions(dg.AssetKey("filtered_pairs")) == {"b.csv"}
    assert result.get_num_requested(dg.AssetKey("shards")) == 0  # b.csv is not filtered yet
    _materialized(instance, "filtered_pairs", "b.csv")
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=data, cursor=result.cursor)
    assert result.get_num_requested(dg.AssetKey("shards")) == 0  # b.csv's blocking check has not passed yet
    _checked(instance, "filtered_pairs", "filtered_pairs_expectations", passed=True)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=data, cursor=result.cursor)
    assert result.get_num_requested(dg.AssetKey("shards")) == 1


def _finished_run(instance, job: str, tags: dict | None = None, partition: str | None = None,
                  status=dg.DagsterRunStatus.SUCCESS) -> dg.DagsterRun:
    tags = {**(tags or {}), **({"dagster/partition": partition} if partition else {})}
    return instance.add_run(dg.DagsterRun(job_name=job, run_id=str(uuid.uuid4()), tags=tags, status=status))


def test_the_weekly_retrain_is_chained_past_the_per_shard_encoding():
    """retrain_job -> image_codes_job for every shard (a run each) -> retrain_tail_job once all succeeded."""
    from assets.data import code_shards
    from orchestration.sensors import RETRAIN_TAG

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(code_shards.name, ["shard-00000.tar", "shard-00001.tar"])
    retrain = _finished_run(instance, "retrain_job")
    requests = retrain_chain_result(instance, retrain)
    assert [(r.job_name, r.partition_key, r.tags[RETRAIN_TAG]) for r in requests] == [
        ("image_codes_job", "shard-00000.tar", retrain.run_id), ("image_codes_job", "shard-00001.tar", retrain.run_id)]
    tag = {RETRAIN_TAG: retrain.run_id}
    first = _finished_run(instance, "image_codes_job", tag, "shard-00000.tar")
    _finished_run(instance, "image_codes_job", tag, "shard-00001.tar", status=dg.DagsterRunStatus.STARTED)
    waiting = retrain_chain_result(instance, first)
    assert isinstance(waiting, dg.SkipReason) and "shard-00001.tar" in waiting.skip_message
    last = _finished_run(instance, "image_codes_job", tag, "shard-00001.tar")  # (a rerun would do the same)
    tail = retrain_chain_result(instance, last)
    assert tail.job_name == "retrain_tail_job" and tail.run_key == f"{retrain.run_id}:tail"
    # an image_codes run outside a retrain (the demo, a person in the UI) starts nothing
    assert isinstance(retrain_chain_result(instance, _finished_run(instance, "image_codes_job")), dg.SkipReason)
