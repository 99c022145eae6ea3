#!/usr/bin/env bash
# Paired before/after rounds for the registries (issue "Open the house"): hwft's cpu arm of
# configs/bench.yaml at BEFORE (62eaccc, the last commit before methods became a registry) and
# at the working tree, alternating (and which goes first, round by round), ROUNDS times; prints
# each round's tokens/s and the median of the after/before ratios. Both run on the same .venv: BEFORE's sources come first on PYTHONPATH.
#   bash ci/bench/registries/paired.sh [ROUNDS=5] [STEPS=8]
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROUNDS=${1:-5}; STEPS=${2:-8}; BEFORE=${BEFORE:-62eaccc}
tree=$(mktemp -d /tmp/hwft-before-XXXX)
git worktree add -q --detach "$tree" "$BEFORE"
trap 'git worktree remove --force "$tree"' EXIT
here=$(pwd); out=$here/ci/bench/registries
run() {  # $1: label, $2: the tree whose sources run (python -m puts the current folder first)
    (cd "$2" && PYTHONPATH="$2:$2/backends/torch:$2/backends/mlx:$2/backends/ascend" "$here/.venv/bin/python" -m hwft \
        bench "$here/configs/bench.yaml" --backends cpu --steps "$STEPS" --warmup 2 --eval-examples 0 \
        --out "$out/$1" > /dev/null 2> "$out/$1.log")
}
for r in $(seq 1 "$ROUNDS"); do  # ABBA: odd rounds before first, even rounds after first
    if (( r % 2 )); then run "r$r-before" "$tree"; run "r$r-after" "$here"
    else run "r$r-after" "$here"; run "r$r-before" "$tree"; fi
done
.venv/bin/python - "$out" "$ROUNDS" <<'PY'
import json, statistics, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
def tps(label):
    (f,) = (out / label).glob("*-hwft-cpu.json")
    return json.loads(f.read_text())["metrics"]["tokens_per_second"]
ratios = []
for r in range(1, rounds + 1):
    b, a = tps(f"r{r}-before"), tps(f"r{r}-after")
    ratios.append(a / b)
    print(f"round {r}: before {b:.1f} tok/s, after {a:.1f} tok/s, after/before {a / b:.3f}")
print(f"median after/before over {rounds} rounds: {statistics.median(ratios):.3f} "
      f"(range {min(ratios):.3f}-{max(ratios):.3f})")
PY
