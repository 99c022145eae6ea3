"""Progress: a bar with loss, tokens/s and ETA on a terminal; plain log lines otherwise.

The method's headline figures join the loss when the record has them (hwft.methods.Method.headline):
the mean reward (grpo) or the reward margin and accuracy (dpo)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(
        self,
        total_steps: int,
        log_every: int,
        stream=None,
        quiet: bool = False,
        shown: tuple[tuple[str, str], ...] = (),
    ):
        self.quiet = quiet
        self.shown = shown  #: (metric, short label) shown beside the loss
        self.total = total_steps
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.bar = None
        if not quiet and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, file=self.stream, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, record: dict) -> None:
        step = record["step"]
        if self.quiet:
            return
        extra = {label: f"{record[key]:.3f}" for key, label in self.shown if key in record}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                {"loss": f"{record['loss']:.4f}", **extra, "tok_s": f"{record['tokens_per_second']:.0f}"}
            )
        elif step % self.log_every == 0 or step == self.total:
            elapsed = record["elapsed"]
            eta = elapsed / step * (self.total - step)
            print(
                f"step {step}/{self.total}  loss {record['loss']:.4f}  "
                + "".join(f"{label} {value}  " for label, value in extra.items())
                + f"lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  {record['tokens_per_second']:.0f} tok/s  "
                f"elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
