"""The output folder, whose layout is fixed for every backend::

recipe.yaml            the resolved recipe (every default filled in)
metrics.jsonl          one JSON object per logged step (see METRIC_KEYS)
eval.jsonl             with data.eval: step, eval_loss (mean per label token), examples
adapter/               PEFT adapter (adapter_config.json + adapter_model.safetensors), or
model/                 full model (HF safetensors + tokenizer)
checkpoints/step-N/    periodic checkpoints, written atomically (see hwft.checkpoint)
loss.png               the loss curve
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from hwft.errors import UserError
from hwft.recipe import Recipe
from hwft.storage import storage_error

#: Keys every metrics.jsonl line has; later issues add keys, never rename these.
METRIC_KEYS = (
    "step",  # optimizer step, from 1
    "epoch",  # passes over the training rows so far; streaming: the shuffle window being read
    "loss",  # mean loss per trained token of a step, averaged over the steps since the last line
    "lr",  # learning rate used for the step
    "grad_norm",  # total gradient norm of the step, before clipping
    "tokens_per_second",  # non-padding input tokens per second, global across ranks
    "trained_tokens_per_second",  # label tokens per second
    "elapsed",  # seconds since training started
)
#: Keys a line may also have: ``total_steps`` (the optimizer steps the run will take, for an ETA),
#: ``peak_memory_bytes`` (device memory on accelerators, process RSS
#: on the CPU, high-water mark so far) and the objective's own (DPO rewards, GRPO rewards and KL).


def check_output_dir(recipe: Recipe) -> None:
    """Refuse a non-empty output folder unless output.overwrite says to reuse it, and a path
    that is a file."""
    path = Path(recipe.output.dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(
            f"output.dir {path} is a file, not a folder; choose another output.dir (a folder "
            "that does not exist yet, or an empty one)"
        )
    if path.exists() and any(path.iterdir()) and not recipe.output.overwrite:
        raise UserError(
            f"output folder {path} is not empty; choose another output.dir, "
            "or set output.overwrite=true to replace its contents, or continue its run with --resume"
        )


class RunDir:
    """An output folder being written by one run. In a multi-process run only rank 0 writes
    (``writes``); the other ranks' RunDir knows the paths and touches nothing."""

    def __init__(
        self, recipe: Recipe, writes: bool = True, resume_step: int | None = None, recipe_hint: str = "RECIPE.yaml"
    ):
        self.path = Path(recipe.output.dir).expanduser().resolve()
        self.writes = writes
        self.recipe_hint = recipe_hint  #: how the user named the recipe, for "continue with" hints
        self.losses: list[tuple[int, float]] = []
        self.metrics_path = self.path / "metrics.jsonl"
        #: True when this run made the folder (or found it empty): only then may it be removed.
        self.created = False
        self.trackers: list = []  #: hwft.tracking trackers (output.report_to), rank 0 only
        if not writes:
            return
        if resume_step is not None:
            self._rewind(recipe, resume_step)
            return
        check_output_dir(recipe)
        self.created = not (self.path.exists() and any(self.path.iterdir()))
        with self.writing("the output folder", resumable=False):
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            self.metrics_path.write_text("", encoding="utf-8")

    @contextmanager
    def writing(self, what: str, resumable: bool = True):
        """A write into this folder that the storage refuses (no space, read-only, no permission)
        becomes one StorageError: what was being written, why, the last complete checkpoint
        (which a failed write never touches: checkpoints are renamed into place whole) and the
        command that continues from it."""
        try:
            yield
        except Exception as exc:
            error = storage_error(exc, what, self.path, self._advice if resumable else None)
            if error is None:
                raise
            raise error from exc

    def _advice(self, found) -> str:
        from hwft.checkpoint import checkpoint_steps

        done = checkpoint_steps(self.path)
        if done:
            return (
                f"The last complete checkpoint, {done[-1][1]}, is intact; {found.fix}, then continue with: "
                f"hwft train {self.recipe_hint} --resume"
            )
        return f"No checkpoint was complete yet (train.save_every writes them); {found.fix}, then run it again"

    #: Logs with one JSON line per step (or per step's item), cut back to a resumed step.
    STEP_LOGS = ("metrics.jsonl", "eval.jsonl", "examples.jsonl", "rollouts.jsonl")

    def _rewind(self, recipe: Recipe, step: int) -> None:
        """Resuming from checkpoint ``step``: keep the folder, drop the log lines of steps after
        it (the resumed run writes them again, so no step is missing or doubled), and clear
        half-written checkpoints a kill left behind."""
        from hwft.checkpoint import discard_temporaries

        for name in self.STEP_LOGS:
            path = self.path / name
            if not path.is_file():
                continue
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if (row := _logged(line)) is not None and row.get("step", 0) <= step
            ]
            path.write_text("".join(kept), encoding="utf-8")
            if name == "metrics.jsonl":
                self.losses = [(r["step"], r["loss"]) for r in map(json.loads, kept)]
        (self.path / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        discard_temporaries(self.path)

    def start_tracking(self, names: list[str], loggers: dict, recipe: Recipe) -> None:
        from hwft.tracking import open_trackers

        self.trackers = open_trackers(names, loggers, self.path, recipe)

    def stop_tracking(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def discard_if_untrained(self) -> None:
        """Remove the folder after a failure before the first step, if this run made it."""
        if self.created and not self.losses:
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step}"

    def log_metrics(self, record: dict) -> None:
        missing = [k for k in METRIC_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks {missing}")
        # NaN and Inf are not JSON: a skipped step's non-finite figures are written as null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.losses.append((record["step"], record["loss"]))
        if self.writes:
            with self.writing(self.metrics_path.name), self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.trackers:
            from hwft.tracking import numbers

            for tracker in self.trackers:
                tracker.log(record["step"], numbers(record, "train"))

    def log_eval(self, step: int, eval_loss: float, examples: int) -> None:
        """Append one evaluation on data.eval to eval.jsonl."""
        if not self.writes:
            return
        with self.writing("eval.jsonl"), (self.path / "eval.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "eval_loss": eval_loss, "examples": examples}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, {"eval/loss": eval_loss})

    @contextmanager
    def atomic_dir(self, final: Path):
        """Yield a temporary folder beside ``final``; rename it into place on success. A write the
        storage refuses leaves ``final`` as it was and says so (:meth:`writing`)."""
        if not self.writes:
            raise RuntimeError("only rank 0 writes the output folder")
        with self.writing(f"the result {final.name}/"):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
            try:
                yield tmp
                self.commit(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def commit(tmp: Path, final: Path) -> None:
        """Rename a finished temporary folder to ``final``, replacing an older one."""
        if final.exists():
            old = final.with_name(f".{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    def prune_checkpoints(self, keep: int) -> None:
        root = self.path / "checkpoints"
        if not root.is_dir():
            return
        steps = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
        for step in steps[:-keep]:
            shutil.rmtree(root / f"step-{step}", ignore_errors=True)

    def plot_loss(self) -> Path | None:
        """Write loss.png; None when there is nothing to plot or matplotlib is missing."""
        if not self.losses or not self.writes:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        points = [(s, v) for s, v in self.losses if v is not None]
        if not points:
            return None
        steps, losses = zip(*points, strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "loss.png"
        with self.writing(out.name):
            fig.savefig(out)
        plt.close(fig)
        return out


def _logged(line: str) -> dict | None:
    """One step log line, or None for a blank one or one a full disk cut off mid-write."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None
