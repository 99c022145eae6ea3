"""Child processes that stop with their parent.

Every process an hwft command starts (a bench arm, the conformance suite's pytest, mlx.launch)
is started by :func:`child_process`:

- in a process group of its own, so a terminal's Ctrl-C reaches it once, from its parent;
- SIGTERM, SIGINT and SIGHUP to the parent (``timeout``, a scheduler, a CI job, Ctrl-C, a
  closed terminal) reach the child as SIGTERM, the one request to stop every program honours
  the same way (a child still starting ends silently; a training child checkpoints first:
  :class:`hwft.stopping.StopSignals`); the parent waits for it, then stops with 128 + the
  signal it received;
- on Linux the child asks for ``PR_SET_PDEATHSIG`` before it runs, so a parent killed outright
  (SIGKILL, the OOM killer) cannot leave it running. The signal is :data:`PARENT_DIED`, a
  real-time signal of hwft's own rather than SIGTERM: the kernel sends it again each time the
  orphan is handed to the next thread of a dying multi-threaded parent (torchrun's agent has
  several), and a training process must count those as one request to stop, where a second
  SIGTERM means "now". Its default action ends a process that does not handle it.

Processes that a launcher starts for hwft (torchrun's ranks, inside ``hwft train --nproc``; the
ranks mlx.launch starts) find ``HWFT_PARENT_PID`` in their environment and ask for the same at
start-up (:func:`stop_with_parent`, run by every ``hwft`` command). Such a child also outlives
its parent's pipes: once the parent that read its stdout and stderr is gone (mlx.launch prints
its ranks' output), writing there is quietly dropped instead of raising BrokenPipeError in the
middle of the checkpoint it is writing. And it never waits forever: ORPHAN_GRACE_SECONDS after
its parent died it ends itself, should it be stuck (a collective whose peer died with no one
left to stop it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from hwft.errors import RunFailed

#: Set by a parent hwft process for everything it starts (its pid).
PARENT_ENV = "HWFT_PARENT_PID"
#: The signals a parent passes on to its children, as SIGTERM.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
LINUX = sys.platform.startswith("linux")
#: What the kernel sends a child of hwft's when its parent dies (Linux; None elsewhere).
PARENT_DIED = signal.SIGRTMIN + 2 if LINUX else None


def _ask_for_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends PARENT_DIED when the parent dies (Linux only)."""
    if PARENT_DIED is None:
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(PARENT_DIED)) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: How long a child whose parent died may take to checkpoint and stop before it ends itself.
ORPHAN_GRACE_SECONDS = 600


class _QuietOnceUnread:
    """A text stream whose writes go nowhere once its reader is gone (BrokenPipeError)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _end_when_orphaned(parent: int) -> None:
    """A daemon thread: once the parent is gone, allow ORPHAN_GRACE_SECONDS, then end."""
    while os.getppid() == parent:
        time.sleep(1.0)
    time.sleep(ORPHAN_GRACE_SECONDS)
    os._exit(128 + signal.SIGTERM)


def stop_with_parent() -> None:
    """In a process started for a parent hwft process (HWFT_PARENT_PID, passed down through a
    launcher): get PARENT_DIED when the parent dies (and stop now if it already has), keep
    going when the parent's pipes close, and never linger (see the module docstring)."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit() or int(parent) == os.getpid():
        return
    sys.stdout, sys.stderr = _QuietOnceUnread(sys.stdout), _QuietOnceUnread(sys.stderr)
    threading.Thread(target=_end_when_orphaned, args=(os.getppid(),), daemon=True, name="hwft-orphan").start()
    if _ask_for_death_signal() and not _alive(int(parent)) and PARENT_DIED is not None:
        os.kill(os.getpid(), PARENT_DIED)


@contextmanager
def children_stop_with_this_process() -> Iterator[None]:
    """What this process starts meanwhile, through any launcher (torchrun's agent builds its
    ranks' environment from os.environ), stops with it."""
    before = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = before


def _child_setup(parent: int):
    died = PARENT_DIED
    libc = ctypes.CDLL(None, use_errno=True) if died is not None else None

    def setup() -> None:  # runs in the child between fork and exec: nothing that allocates much
        os.setpgid(0, 0)
        if libc is not None and died is not None:
            libc.prctl(PR_SET_PDEATHSIG, int(died))
            if os.getppid() != parent:  # the parent died before the request took hold
                os._exit(128 + signal.SIGTERM)

    return setup


def start_child(command: list[str], **popen) -> subprocess.Popen:
    """Start ``command`` in a process group of its own, stopping with this process (its
    PR_SET_PDEATHSIG, and HWFT_PARENT_PID for what it launches), and return its Popen: for a
    child that outlives the call that starts it (hwft board's runs). Stopping it is the caller's
    (SIGTERM); :func:`child_process` also passes this process's stop signals on."""
    env = {**(popen.pop("env", None) or os.environ), PARENT_ENV: str(os.getpid())}
    return subprocess.Popen(command, env=env, preexec_fn=_child_setup(os.getpid()), **popen)


@contextmanager
def child_process(command: list[str], what: str, **popen) -> Iterator[subprocess.Popen]:
    """Start ``command`` as a child that stops with this process (see the module docstring) and
    yield its Popen; on leaving, wait for it. A signal passed on to it is raised, once the child
    has ended, as RunFailed(128 + signal) naming ``what``."""
    received: list[int] = []
    holder: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for proc in holder:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        proc = start_child(command, **popen)
        holder.append(proc)
        if received:  # a signal came while it was being started
            proc.send_signal(signal.SIGTERM)
        try:
            yield proc
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
            raise
        finally:
            proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        name = signal.Signals(received[0]).name
        raise RunFailed(
            f"{what}: stopped by {name}; its process (pid {proc.pid}) was stopped with it (exit {proc.returncode})",
            128 + received[0],
        )


def run_child(command: list[str], what: str, **popen) -> int:
    """Run ``command`` to its end as a :func:`child_process`; its exit code."""
    with child_process(command, what, **popen) as proc:
        proc.wait()
    return proc.returncode
