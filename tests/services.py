"""Real services for tests, started on 127.0.0.1 by the tests themselves and stopped after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

# ---------------------------------------------------------------- required services
# Under CI (CI=true, what .ci/run sets) a test whose real service is missing FAILS, naming it: a
# green CI run then proves the browser, Postgres, S3 and FID cross-check tests really ran. On a
# developer's machine (CI unset) the same test skips with the same reason, for a quick local run.

SERVICE_MARK = "service"
# tests that use these fixtures need a real service: they get the `service` mark automatically
SERVICE_FIXTURES = frozenset({"browser", "s3_endpoint", "s3_bucket", "postgres", "postgres_server"})


def ci_requires_services() -> bool:
    """True under CI: the CI variable set to anything but empty/0/false/no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def require_service(reason: str) -> NoReturn:
    """Stop the test because a required service is missing: fail under CI, skip otherwise."""
    if ci_requires_services():
        pytest.fail(f"required service missing (CI={os.environ.get('CI')}): {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str):
    """pytest.importorskip for a package a real service needs: fails under CI, skips otherwise."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        require_service(f"{reason} ({type(e).__name__}: {e})")


class RequiredServices:
    """pytest plugin, registered by tests/conftest.py: gives every test that uses a service
    fixture the `service` mark and, under CI, turns any skip of a `service` test (an
    importorskip, a plain pytest.skip in a helper) into a failure that keeps the skip's reason."""

    def pytest_configure(self, config) -> None:
        config.addinivalue_line(
            "markers", f"{SERVICE_MARK}: needs a real service (Chromium, Postgres, moto S3, torch-fidelity); "
            "skips when it is missing, fails under CI=true")

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
                item.add_marker(getattr(pytest.mark, SERVICE_MARK))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        if (rep.skipped and not hasattr(rep, "wasxfail") and ci_requires_services()
                and item.get_closest_marker(SERVICE_MARK) is not None):
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            rep.outcome = "failed"
            rep.longrepr = (f"required service missing (CI={os.environ.get('CI')}): "
                            f"{reason.removeprefix('Skipped: ')}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} after {timeout}s")


def port_closed(port: int, timeout: float = 30.0) -> bool:
    """True once nothing listens on 127.0.0.1:port (a server went away), False after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.5)
    return False


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3-protocol server (from moto[server]) on loopback; yields its endpoint URL.
    Without moto[server] the test stops through require_service (fails under CI)."""
    import importlib.util

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        require_service("moto's S3 server is not installed (pip install 'moto[server]', extra 'dev')")
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        cmd + ["-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_test_env() -> dict[str, str]:
    """Dummy credentials for the loopback S3 server (never real secrets)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


class ServiceUnavailable(RuntimeError):
    """A real service the test needs could not start on this machine (the test hands the reason
    to require_service: it fails under CI, skips otherwise)."""


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on loopback (scripts/pg-test-server.sh); yields
    `postgresql://postgres@127.0.0.1:PORT` (trust auth: no password). Raises
    ServiceUnavailable when this machine has no server binaries or it does not start (the
    script finds the binaries and says why)."""
    import shutil
    import tempfile

    script = Path(__file__).resolve().parent.parent / "scripts" / "pg-test-server.sh"
    d = tempfile.mkdtemp(prefix="dalle-pg-")  # under /tmp: as root the server runs as `postgres`, which must reach it
    port = free_port()
    started = subprocess.run(["sh", str(script), "start", d, str(port)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        log = "".join(p.read_text()[-500:] for p in Path(d).glob("*.log"))
        shutil.rmtree(d, ignore_errors=True)
        raise ServiceUnavailable(f"could not start PostgreSQL: {started.stderr.strip()} {log}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(["sh", str(script), "stop", d], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def create_pg_database(server_url: str, name: str) -> str:
    """CREATE DATABASE name on a `postgresql://user@host:port` server; returns its URL."""
    import psycopg2

    conn = psycopg2.connect(f"{server_url}/postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return f"{server_url}/{name}"


def stop_process_group(proc: subprocess.Popen, sig: int | None = None, timeout: float = 30.0) -> None:
    """Stop a service started with start_new_session=True and everything it started: `sig`
    (default SIGTERM) to the leader, up to `timeout` seconds for it to exit, a few more for the
    rest of its process group, then SIGKILL to whatever is left of the group."""
    import signal

    pgid = proc.pid  # a session leader's group id is its pid, even after it exited
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if sig is None else sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # children (webserver, daemon, code servers, run workers) may outlive the leader
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
