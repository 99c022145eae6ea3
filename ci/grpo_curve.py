"""Run configs/grpo.yaml (or configs/ppo.yaml) for three seeds and plot the mean reward per step.

    .venv/bin/python ci/grpo_curve.py [--method grpo|ppo] [--seeds 1 2 3] [--out ci/figures/grpo-reward.png]

Each seed trains into runs/<method>-seed-N (about 4 minutes each on a 2-core CPU); the script
prints, per seed, the mean reward of the first and the last five steps, and writes the plot
(raw rewards faint, a 5-step moving average bold) that the README shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WINDOW = 5


def rewards(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # one value per rollout batch (ppo's batch trains num_iterations steps; the reward is its first's)
    return [m["reward"] for m in map(json.loads, lines) if "reward" in m]


def moving(values: list[float], n: int) -> list[float]:
    return [sum(values[max(0, i - n + 1) : i + 1]) / len(values[max(0, i - n + 1) : i + 1]) for i in range(len(values))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("grpo", "ppo"), default="grpo", help="configs/<method>.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", help="the plot (default ci/figures/<method>-reward.png)")
    parser.add_argument("--reuse", action="store_true", help="plot existing runs without training")
    args = parser.parse_args()
    args.out = args.out or str(REPO / "ci" / "figures" / f"{args.method}-reward.png")
    hwft = Path(sys.executable).parent / "hwft"
    runs = {}
    for seed in args.seeds:
        run = REPO / "runs" / f"{args.method}-seed-{seed}"
        if not args.reuse:
            subprocess.run(
                [
                    str(hwft),
                    "train",
                    str(REPO / "configs" / f"{args.method}.yaml"),
                    f"train.seed={seed}",
                    f"output.dir={run}",
                    "eval.prompts=[]",
                    "--quiet",
                ],
                check=True,
            )
        runs[seed] = rewards(run)
        first, last = runs[seed][:WINDOW], runs[seed][-WINDOW:]
        print(
            f"seed {seed}: mean reward, first {WINDOW} rollout batches {sum(first) / len(first):+.3f}, "
            f"last {WINDOW} {sum(last) / len(last):+.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    for seed, values in runs.items():
        steps = range(1, len(values) + 1)
        line = ax.plot(steps, moving(values, WINDOW), label=f"seed {seed}", linewidth=2)[0]
        ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=1)
    ax.set_xlabel("rollout batch")
    ax.set_ylabel(f"mean reward ({WINDOW}-step average)")
    ax.set_title(f"{args.method.upper()} on SmolLM2-135M-Instruct (configs/{args.method}.yaml), CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
