"""Required services: under CI=true a test whose real service (Chromium, Postgres, moto S3,
torch-fidelity) is missing fails with the reason; without CI it skips. Checked on a throw-away
test module run by pytest in a subprocess with the suite's own conftest.py and services.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

MODULE = '''
import pytest

from services import require_module, require_service


def test_require_service():
    require_service("no frobnicator on this machine")


def test_require_module():
    require_module("no_such_module_for_dalle_tests", "the frobnicator client is not installed")


@pytest.mark.service
def test_marked_importorskip():
    pytest.importorskip("no_such_module_for_dalle_tests", reason="frobnicator bindings missing")


@pytest.fixture
def postgres_server():  # a service fixture by name: its tests are marked `service` automatically
    pytest.skip("no PostgreSQL server binaries (pg_ctl) on this machine")


def test_uses_a_service_fixture(postgres_server):
    pass


def test_optional_tool():  # not a required service (kubectl's API-server check): stays a skip
    pytest.skip("kubectl needs an API server")


def test_passes():
    pass
'''


def run_module(tmp_path: Path, ci: str | None) -> dict[str, tuple[str, str]]:
    """Run MODULE under the suite's conftest; {test name: (outcome, message)}."""
    d = tmp_path / f"ci-{ci}"
    d.mkdir()
    for name in ("conftest.py", "services.py"):
        shutil.copy(HERE / name, d / name)
    (d / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not the project's settings
    (d / "test_module.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "out.xml",
                        "test_module.py"], cwd=d, env=env, capture_output=True, text=True, timeout=120)
    assert (d / "out.xml").exists(), r.stdout + r.stderr
    got = {}
    for case in ET.parse(d / "out.xml").iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, child.get("message", "") + (child.text or "")
        got[case.get("name")] = (outcome, message)
    got["returncode"] = (str(r.returncode), r.stdout[-2000:])
    return got


REQUIRED = ["test_require_service", "test_require_module", "test_marked_importorskip", "test_uses_a_service_fixture"]
REASONS = ["no frobnicator on this machine", "the frobnicator client is not installed",
           "frobnicator bindings missing", "no PostgreSQL server binaries (pg_ctl)"]


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_required_service_fails_under_ci(tmp_path, ci):
    got = run_module(tmp_path, ci)
    for name, reason in zip(REQUIRED, REASONS):
        outcome, message = got[name]
        # a skip in a fixture turns into an error of the setup, in the test body into a failure
        assert outcome in ("failure", "error"), (name, got[name])
        assert "required service missing" in message and reason in message, (name, message)
    assert got["test_optional_tool"][0] == "skipped"
    assert got["test_passes"][0] == "passed"
    assert got["returncode"][0] == "1", got["returncode"]


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_missing_required_service_skips_without_ci(tmp_path, ci):
    got = run_module(tmp_path, ci)
    for name, reason in zip(REQUIRED, REASONS):
        outcome, message = got[name]
        assert outcome == "skipped" and reason in message, (name, got[name])
    assert got["test_optional_tool"][0] == "skipped"
    assert got["returncode"][0] == "0", got["returncode"]
