"""Stop signals during training: SIGTERM, SIGINT and SIGHUP (spot preemption, Ctrl-C, a closed
terminal, or a parent hwft process passing one on) ask the loop to checkpoint and stop after the
current step (:class:`StopSignals`); the run then ends with 128 + the signal and says how to
continue (:func:`stopped_message`)."""

from __future__ import annotations

import signal
from pathlib import Path

from hwft.errors import RunFailed
from hwft.processes import PARENT_DIED


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP (a closed terminal; also what a parent hwft process passes on)
    during training ask the loop to checkpoint and stop after the current step; a second signal
    acts as usual (SIGINT: KeyboardInterrupt, SIGTERM and SIGHUP: end now). The kernel's word
    that the parent died (hwft.processes.PARENT_DIED, repeated per exiting thread of the
    parent) asks the same, however often it comes."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *([PARENT_DIED] if PARENT_DIED else []))

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.HANDLED:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == PARENT_DIED:
            self.received = self.received or signum
            return
        if self.received is not None:  # the second one: stop waiting
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


def stopped_message(signum: int, step: int, path: Path | None, recipe_hint: str) -> RunFailed:
    where = f"checkpoint {path}" if path else "no checkpoint could be written"
    if signum == PARENT_DIED:  # ends as SIGTERM would
        why, signum = "stopped (its parent process died)", signal.SIGTERM
    else:
        why = f"stopped by {signal.Signals(signum).name}"
    return RunFailed(
        f"{why} after step {step}; {where}. Continue with: hwft train {recipe_hint} --resume", 128 + signum
    )
