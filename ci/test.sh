#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium and ChromeDriver for hwft board's browser test, installed in the background
# while the set-up and the longer tests run (tests/test_board.py waits for it).
bash ci/browser.sh --background
bash ci/setup.sh
# The habits: ruff's lint and format, and pyright in basic mode on hwft/ and backends/ (settings
# in pyproject.toml; .pre-commit-config.yaml runs the same; ci/lint.sh --fix repairs what ruff
# can). Beside the tests rather than before them: pyright's half minute of one core overlaps the
# workers' start. Its outcome is reported, and decides, after the tests.
bash ci/lint.sh > .venv/lint.log 2>&1 &
lint=$!
# Two workers (pytest-xdist), each taking whole test modules, longest first (tests/conftest.py):
# much of the suite waits on processes it started or on Python itself, so CI's two cores stay
# busy. HWFT_TEST_WORKERS=0 runs everything in this one process.
# One compute thread per process (torch, OpenMP, MKL): the two workers and the processes they
# start already fill the cores, and threads on top of them only oversubscribe the tiny models'
# work (the clean suite took 736 s with it and 913 s without, on this project's 2-core machine).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Bytecode is written once and read by every later process: with PYTHONDONTWRITEBYTECODE set (as
# on this project's machines) each of the suite's hundreds of processes compiled transformers,
# peft and the rest from source again, about 4 s of each one's start (a 2-step tiny run: 15 s
# with it, 10 s without).
unset PYTHONDONTWRITEBYTECODE
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${HWFT_TEST_WORKERS:-2}" --dist loadscope \
    --no-loadscope-reorder "$@" || status=$?
if wait "$lint"; then
    tail -n 1 .venv/lint.log
else
    cat .venv/lint.log
    echo "ci/lint.sh failed: ruff or pyright found the problems above (bash ci/lint.sh --fix repairs ruff's)" >&2
    status=$((status == 0 ? 1 : status))
fi
exit "$status"
