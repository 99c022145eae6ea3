#!/usr/bin/env bash
# The tree's habits, checked: ruff (lint, then format) on the Python sources, pyright in basic
# mode on hwft/ and backends/. Settings live in pyproject.toml. With --fix, ruff repairs what it
# can and formats the files instead of only checking them. Needs ci/setup.sh's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(hwft backends plugins tests ci)
if [ "${1:-}" = "--fix" ]; then
    .venv/bin/ruff check --fix "${paths[@]}"
    .venv/bin/ruff format "${paths[@]}"
else
    .venv/bin/ruff check "${paths[@]}"
    .venv/bin/ruff format --check "${paths[@]}"
fi
.venv/bin/pyright
