"""Data parallelism on MLX: ``parallel.strategy: ddp`` over ``mx.distributed`` (the ring
backend; ``mlx.launch`` starts the processes, on one machine or several).

Every rank holds the whole model and trains its share of each optimizer step's micro-batches
(``hwft.distributed.World.share``); each micro-batch's loss is already normalised over the
whole global step, so the step's gradient is the sum of the ranks' gradients: mlx's
``nn.average_gradients`` (which batches the arrays into few all-reduces) times the world size.
Every rank then takes the same optimizer step and the replicas stay equal.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from hwft.distributed import STATUS_DIR, Collective, Launch, World
from hwft.errors import RecipeError, RunFailed
from hwft.processes import child_process


class MlxCollective(Collective):
    """hwft's two reductions over an ``mx.distributed`` group."""

    def __init__(self, world: World, group):
        super().__init__(world)
        self.group = group

    def sum(self, values: list[float]) -> list[float]:
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group)
        return [float(v) for v in np.array(out)]

    def gather(self, items: list) -> list[list]:
        """JSON text of each rank, exchanged as bytes: a rank fills its own row of a zero
        matrix and an all-sum assembles them."""
        mine = np.frombuffer(json.dumps(items).encode(), dtype=np.uint8)
        size, rank = self.world.size, self.world.rank
        lengths = np.zeros(size, dtype=np.int32)
        lengths[rank] = len(mine)
        lengths = np.array(mx.distributed.all_sum(mx.array(lengths), group=self.group))
        rows = np.zeros((size, int(lengths.max())), dtype=np.int32)
        rows[rank, : len(mine)] = mine
        rows = np.array(mx.distributed.all_sum(mx.array(rows), group=self.group))
        return [json.loads(bytes(rows[r, : lengths[r]].astype(np.uint8)).decode()) for r in range(size)]

    def sum_gradients(self, grads):
        """The sum over ranks of each gradient array."""
        return tree_map(lambda g: g * self.world.size, nn.average_gradients(grads, group=self.group))


def join(world: World) -> MlxCollective:
    """Join the ring of an ``mlx.launch``-started run."""
    group = mx.distributed.init(strict=True, backend="ring")
    if group.size() != world.size or group.rank() != world.rank:
        raise RecipeError(
            f"mx.distributed reports rank {group.rank()} of {group.size()}, the launcher's environment "
            f"rank {world.rank} of {world.size}"
        )
    return MlxCollective(world, group)


#: How mlx.launch reports a rank that ended by itself (not one it stopped: "was killed").
EXITED = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")


def launch(spec: Launch, argv: list[str]) -> int:
    """``hwft train --nproc N`` on MLX: ``mlx.launch -n N --backend ring`` on this machine, each
    process running ``python -m hwft *argv``. mlx.launch stops the others when one fails but
    itself exits 0 whatever its ranks did, so each rank leaves its exit code in a folder
    (``hwft.distributed.STATUS_DIR``): a rank without one was killed. Which rank failed first
    is read from mlx.launch's own log line, passed through to stderr."""
    if spec.nnodes > 1:
        raise RecipeError(
            "--nnodes > 1 on MLX: start the machines with mlx.launch and a hostfile instead, e.g. "
            "mlx.launch --hostfile hosts.json --backend ring -- python -m hwft train RECIPE.yaml "
            "(each process finds its rank in MLX_RANK)"
        )
    with tempfile.TemporaryDirectory(prefix="hwft-ranks-") as folder:
        status = Path(folder)
        # mlx.launch's own entry point (the console script beside this interpreter runs the same).
        command = [
            sys.executable,
            "-c",
            "from mlx._distributed_utils.launch import main; main()",
            "-n",
            str(spec.nproc),
            "--backend",
            "ring",
            "--env",
            f"{STATUS_DIR}={status}",
            "--python",
            sys.executable,
            "--",
            "-m",
            "hwft",
            *argv,
        ]
        exited: list[tuple[int, int]] = []  # (rank, code) in the order mlx.launch saw them end
        # A child that stops with hwft (hwft.processes): its ranks stop with it, even on SIGKILL.
        with child_process(command, "mlx.launch", stderr=subprocess.PIPE, text=True) as launcher:
            deadline = None
            assert launcher.stderr is not None  # stderr=PIPE
            try:
                for line in launcher.stderr:
                    sys.stderr.write(line)
                    match = EXITED.search(line)
                    if match:
                        exited.append((int(match[1]), int(match[2])))
                        if int(match[2]) != 0 and deadline is None:
                            deadline = _stop_group_later(launcher.pid)
            finally:
                if deadline is not None:
                    deadline.cancel()
        codes = {r: _read_int(status / f"rank-{r}") for r in range(spec.nproc)}
    failed = [r for r, c in codes.items() if c != 0]
    if not failed:
        return 0
    first, code = next(((r, c) for r, c in exited if c != 0), (failed[0], codes[failed[0]]))
    how = (
        "was killed (no exit code)"
        if code is None
        else (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
    )
    raise RunFailed(
        f"training process failed: rank {first} {how}; mlx.launch stopped the others. Its own "
        "message, if it could write one, is above.",
        code if code and code > 0 else 1,
    )


#: Seconds the other ranks get to stop once one has failed, before they are killed: mlx.launch
#: sends them SIGTERM, but a rank blocked in a ring collective whose peer is gone may never
#: return to Python to act on it (and it cannot checkpoint without that peer anyway).
SURVIVOR_GRACE_SECONDS = 10.0


def _stop_group_later(pid: int):
    """Kill mlx.launch's process group (it leads one: hwft.processes) in SURVIVOR_GRACE_SECONDS,
    unless cancelled first."""
    import os
    import threading

    def stop() -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    timer = threading.Timer(SURVIVOR_GRACE_SECONDS, stop)
    timer.daemon = True
    timer.start()
    return timer


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
