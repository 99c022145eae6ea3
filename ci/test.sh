#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
# Two workers (pytest-xdist), each taking whole test modules, longest first (tests/conftest.py):
# much of the suite waits on processes it started or on Python itself, so CI's two cores stay
# busy. HWFT_TEST_WORKERS=0 runs everything in this one process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${HWFT_TEST_WORKERS:-2}" --dist loadscope \
    --no-loadscope-reorder "$@"
