"""Separate virtualenvs for the third-party baselines the benchmarks compare against.

A baseline (img2dataset for the crawler, DALLE-pytorch for the prior) is never
installed into the project's venv: each gets its own under bench/.venv-<name>
(gitignored), created on first use from bench/requirements-<name>.txt and
re-installed when that file changes (its sha256 is stamped in the venv). Lines
of the form ``# NO_DEPS: pkg==x.y`` are installed afterwards with --no-deps (a
package whose declared dependencies cannot be installed here but are not
needed for what the benchmark runs).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def ensure_venv(venv: Path, requirements: Path, import_check: str, install: bool, env: dict | None = None,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """The python of `venv` with `import_check` (Python code) running cleanly; creates or
    updates the venv from `requirements` when `install`. RuntimeError with the reason
    when that cannot be had."""
    py = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    current = py.exists() and stamp.exists() and stamp.read_text().strip() == digest
    if not current:
        if not install:
            raise RuntimeError(f"{venv} is missing or out of date with {requirements.name} and --no-install was given")
        if not py.exists():
            log(f"creating {venv} (the baseline's own venv; never the project's)")
            base = getattr(sys, "_base_executable", None) or sys.executable
            proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"python -m venv {venv} failed: {proc.stderr.strip()[-2000:]}")
        no_deps = re.findall(r"^#\s*NO_DEPS:\s*(\S+)", requirements.read_text(), flags=re.M)
        log(f"pip install -r {requirements.name} into {venv} (takes a minute or two once)")
        for args in (["-r", str(requirements)], *([["--no-deps", *no_deps]] if no_deps else [])):
            proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
                raise RuntimeError(f"pip install {' '.join(args)} failed (rc {proc.returncode}): {tail}")
        stamp.write_text(digest + "\n")
    proc = subprocess.run([str(py), "-c", import_check], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`{import_check}` fails in {venv}: {proc.stderr.strip()[-2000:]}")
    return py
