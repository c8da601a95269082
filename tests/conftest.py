import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# keep library noise out of test output and never phone home
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_configure(config):
    # required services: a `service` test whose service is missing fails under CI=true, skips locally
    from services import RequiredServices

    if not config.pluginmanager.has_plugin("dalle-required-services"):
        config.pluginmanager.register(RequiredServices(), "dalle-required-services")


@pytest.fixture(scope="session")
def s3_endpoint():
    from services import moto_s3_server, s3_test_env

    old = {k: os.environ.get(k) for k in s3_test_env()}
    os.environ.update(s3_test_env())
    with moto_s3_server() as url:
        yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    import uuid

    import boto3

    name = f"dalle-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One tiny demo run of the data lineage on a persistent local instance."""
    from orchestration.demo import run_demo
    from services import free_port
    from orchestration.settings import Settings

    run_dir = tmp_path_factory.mktemp("run")
    settings = Settings(run_dir=run_dir, profile="tiny", demo_port=free_port())
    lines: list[str] = []
    summary = run_demo(settings, say=lines.append)
    return settings, summary, lines


# Debian's Chromium (scripts/install-chromium.sh), flags that keep it off this machine's closed network
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright, one per test module (a required service: missing,
    the test fails under CI=true and skips otherwise)."""
    from services import require_module, require_service

    sync_api = require_module("playwright.sync_api", "the playwright package is not installed (extra 'dev')")
    if not CHROMIUM.exists():
        require_service(f"{CHROMIUM} not found: run scripts/install-chromium.sh (as root) to install Debian's chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def sampler_caches(monkeypatch):
    """Every StaticKVCache the sampler makes while the test runs, in order."""
    from dalle_core.prior import sampling

    caches = []

    class Recording(sampling.StaticKVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(sampling, "StaticKVCache", Recording)
    return caches
