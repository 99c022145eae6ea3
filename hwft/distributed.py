"""Which process of a multi-process run this is, and how the run was launched.

hwft does not write a distributed runtime: ``hwft train --nproc N`` hands the workers to the
selected backend's launch hook (torchrun's machinery for the torch engine, ``mlx.launch`` for
MLX), and every worker reads its place from the environment that launcher (or SLURM's
``srun``) set. The core needs only that place: rank 0 alone writes the output folder and the
log; every rank takes its share of each optimizer step's micro-batches (:meth:`World.share`).
Nothing here imports an engine.

Environments read, first match wins:

============  ==============================================  ==================================
launcher      rank / size / local rank                        where
============  ==============================================  ==================================
torchrun      RANK, WORLD_SIZE, LOCAL_RANK                    also what ``hwft --nproc`` starts
SLURM srun    SLURM_PROCID, SLURM_STEP_NUM_TASKS,             one task per device; MASTER_ADDR
              SLURM_LOCALID                                   from SLURM_LAUNCH_NODE_IPADDR
mlx.launch    MLX_RANK, the hostfile's length                 MLX_HOSTFILE (JSON list of hosts)
============  ==============================================  ==================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hwft.errors import RecipeError


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank of size, and its index on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "single"  #: single, torchrun, slurm, mlx

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, writes and saves."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of one optimizer step's micro-batches: every ``size``-th from
        ``rank``. All ranks draw the same micro-batches, so together they train on exactly the
        step a single process with ``size`` times the accumulation would."""
        return items[self.rank :: self.size]


SINGLE = World()


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RecipeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def mlx_world_size(hostfile: str) -> int:
    """Ranks in an ``mlx.launch`` hostfile: a JSON list with one entry per rank."""
    text = hostfile if hostfile.lstrip().startswith("[") else Path(hostfile).read_text(encoding="utf-8")
    return len(json.loads(text))


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The World this process runs in, from its launcher's environment (see the module doc)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            "torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return World(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_LOCALID"), "slurm")
    if "MLX_RANK" in env and env.get("MLX_HOSTFILE"):
        return World(_int(env, "MLX_RANK"), mlx_world_size(env["MLX_HOSTFILE"]), _int(env, "MLX_RANK"), "mlx")
    return SINGLE


def torch_rendezvous_env(world: World, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables torch.distributed's ``env://`` rendezvous reads, for a world that SLURM
    (not torchrun) started: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    env = os.environ if env is None else env
    if world.launcher != "slurm":
        return {}
    return {
        "RANK": str(world.rank),
        "WORLD_SIZE": str(world.size),
        "LOCAL_RANK": str(world.local_rank),
        "MASTER_ADDR": env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT", "29500"),
    }


@dataclass(frozen=True)
class Launch:
    """What ``hwft train`` was asked to start: ``nproc`` processes on each of ``nnodes``
    machines; this machine is ``node_rank``; rank 0's machine listens on master_addr:port."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def check(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise RecipeError("--nproc and --nnodes must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise RecipeError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            raise RecipeError("--nnodes > 1 needs --master-addr: the address of node 0, reachable from every node")


#: A launcher that cannot say how its ranks ended (mlx.launch exits 0 whatever they did) sets
#: this to a folder; each rank's ``hwft`` writes its exit code there as ``rank-N`` when it ends.
#: A rank that wrote none was killed.
STATUS_DIR = "HWFT_EXIT_STATUS_DIR"


def report_exit(code: int, env: Mapping[str, str] | None = None) -> None:
    """Leave this process's exit code where its launcher asked (see STATUS_DIR), if it did."""
    env = os.environ if env is None else env
    if env.get(STATUS_DIR):
        Path(env[STATUS_DIR], f"rank-{world_from_env(env).rank}").write_text(str(code), encoding="utf-8")


class Collective:
    """The two reductions the engine-neutral book-keeping needs, for one process alone; an
    engine with several ranks subclasses it over its own collectives (torch.distributed,
    mx.distributed)."""

    def __init__(self, world: World = SINGLE):
        self.world = world

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (every rank passes as many)."""
        return [float(v) for v in values]

    def gather(self, items: list) -> list[list]:
        """Every rank's ``items`` (JSON values), in rank order."""
        return [list(items)]


ALONE = Collective()
