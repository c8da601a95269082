"""Automation: the weekly retraining schedule, eager data assets, retry policies
on the steps that talk to storage, and the failure hook (alerts file + webhook)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg

from orchestration.definitions import build_definitions
from orchestration.settings import Settings


def test_schedule_automation_and_retries_are_declared(tmp_path):
    defs = build_definitions(Settings(run_dir=tmp_path, profile="tiny"))
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == "0 3 * * 0"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def("retrain_job")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {"dvae", "prior", "reranker", "coco_zero_shot_report"} <= keys and "raw_pairs" not in keys
    graph = defs.resolve_asset_graph()
    for key in ("filtered_pairs", "shards"):
        cond = graph.get(dg.AssetKey(key)).automation_condition
        assert cond is not None and "eager" in (cond.get_label() or cond.name or "").lower(), key
    for key in ("raw_pairs", "shards", "image_codes"):
        policy = defs.get_assets_def(key).op.retry_policy
        assert policy is not None and policy.max_retries >= 2, key
    # every job reports failures
    for name in ("crawl_job", "data_job", "dvae_job", "prior_job", "generation_job", "evaluation_job", "retrain_job"):
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
