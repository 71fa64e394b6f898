#!/bin/sh
# Run a command (default: the test suite) with a CPU hog beside it: a busy loop pinned to the
# last CPU for as long as the command runs, as on a shared CI machine. `make test-busy` runs it.
# The suite must pass like this on 2 cores: its waits only catch hangs (tests/helpers.py).
set -eu
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- .venv/bin/python -m pytest
cpus=$(nproc)
core=$((cpus - 1))
if command -v taskset >/dev/null 2>&1; then
    taskset -c "$core" sh -c 'while :; do :; done' &
else
    sh -c 'while :; do :; done' &
    core="any"
fi
hog=$!
trap 'kill "$hog" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
echo "test-busy: CPU hog (pid $hog) on CPU $core of $cpus beside: $*" >&2
status=0
"$@" || status=$?
exit "$status"
