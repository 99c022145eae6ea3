"""The training loop's control, written once for every engine: the answers before and after,
the steps from the checkpoint's step on, the step log, the evaluation cadence, the non-finite
guard, checkpoints and stop signals, out-of-memory mapping, saving and the loss plot.

An engine sets up its run (tokenizer and data through ``Job.inputs``, the model with its
tuning, kernels, the objective, optimizer and strategy) and hands :func:`run_steps` an
:class:`EngineRun`: how to take one optimizer step, how to answer a prompt, how to measure the
held-out loss and how to save the result. Then, top to bottom::

    answers before -> for step in (resumed step + 1) .. steps:
        [before_step] -> train_step (logs the step) -> out of memory? -> non-finite? ->
        evaluate every train.eval_every (early stopping?) -> checkpoint (train.save_every, or a
        stop signal)
    -> close the log -> save -> answers after -> Result -> loss.png
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwft.checkpoint import Checkpointer, EngineState
from hwft.contract import EngineObjective
from hwft.guards import NonFinite, is_out_of_memory, out_of_memory
from hwft.recipe import ADAPTER_TUNINGS
from hwft.steplog import StepLog


@dataclass
class EngineRun:
    """What an engine's set-up gives the loop (plugin API 1.1's engine contract)."""

    objective: EngineObjective  #: the method's objective: micro-batches and losses
    steps: int  #: optimizer steps of the whole run
    #: (step, StepLog) -> the step's gradient norm for the non-finite guard: this rank's share
    #: of the step's micro-batches, forward, backward, update, logged through the StepLog
    train_step: Callable[[int, StepLog], float]
    state: EngineState  #: what a checkpoint saves and restores
    strategy: str  #: the parallel strategy a checkpoint records (none, ddp, fsdp2, deepspeed)
    save: Callable[[Path], None]  #: write the result (adapter/ or model/) into that folder, every rank taking part
    tuning: str  #: the tuning that ran (after any fallback)
    dtype: str  #: the compute dtype's recipe name (fp32, bf16, fp16)
    model: Any  #: the trained model, for the Result (bench, tests)
    device: str  #: the device as the out-of-memory message names it
    #: prompt -> greedy answer, or None where this rank does not answer
    ask: Callable[[str], str] | None = None
    #: () -> the held-out loss, or None where there is no held-out data
    held_out_loss: Callable[[], float] | None = None
    held_out_size: int = 0
    peak_memory: Callable[[], int | None] = lambda: None
    before_step: Callable[[int], None] | None = None  #: e.g. seed the step's randomness
    skips_nonfinite: bool = True  #: a NaN/Inf step leaves the weights alone
    close: Callable[[], None] | None = None  #: release what the set-up holds (process group, kernels)


class EarlyStopping:
    """transformers' EarlyStoppingCallback: an evaluation improves when its loss is below the
    best so far by more than ``threshold``; ``patience`` evaluations in a row that do not, and
    the run stops. ``patience`` None: never."""

    def __init__(self, patience: int | None, threshold: float = 0.0):
        self.patience, self.threshold = patience, threshold
        self.best, self.best_step, self.waited = float("inf"), 0, 0

    def stops(self, step: int, loss: float) -> bool:
        if loss < self.best - self.threshold:
            self.best, self.best_step, self.waited = loss, step, 0
        else:
            self.waited += 1
        return self.patience is not None and self.waited >= self.patience


def run_steps(job, run: EngineRun):
    """The loop of :mod:`hwft.loop`'s docstring; returns ``job.results``."""
    recipe, t = job.recipe, job.recipe.train
    steps = run.steps
    # Answers before training; a resumed run showed its "before" answers the first time.
    job.results.answers = job.show_answers("before", run.ask) if run.ask and not job.resume else []
    job.memory = run.peak_memory
    log = StepLog(job, steps, run.objective)
    nonfinite = NonFinite(t.nonfinite_limit, job.log)
    checkpoints = Checkpointer(job, run.objective, log, run.strategy, steps, nonfinite, run.objective.resumable)

    patience = EarlyStopping(t.early_stopping_patience, t.early_stopping_threshold)

    def evaluate(step: int) -> bool:
        """Evaluate when it is due; whether early stopping ends the run here."""
        if run.held_out_loss and (step % (t.eval_every or steps) == 0 or step == steps):
            evaluated = run.held_out_loss()
            job.run_dir.log_eval(step, evaluated, run.held_out_size)
            job.log(f"step {step}: eval_loss {evaluated:.4f} on {run.held_out_size} held-out examples")
            job.results.eval_loss = evaluated
            log.restart_clock()  # evaluation is not training time
            if patience.stops(step, evaluated) and step < steps:
                job.log(
                    f"early stopping at step {step}: eval_loss has not improved on {patience.best:.4f} (step "
                    f"{patience.best_step}) for {patience.patience} evaluations; the weights of step {step} are saved"
                )
                return True
        return False

    # From the checkpoint's step when resuming (weights, optimizer, schedule, data position and
    # RNG states restored: hwft.checkpoint).
    start = checkpoints.restore(run.state)
    with checkpoints:
        for step in range(start + 1, steps + 1):
            if run.before_step:
                run.before_step(step)
            try:
                grad_norm = run.train_step(step, log)
            except (RuntimeError, MemoryError) as exc:
                if is_out_of_memory(exc):
                    raise out_of_memory(step, recipe, run.device) from exc
                raise
            nonfinite.check(
                step, log.current["loss"], grad_norm, skipped=run.skips_nonfinite, checkpoint=checkpoints.last()
            )
            stop = evaluate(step)  # the held-out loss is every rank's, so every rank stops alike
            checkpoints.after_step(step, run.state)
            if stop:
                steps = step
                break
    log.close()

    # The result, what changed, the plot.
    out = job.run_dir.adapter_dir if run.tuning in ADAPTER_TUNINGS else job.run_dir.model_dir
    run.save(out)  # with the objective's extras beside the weights (hwft.objective.Extra)
    job.log(f"saved {out}")
    if run.ask:
        job.results.answers += job.show_answers("after", run.ask)
    results = job.results
    results.final_loss, results.steps, results.output, results.model = (
        log.record.get("loss"),
        steps,
        str(out),
        run.model,
    )
    results.tuning, results.dtype, results.peak_memory_bytes = run.tuning, run.dtype, run.peak_memory()
    if recipe.output.plot and job.world.main and job.run_dir.plot_loss() is None:
        job.log("loss.png skipped: matplotlib is not installed")
    if run.close:
        run.close()
    return job.results
