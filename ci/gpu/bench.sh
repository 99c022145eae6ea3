#!/usr/bin/env bash
# On the lent GPU machine (the device tool's `run`, carry [".whl", ".gpu"], after ci/gpu/prepare.sh
# here), as one command: bash ci/gpu/bench.sh [WORKLOAD...]   (default: llama-3.1-8b)
#
# 1. installs hwft and hwft-torch over the image's own torch, transformers and peft (no network);
# 2. `hwft bench` of configs/bench/WORKLOAD-lora.yaml: hwft, Trainer + peft + SDPA, Trainer + peft
#    + Liger, one round, then `hwft bench report`;
# 3. the CUDA-marked tests.
# Everything lands in $OUT as at most 8 files (the tool's limit): env.txt, one bench-*.tar.gz and
# one bench-*.log per workload, tests.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hwft-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HWFT_CACHE=/tmp/hwft-cache TOKENIZERS_PARALLELISM=false
PY=python3
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site \
    . backends/torch || exit 1
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-data .whl/data/*.whl || exit 1
export PYTHONPATH=/tmp/site
{ nvidia-smi; $PY -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|peft|accelerate|triton|liger)"; \
  $PY -m hwft.cli env; } > "$OUT/env.txt" 2>&1
tokenizer=$PWD/.gpu/smollm2-tokenizer
for workload in "${@:-llama-3.1-8b}"; do
    dir=/tmp/bench-$workload
    timeout 400 $PY -m hwft.cli bench "configs/bench/$workload-lora.yaml" "model.name=$tokenizer" --steps 12 --warmup 2 \
        --eval-examples 4 --baseline hf,hf-liger --backends cuda --out "$dir" > "$OUT/bench-$workload.log" 2>&1
    echo "exit $?" >> "$OUT/bench-$workload.log"
    $PY -m hwft.cli bench report "$dir"/*.json --out "$dir" >> "$OUT/bench-$workload.log" 2>&1
    tar -czf "$OUT/bench-$workload.tar.gz" -C /tmp "bench-$workload"
done
PYTHONPATH=/tmp/site:/tmp/site-data timeout 120 $PY -m pytest -q -p no:cacheprovider -m cuda -o addopts="" \
    tests/test_shapes.py tests/test_speed_levers.py tests/test_devices.py tests/test_train.py tests/test_packing.py \
    > "$OUT/tests.log" 2>&1
echo "exit $?" >> "$OUT/tests.log"
tail -n 5 "$OUT"/*.log
