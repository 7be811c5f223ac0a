#!/usr/bin/env bash
# `make test`: the integration tests (real servers) and, beside them, the unit tests.
#
# vLLM's CPU engine binds its compute threads to the first core(s) and leaves the last one to
# the serving process, so the integration tests keep a core idle much of the time: the unit
# tests run there, pinned to the last CPU with one thread, and the whole suite takes the
# integration tests' time instead of the sum of both. With one CPU, or without `taskset`, the
# two run one after the other. Extra arguments go to both pytest runs; the exit status is the
# first failure's.
set -uo pipefail

PY=${1:?usage: tests/run_suite.sh PYTHON [pytest args...]}
shift
cpus=$(nproc 2>/dev/null || echo 1)
unit_log=$(mktemp -t aligner-unit-tests.XXXXXX)
trap 'rm -f "$unit_log"' EXIT

if [ "$cpus" -ge 2 ] && command -v taskset >/dev/null; then
    OMP_NUM_THREADS=1 taskset -c "$((cpus - 1))" "$PY" -m pytest -q -m "not integration" "$@" >"$unit_log" 2>&1 &
    unit_pid=$!
    "$PY" -m pytest -q -m integration "$@"
    integration_rc=$?
    wait "$unit_pid"
    unit_rc=$?
    echo
    echo "==================== unit tests (run beside the integration tests) ===================="
    cat "$unit_log"
else
    "$PY" -m pytest -q -m "not integration" "$@"
    unit_rc=$?
    "$PY" -m pytest -q -m integration "$@"
    integration_rc=$?
fi
echo "unit tests: exit $unit_rc; integration tests: exit $integration_rc"
[ "$unit_rc" -ne 0 ] && exit "$unit_rc"
exit "$integration_rc"
