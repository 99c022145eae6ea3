"""The training loop's book-keeping, the same for every engine.

An engine's loop calls ``begin()`` before a step's micro-batches, ``add(loss, counts)`` after
each, and ``end(step, lr, grad_norm)`` once the optimizer has stepped (after synchronising its
device). StepLog keeps the per-step records ``hwft bench`` times (``Job.steps``), writes a
metrics.jsonl line every ``train.log_every`` steps and on the last, and drives the progress
display. ``restart_clock()`` after evaluating or saving keeps that time out of the next step.

In a multi-process run every rank calls the same methods: ``end`` sums the step's loss shares
and token counts over ranks (the logged loss and tokens/s are the global figures) and gathers
the examples trained on; rank 0 alone writes.
"""

from __future__ import annotations

import json
import time

from hwft.contract import EngineObjective
from hwft.job import Job
from hwft.objective import Loss
from hwft.progress import Progress


class StepLog:
    def __init__(self, job: Job, steps: int, objective: EngineObjective):
        self.job, self.steps, self.objective = job, steps, objective
        self.log_every = job.recipe.train.log_every
        from hwft.methods.lookup import method

        self.progress = Progress(
            steps,
            self.log_every,
            quiet=job.quiet or not job.world.main,
            shown=method(job.recipe.method.objective).headline,
        )
        self.collective = objective.collective
        self.examples_path = job.run_dir.path / "examples.jsonl" if job.recipe.output.log_examples else None
        self.start = self.last_log = self.step_start = time.perf_counter()
        self.tokens_since_log = self.trained_since_log = 0
        self.losses_since_log: list[float] = []
        self.record: dict = {}  #: the last metrics line written
        self.current: dict = {}

    def begin(self) -> None:
        self.current = {"loss": 0.0, "tokens": 0, "trained": 0, "attended": 0, "examples": []}

    def add(self, loss: float, counts: Loss) -> None:
        """One micro-batch: its share of the step's loss (a float) and its token counts."""
        c = self.current
        c["loss"] += loss
        c["tokens"] += counts.tokens
        c["trained"] += counts.trained
        c["attended"] += counts.attended
        c["examples"] += list(counts.examples)

    def end(self, step: int, lr: float, grad_norm: float) -> None:
        c = self.current
        if self.job.world.size > 1:
            c["loss"], tokens, trained, attended = self.collective.sum(
                [c["loss"], c["tokens"], c["trained"], c["attended"]]
            )
            c["tokens"], c["trained"], c["attended"] = int(tokens), int(trained), int(attended)
            c["examples"] = [i for part in self.collective.gather(c["examples"]) for i in part]
        if self.examples_path and self.job.world.main:
            with self.examples_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "examples": c["examples"]}) + "\n")
        now = time.perf_counter()
        self.job.steps.append({"step": step, "seconds": now - self.step_start, **c})
        self.step_start = now
        self.losses_since_log.append(c["loss"])
        self.tokens_since_log += c["tokens"]
        self.trained_since_log += c["trained"]
        if step % self.log_every and step != self.steps:
            return
        interval = max(now - self.last_log, 1e-9)
        self.record = {
            "step": step,
            "total_steps": self.steps,
            "epoch": self.objective.epoch(),
            "loss": sum(self.losses_since_log) / len(self.losses_since_log),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": self.tokens_since_log / interval,
            "trained_tokens_per_second": self.trained_since_log / interval,
            "elapsed": now - self.start,
            **self.objective.log_metrics(),
        }
        peak = self.job.memory() if self.job.memory else None
        if peak is not None:
            self.record["peak_memory_bytes"] = peak
        self.job.run_dir.log_metrics(self.record)
        self.progress.update(self.record)
        self.last_log, self.tokens_since_log, self.trained_since_log, self.losses_since_log = now, 0, 0, []

    def carry(self) -> dict:
        """What a checkpoint keeps so that a resumed run's next metrics line is the one the
        uninterrupted run writes: the steps since the last line, and the elapsed time."""
        return {
            "losses": self.losses_since_log,
            "tokens": self.tokens_since_log,
            "trained": self.trained_since_log,
            "elapsed": time.perf_counter() - self.start,
        }

    def restore(self, carry: dict) -> None:
        self.losses_since_log = list(carry["losses"])
        self.tokens_since_log, self.trained_since_log = carry["tokens"], carry["trained"]
        self.start = time.perf_counter() - carry["elapsed"]

    def restart_clock(self) -> None:
        self.step_start = time.perf_counter()

    def close(self) -> None:
        self.progress.close()
