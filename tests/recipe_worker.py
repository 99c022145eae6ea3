"""One rank of the recipe matrix (tests/test_recipe_matrix.py): started by torchrun (or alone),
it trains each run of a JSON plan in turn through ``hwft train``'s own entry point, as the
workers ``hwft train --nproc N`` starts do. One launch for the whole matrix (every strategy's
column, and each strategy's run held to one process) keeps it to one process start in all
instead of one per run: a rank's start is about 4 s of imports on this CPU, a tiny run's 2 s.

    python -m torch.distributed.run --nproc-per-node 2 --standalone -m tests.recipe_worker PLAN.json

PLAN.json: ``[{"recipe": PATH, "overrides": [...], "log": PATH, "move": {FROM: TO}}, ...]``
("move", optional: folders rank 0 moves away before the run, every rank waiting for it: a
resume from a checkpoint with the result set aside). Each run's exit code,
stdout and stderr go to its ``log`` as JSON (rank 0's; other ranks' to ``log.rankN``); a run that
fails does not stop the next. The process group is the worker's, started once: hwft runs inside
a group it did not start and leaves it standing (hwft_torch.parallel.Single.owns_group).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path


def main(plan_path: str) -> int:
    from hwft import cli
    from hwft.plugins import reset_host

    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for run in json.loads(Path(plan_path).read_text()):
        if run.get("move"):
            move(run["move"], rank)
        reset_host()
        out, err, start = io.StringIO(), io.StringIO(), time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(["train", run["recipe"], *run["overrides"]])
            except SystemExit as exc:  # argparse
                code = exc.code
            except BaseException as exc:  # noqa: BLE001 - the next run still runs; the test reads it
                code = f"{type(exc).__name__}: {exc}"
        log = Path(run["log"] if rank == 0 else f"{run['log']}.rank{rank}")
        log.write_text(
            json.dumps(
                {
                    "code": code,
                    "stdout": out.getvalue(),
                    "stderr": err.getvalue(),
                    "seconds": round(time.monotonic() - start, 2),
                }
            )
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def move(folders: dict[str, str], rank: int) -> None:
    """Rank 0 moves each folder to its new place once every rank has finished the run before;
    none goes on before it has."""
    import shutil

    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    if grouped:
        dist.barrier()
    if rank == 0:
        for source, target in folders.items():
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, target)
    if grouped:
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
