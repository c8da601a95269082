"""`make ui`: the Dagster UI and the MLflow UI come up on 127.0.0.1 and go away together."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services import free_port, port_closed, wait_for_port

pytestmark = pytest.mark.slow




def test_ui_serves_dagster_and_mlflow_and_stops_both(tmp_path):
    dport, mport = free_port(), free_port()
    dalle = Path(sys.executable).parent / "dalle"
    proc = subprocess.Popen(
        [str(dalle), "ui", "--run-dir", str(tmp_path / "run"), "--profile", "tiny",
         "--dagster-port", str(dport), "--mlflow-port", str(mport)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_port(dport, timeout=120, proc=proc)
        wait_for_port(mport, timeout=120, proc=proc)
        info = None
        for _ in range(60):  # the webserver answers once the code location loaded
            try:
                query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{dport}/graphql", data=query,
                                             headers={"Content-Type": "application/json"})
                info = json.load(urllib.request.urlopen(req, timeout=5))
                if info.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        keys = {"/".join(n["assetKey"]["path"]) for n in info["data"]["assetNodes"]}
        assert {"raw_pairs", "filtered_pairs", "shards", "dvae"} <= keys
        assert urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    assert f"http://127.0.0.1:{dport}" in out and f"http://127.0.0.1:{mport}" in out
    assert port_closed(dport) and port_closed(mport), "a UI process outlived `dalle ui`"
