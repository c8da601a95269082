"""Failure notifications: every job of the platform carries `notify_on_failure`.

A failed step appends one JSON line to the alerts file (``$DALLE_ALERTS_FILE``,
default ``<run dir>/alerts.jsonl``) and, when ``$DALLE_ALERT_WEBHOOK`` is set,
POSTs the same record to it (Slack / Teams / PagerDuty incoming webhooks accept
a JSON body). A notification that cannot be delivered is logged, never raised:
it must not hide the failure it reports.
"""

import json
import os
import time
import urllib.request
from pathlib import Path

import dagster as dg


def alerts_file() -> Path:
    explicit = os.environ.get("DALLE_ALERTS_FILE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("DALLE_RUN_DIR", "runs/demo")) / "alerts.jsonl"


@dg.failure_hook
def notify_on_failure(context: dg.HookContext) -> None:
    error = context.op_exception
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": context.job_name,
        "run_id": context.run_id,
        "step": context.step_key,
        "error": f"{type(error).__name__}: {error}"[:1000] if error is not None else "unknown",
        "text": f"DALL-E platform: step {context.step_key} of {context.job_name} failed (run {context.run_id})",
    }
    path = alerts_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    url = os.environ.get("DALLE_ALERT_WEBHOOK")
    if url:
        try:
            req = urllib.request.Request(url, data=json.dumps(record).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=5).close()
        except Exception as e:  # noqa: BLE001 - a broken webhook must not mask the failure
            context.log.warning(f"failure notification to the webhook failed: {e}")
    context.log.error(record["text"])
