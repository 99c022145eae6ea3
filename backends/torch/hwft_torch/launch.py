"""``hwft train --nproc N`` on the torch engine: torchrun's own machinery starts the workers.

The arguments are torchrun's (``torch.distributed.run``): one machine gets a standalone
rendezvous on a free local port; several get the static rendezvous at ``--master-addr:port``
with this machine's ``--node-rank``. No restarts: a worker that dies brings the others down
(torchrun's agent stops them within ``--monitor-interval``), and hwft reports which rank died
and how, instead of hanging in a collective.
"""

from __future__ import annotations

import os
import signal

from hwft.distributed import Launch
from hwft.errors import RunFailed


def torchrun_args(spec: Launch, argv: list[str]) -> list[str]:
    """torchrun's command line for the workers, each running ``python -m hwft *argv``."""
    args = [
        "--nproc-per-node",
        str(spec.nproc),
        "--nnodes",
        str(spec.nnodes),
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.5",
    ]
    if spec.nnodes == 1 and not spec.master_addr:
        args.append("--standalone")
    else:
        # The static rendezvous: each node's rank is the --node-rank given (c10d's would rank the
        # nodes by arrival and ignore it).
        args += [
            "--rdzv-backend",
            "static",
            "--node-rank",
            str(spec.node_rank),
            "--master-addr",
            spec.master_addr or "127.0.0.1",
            "--master-port",
            str(spec.master_port),
        ]
    return [*args, "-m", "hwft", *argv]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def threads_per_rank(nproc: int, cores: int | None = None) -> int:
    """CPU threads each of ``nproc`` ranks on this machine gets: the cores shared out. torchrun's
    own default is 1, which it announces in a banner, and which leaves most of a large CPU idle."""
    return max(1, (cores or os.cpu_count() or 1) // nproc)


def launch(spec: Launch, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if spec.nproc > 1:  # the ranks inherit it; a value the user set stands
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(spec.nproc)))
    try:
        run(get_args_parser().parse_args(torchrun_args(spec, argv)))  # torchrun itself, in-process
    except SignalException as exc:
        # SIGTERM/SIGINT to this launcher: torchrun passes SIGTERM to the ranks, which
        # checkpoint together and stop (hwft.checkpoint.StopSignals); rank 0 said where.
        name = signal.Signals(exc.sigval).name
        raise RunFailed(
            f"stopped by {name}: the ranks were asked to write a checkpoint and stop (rank 0's message, "
            f"if any, is above); continue with --resume",
            128 + int(exc.sigval),
        ) from None
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        # torchrun stops the surviving ranks with SIGTERM; the ranks that failed first are news.
        culprits = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or failures
        who = ", ".join(f"rank {rank} (pid {f.pid}) {describe_exit(f.exitcode)}" for rank, f in culprits)
        stopped = len(failures) - len(culprits)
        code = next((f.exitcode for _, f in culprits if f.exitcode > 0), 1)
        raise RunFailed(
            f"training process failed: {who}"
            + (f"; torchrun stopped the other {stopped}" if stopped else "")
            + ". Its own message, if it could write one, is above.",
            code,
        ) from None
    return 0
