#!/bin/sh
# Debian's Chromium for the browser tests (Playwright drives it via executable_path;
# `playwright install` would download its own build). Run by `make test`.
# Idempotent: does nothing when /usr/bin/chromium is already there. When it is missing and
# cannot be installed (not root and no sudo, or apt-get fails) it exits non-zero and says why:
# under CI=true the browser tests would fail anyway; locally (CI unset) `make test` stops here
# too - set SKIP_CHROMIUM=1 to run the suite without it (the browser tests then skip).
set -eu
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "${SKIP_CHROMIUM:-}" = 1 ]; then
    case "${CI:-}" in
        ""|0|false|no|off) ;;
        *) echo "install-chromium.sh: SKIP_CHROMIUM=1 is not allowed under CI=${CI}: the browser tests need $CHROMIUM" >&2
           exit 1 ;;
    esac
    echo "install-chromium.sh: $CHROMIUM missing, not installed (SKIP_CHROMIUM=1): the browser tests will skip" >&2
    exit 0
fi
fail() {
    echo "install-chromium.sh: $CHROMIUM is missing and could not be installed: $1" >&2
    echo "  install Debian's chromium as root (apt-get install chromium), or for a quick local run" >&2
    echo "  without the browser tests: make test SKIP_CHROMIUM=1 (never under CI=true)" >&2
    exit 1
}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    # sudo without a password, or asking for one on a terminal (never hang a CI job on a prompt)
    if command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then SUDO="sudo"; else
        fail "not root, and no sudo that can run without a password prompt"
    fi
fi
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine (Debian's package is expected)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q || fail "apt-get update failed"
$SUDO apt-get install -y -q --no-install-recommends chromium || fail "apt-get install chromium failed"
[ -x "$CHROMIUM" ] || fail "apt-get installed chromium but $CHROMIUM is not there"
