#!/bin/sh
# The image's entrypoint is `dalle`: `IMAGE plan --nodes 16` runs `dalle plan --nodes 16`.
# Dagster's Helm chart and K8sRunLauncher set container args to a whole command
# (`dagster api grpc ...`, `dagster api execute_run ...`); a first argument that
# is a program on PATH runs as given.
set -e
if [ "$#" -gt 0 ] && [ "$1" != "dalle" ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
[ "${1:-}" = "dalle" ] && shift
exec dalle "$@"
