#!/usr/bin/env bash
# The kill-a-rank reliability test N times in a row (default 20) beside two CPU-bound processes.
#
#   tests/stress/kill_rank_stress.sh [N] [LOG_DIR]
#
# Runs tests/test_reliability.py::test_sigkilled_ranks_restart_from_the_last_checkpoint (torchrun,
# 2 ranks, rank 1 SIGKILLed, then rank 0 SIGKILLed mid-checkpoint, two restarts; each run also trains
# the uninterrupted reference) N times, each a fresh pytest process, while two busy loops compete for
# the cores. Prints one line per run and the total: "passed P/N in S s". Exit status 0 only if all
# passed. Each run's pytest output is kept in LOG_DIR (default: a new temporary directory).
set -u
N=${1:-20}
LOG_DIR=${2:-$(mktemp -d -t kill-rank-stress.XXXXXX)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
TEST=tests/test_reliability.py::test_sigkilled_ranks_restart_from_the_last_checkpoint
mkdir -p "$LOG_DIR"

hogs=()
stop_hogs() { for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null; done; }
trap stop_hogs EXIT
for _ in 1 2; do
    "$PY" -c "while True: pass" &
    hogs+=($!)
done

cd "$REPO"
passed=0
start=$(date +%s)
for i in $(seq 1 "$N"); do
    t0=$(date +%s)
    "$PY" -m pytest -q -p no:cacheprovider "$TEST" >"$LOG_DIR/run_$i.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] && passed=$((passed + 1))
    echo "run $i/$N: $([ "$rc" -eq 0 ] && echo passed || echo "FAILED (rc $rc, $LOG_DIR/run_$i.log)") in $(( $(date +%s) - t0 )) s"
done
echo "passed $passed/$N in $(( $(date +%s) - start )) s (two CPU hogs beside it; logs in $LOG_DIR)"
[ "$passed" -eq "$N" ]
