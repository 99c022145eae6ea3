"""Checkpoints: what a run writes so that it can resume exactly, and what resuming checks.

Every ``train.save_every`` steps, and when SIGTERM, SIGINT or SIGHUP arrives (what spot
preemption, Ctrl-C and a closed terminal send), the run writes ``checkpoints/step-N/``::

    adapter/ or model/        the weights as the run's result writes them (usable as they are)
    optimizer.safetensors     the optimizer's tensors (engine's own names, parameters by name)
    optimizer.json            the optimizer state around them (param groups, scalars)
    trainer_state.json        step, data position, log carry-over, RNG states of every rank and
                              library, non-finite step count, scheduler (and scaler) state
    recipe.yaml               the resolved recipe the run trained with
    deepspeed/                parallel.strategy deepspeed: DeepSpeed's own (pickled) checkpoint
    manifest.json             sha256 and size of every other file, written last

The folder is written under a temporary name and renamed into place, so a kill mid-write leaves
the last good checkpoint as it was; only a folder with a manifest counts. Resuming verifies
every file against the manifest before anything is loaded, and refuses extra files: a folder
hwft did not write (a pickle planted beside the weights, a truncated copy) is never opened.

Resuming exactly: the weights, optimizer and schedule are restored; the data stream is rebuilt
from the seed and advanced past the micro-batches already drawn (sequence packing included,
since rows are rebuilt the same way); RNG states (python, numpy, the engine's) are set back per
rank. On CPU in fp32 the resumed run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from hwft import __version__
from hwft.errors import RecipeError, RunFailed, UserError
from hwft.processes import PARENT_DIED

SCHEMA = "hwft.checkpoint/1"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"

#: Recipe keys that may differ between a run and its resumption: they change what is logged,
#: kept or shown, never the trained weights. Every other difference is refused.
RESULT_NEUTRAL = (
    "output.",
    "eval.",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.eval_every",
    "train.nonfinite_limit",
    "data.eval",
    "parallel.timeout",
    "parallel.accelerate_config",
    "parallel.offload_optimizer",
    "parallel.offload_params",
    "parallel.activation_checkpointing",
    "kernels.compile",
)

#: Strategies whose checkpoints are the same portable files (full weights and optimizer state
#: by parameter name): a run saved by one resumes under another. DeepSpeed keeps its own.
PORTABLE_STRATEGIES = ("none", "ddp", "fsdp2")


# ---------------------------------------------------------------------------- finding one


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder and its trainer state."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a manifest) under ``run_dir/checkpoints``, oldest first."""
    root = run_dir / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else ():
        number = p.name.removeprefix("step-")
        if number.isdigit() and (p / MANIFEST).is_file():
            found.append((int(number), p))
    return sorted(found)


def locate(run_dir: Path, wanted: str) -> Path:
    """``--resume`` (``latest``) or ``--resume PATH``: the checkpoint folder to resume from."""
    if wanted != "latest":
        path = Path(wanted).expanduser().resolve()
        if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
            return locate(path, "latest")  # a run folder: its latest checkpoint
        if not path.is_dir():
            raise UserError(f"--resume {wanted}: no such folder; give a checkpoints/step-N folder or a run folder")
        return path
    found = checkpoint_steps(run_dir)
    if not found:
        raise UserError(
            f"--resume: {run_dir} has no complete checkpoint (checkpoints/step-N with a manifest.json); "
            "set train.save_every so runs write them, or start without --resume"
        )
    return found[-1][1]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {
        str(p.relative_to(folder)): {"sha256": file_digest(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "files": files}, indent=1), encoding="utf-8")


def verify_manifest(folder: Path) -> None:
    """Every file listed, unchanged, and nothing else: else a UserError naming the file."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"{folder} has no {MANIFEST}: it is not a checkpoint hwft wrote (or its write was cut off); "
            "resume from another checkpoints/step-N folder"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert manifest.get("schema") == SCHEMA and isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise UserError(f"{manifest_path}: not a {SCHEMA} manifest; refusing to load {folder}") from None
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise UserError(
            f"{folder}: {extra[0]} is not in the checkpoint's manifest (hwft did not write it); refusing to "
            "load the checkpoint. Remove the file if you know where it came from"
        )
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder}: {name} is missing; the checkpoint is incomplete, resume from another")
        if path.stat().st_size != entry.get("bytes") or file_digest(path) != entry.get("sha256"):
            raise UserError(
                f"{folder}: {name} differs from what hwft wrote (sha256 mismatch); refusing to load the "
                "checkpoint. Resume from another checkpoints/step-N folder"
            )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def data_digests(recipe) -> list[str]:
    """sha256 of each training dataset's files, in data.train's order: what the data position
    counts in. A dataset moved to another path is the same data; an edited file is not."""
    digests = []
    for spec in recipe.data.train:
        if not spec.path:
            digests.append(f"registry:{spec.name}")
            continue
        path = recipe.resolve_path(spec.path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256()
        for f in files:
            h.update(file_digest(f).encode() if f.exists() else b"missing")
        digests.append(h.hexdigest())
    return digests


def _without_paths(recipe: dict) -> dict:
    out = json.loads(json.dumps(recipe))
    for spec in out.get("data", {}).get("train", []):
        if isinstance(spec, dict):
            spec.pop("path", None)
    return out


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Dotted recipe keys whose values differ and would change the trained result (training
    files are compared by content, see :func:`data_digests`, not by path)."""
    a, b = _flat(_without_paths(saved)), _flat(_without_paths(current))
    keys = sorted(set(a) | set(b))

    def neutral(key: str) -> bool:
        return any(key == n or key.startswith(n if n.endswith(".") else n + ".") for n in RESULT_NEUTRAL)

    diffs = [k for k in keys if a.get(k) != b.get(k) and not neutral(k)]
    strategies = (a.get("parallel.strategy"), b.get("parallel.strategy"))
    if "parallel.strategy" in diffs and all(s in PORTABLE_STRATEGIES for s in strategies):
        diffs.remove("parallel.strategy")  # the same portable files either way
    if "parallel.zero_stage" in diffs and "deepspeed" not in strategies:
        diffs.remove("parallel.zero_stage")
    if "train.gradient_accumulation_steps" in diffs:  # compared as processes x accumulation
        diffs.remove("train.gradient_accumulation_steps")
    return diffs


def open_checkpoint(recipe, wanted: str, world_size: int) -> Checkpoint:
    """Find, verify and compare the checkpoint to resume from: a UserError before any weight
    loads if it is not one hwft wrote, or the recipe (or the global batch) changed the result."""
    run_dir = Path(recipe.output.dir).expanduser().resolve()
    path = locate(run_dir, wanted)
    verify_manifest(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        saved = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8"))
        assert state.get("schema") == SCHEMA and isinstance(saved, dict)
    except (OSError, ValueError, AssertionError, yaml.YAMLError):
        raise UserError(f"{path}: not a {SCHEMA} checkpoint (trainer_state.json or recipe.yaml unreadable)") from None
    current = yaml.safe_load(recipe.to_yaml())
    diffs = recipe_differences(saved, current)
    if diffs:
        shown = ", ".join(f"{k} ({_flat(saved).get(k)!r} -> {_flat(current).get(k)!r})" for k in diffs[:6])
        raise RecipeError(
            f"--resume: the recipe differs from the one {path.name} was trained with, in keys that change "
            f"the result: {shown}{' ...' if len(diffs) > 6 else ''}. Resume with the original values, or "
            "start a new run in another output.dir"
        )
    changed = [spec.path or spec.name for spec, old, new in
               zip(recipe.data.train, state.get("data_digests", []), data_digests(recipe), strict=False) if old != new]
    if changed:
        raise UserError(
            f"--resume: training data {changed[0]} is not what {path.name} was trained on (its content changed); "
            "resume with the original files, or start a new run in another output.dir"
        )
    accumulation = recipe.train.gradient_accumulation_steps
    if state["world_size"] * state["accumulation"] != world_size * accumulation:
        raise UserError(
            f"--resume: {path.name} was trained with {state['world_size']} processes x {state['accumulation']} "
            f"accumulation micro-batches per step; this run has {world_size} x {accumulation}. Keep the "
            "global batch (processes x train.gradient_accumulation_steps) the same"
        )
    return Checkpoint(path, state)


# ---------------------------------------------------------------------------- tensors to files


def split_arrays(tree: Any, is_array: Callable[[Any], bool], prefix: str = "") -> tuple[Any, dict[str, Any]]:
    """A nested state (dicts, lists, scalars, engine arrays) as (JSON skeleton, {key: array}):
    each array replaced by ``{"__array__": key}``, saved apart in safetensors."""
    arrays: dict[str, Any] = {}

    def walk(node: Any, path: str) -> Any:
        if is_array(node):
            arrays[path] = node
            return {"__array__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            return {"__float__": repr(node)}
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"cannot write {type(node).__name__} at {path} into a checkpoint")

    return walk(tree, prefix), arrays


def join_arrays(skeleton: Any, arrays: dict[str, Any]) -> Any:
    """Inverse of :func:`split_arrays`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__array__"}:
            return arrays[skeleton["__array__"]]
        if set(skeleton) == {"__float__"}:
            return float(skeleton["__float__"])
        return {k: join_arrays(v, arrays) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_arrays(v, arrays) for v in skeleton]
    return skeleton


# ---------------------------------------------------------------------------- RNG


def host_rng_state() -> dict:
    """Python's and numpy's global RNG states as JSON values."""
    version, internal, gauss = random.getstate()
    state: dict = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_host_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------- stop signals


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
    return RunFailed(f"{why} after step {step}; {where}. Continue with: hwft train {recipe_hint} --resume",
                     128 + signum)


def make_temporary(final: Path) -> Path:
    """A temporary folder beside ``final``, for a write renamed into place at the end."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))


def discard_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoint folders a killed run left behind."""
    root = run_dir / "checkpoints"
    for p in root.glob(".step-*-tmp-*") if root.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True)


def trainer_state(step: int, steps: int, world_size: int, accumulation: int, strategy: str, engine: str,
                  data: dict, log: dict, nonfinite: int, rng: list[dict], engine_state: dict) -> dict:
    return {
        "schema": SCHEMA,
        "hwft_version": __version__,
        "engine": engine,
        "step": step,
        "steps": steps,
        "world_size": world_size,
        "accumulation": accumulation,
        "strategy": strategy,
        "data": data,
        "log": log,
        "nonfinite_steps": nonfinite,
        "rng": rng,
        **engine_state,
    }


# ---------------------------------------------------------------------------- the loop's part


class EngineState:
    """What an engine contributes to a checkpoint (hwft_torch.checkpoint, hwft_mlx.checkpoint).
    ``write_sharded`` and ``gather`` run on every rank, ``write`` on rank 0 with what ``gather``
    returned there; ``load`` on every rank."""

    name = "engine"

    def rng_state(self) -> dict:
        """This rank's engine RNG states, as JSON values."""
        return {}

    def set_rng_state(self, state: dict) -> None:
        pass

    def write_sharded(self, folder: Path) -> None:
        """Every rank writes its own shard files into ``folder`` (DeepSpeed); most engines don't."""

    def gather(self) -> Any:
        """Every rank takes part in gathering what rank 0 writes (sharded weights)."""
        return None

    def write(self, folder: Path, gathered: Any) -> dict:
        """Rank 0 writes weights and optimizer state into ``folder``; returns JSON state
        (scheduler, scaler) for trainer_state.json."""
        raise NotImplementedError

    def load(self, checkpoint: Checkpoint) -> None:
        """Every rank restores weights, optimizer, scheduler from ``checkpoint``."""
        raise NotImplementedError


class NonFinite:
    """Steps with a NaN or Inf loss or gradient norm: the engine skips their update; after
    ``limit`` of them the run stops, naming the step. The last good checkpoint stays."""

    def __init__(self, limit: int, log: Callable[[str], None]):
        self.limit, self.log, self.count = limit, log, 0

    def check(self, step: int, loss: float, grad_norm: float, skipped: bool = True,
              checkpoint: Path | None = None) -> None:
        """After a step: count it if its loss or gradient norm is NaN or Inf (``skipped``: the
        engine left the weights alone), and stop once there are too many."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        self.count += 1
        what = f"loss {loss}, gradient norm {grad_norm}"
        if not skipped or self.count > self.limit:
            why = ("the engine had already applied it" if not skipped else
                   f"{self.count} such steps, more than train.nonfinite_limit={self.limit}")
            kept = f"the last checkpoint, {checkpoint}, is kept" if checkpoint else "no checkpoint was written yet"
            raise RunFailed(
                f"step {step}: non-finite {what} ({why}); stopping: {kept}. "
                "Lower train.lr, set train.max_grad_norm, or use bf16 rather than fp16", 1)
        self.log(f"step {step}: non-finite {what}; update skipped ({self.count} of at most {self.limit})")


def out_of_memory(step: int, recipe, device: str) -> RunFailed:
    """The message for an allocation that failed during a step, with what would lower memory."""
    t, p, m = recipe.train, recipe.parallel, recipe.method
    hints = [f"train.micro_batch_size {t.micro_batch_size} -> {max(1, t.micro_batch_size // 2)} "
             "(raise train.gradient_accumulation_steps to keep the batch)",
             f"train.max_length {t.max_length} -> {max(2, t.max_length // 2)}"]
    if not p.activation_checkpointing:
        hints.append("parallel.activation_checkpointing: true")
    if m.tuning == "lora":
        hints.append("method.tuning: qlora (a 4-bit base, where the backend has it)")
    if m.tuning == "full":
        hints.append("method.tuning: lora")
    return RunFailed(f"out of memory on {device} at step {step}; to use less: " + "; ".join(hints), 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator's failure, as torch raises it on any device (CPU under an address-space
    limit, CUDA's OutOfMemoryError) or numpy/MLX as MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
        "out of memory", "Out of memory", "[Errno 12] Cannot allocate memory"))


class Checkpointer:
    """When and how the loop checkpoints, resumes and stops on a signal, for every engine.

    The loop calls ``restore(engine)`` once before its first step (returns the step to start
    after), ``after_step(step, engine)`` after each step's log line and evaluation."""

    def __init__(self, job, objective, log, strategy: str, steps: int, nonfinite: NonFinite,
                 resumable: Callable[[int], bool] = lambda step: True):
        self.job, self.objective, self.log, self.steps = job, objective, log, steps
        self.strategy, self.nonfinite, self.resumable = strategy, nonfinite, resumable
        self.collective = objective.collective
        self.signals = StopSignals()
        self.saved: Path | None = None
        self._digests: list[str] | None = None
        self.pending = False  #: a checkpoint is due at the next resumable step
        self.stop: int | None = None  #: the stop signal received

    def __enter__(self) -> Checkpointer:
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)

    def restore(self, engine: EngineState) -> int:
        checkpoint = self.job.resume
        if checkpoint is None:
            return 0
        state = checkpoint.state
        engine.load(checkpoint)
        self.objective.skip(state["data"]["micro_batches"])
        self.log.restore(state["log"])
        self.nonfinite.count = state["nonfinite_steps"]
        rngs = state["rng"]
        mine = rngs[self.job.world.rank] if len(rngs) == self.job.world.size else rngs[0]
        set_host_rng_state(mine["host"])
        engine.set_rng_state(mine["engine"])
        self.job.log(f"resumed from {checkpoint.path} (step {checkpoint.step} of {self.steps}, "
                     f"{state['data']['micro_batches']} micro-batches drawn)")
        return checkpoint.step

    def last(self) -> Path | None:
        """The newest checkpoint of this run: written here, or resumed from."""
        return self.saved or (self.job.resume.path if self.job.resume else None)

    def digests(self) -> list[str]:
        if self._digests is None:
            self._digests = data_digests(self.job.recipe)
        return self._digests

    def stop_requested(self) -> int | None:
        """The signal any rank received (all ranks agree, so all checkpoint together)."""
        got = self.signals.received or 0
        if self.job.world.size > 1:
            got = int(max(self.collective.gather([got]), key=lambda x: x[0])[0])
        return got or None

    def after_step(self, step: int, engine: EngineState) -> None:
        """Checkpoint when ``train.save_every`` says so or a stop signal came (at the next step
        the objective can resume from: GRPO's rollout batch spans num_iterations steps), then
        stop if signalled. The last step writes the result instead."""
        if step >= self.steps:
            return
        every = self.job.recipe.train.save_every
        stop = self.stop_requested()
        self.pending = self.pending or bool(stop) or bool(every and step % every == 0)
        self.stop = self.stop or stop
        if self.pending and self.resumable(step):
            self.save(step, engine)
            self.pending = False
            self.log.restart_clock()
            if self.stop:
                raise stopped_message(self.stop, step, self.saved, self.job.recipe_hint)

    def save(self, step: int, engine: EngineState) -> Path:
        """Write checkpoint ``step`` under a temporary name, then rename it into place; a write
        the storage refuses removes the partial folder and stops the run naming the last
        complete checkpoint (hwft.output.RunDir.writing)."""
        with self.job.run_dir.writing(f"checkpoint step-{step}"):
            return self._save(step, engine)

    def _save(self, step: int, engine: EngineState) -> Path:
        job, world = self.job, self.job.world
        final = job.run_dir.checkpoint_dir(step)
        tmp = make_temporary(final) if world.main else None
        if world.size > 1:  # DeepSpeed's ranks write into rank 0's folder (shared storage)
            tmp = Path(self.collective.gather([str(tmp or "")])[0][0])
        try:
            engine.write_sharded(tmp)
            gathered = engine.gather()
            rng = {"host": host_rng_state(), "engine": engine.rng_state()}
            rngs = [part[0] for part in self.collective.gather([rng])] if world.size > 1 else [rng]
            if world.main:
                engine_state = engine.write(tmp, gathered)
                state = trainer_state(
                    step, self.steps, world.size, job.recipe.train.gradient_accumulation_steps, self.strategy,
                    engine.name, self.objective.position(), self.log.carry(), self.nonfinite.count, rngs,
                    {"data_digests": self.digests(), **engine_state},
                )
                (tmp / TRAINER_STATE).write_text(json.dumps(state), encoding="utf-8")
                (tmp / "recipe.yaml").write_text(job.recipe.to_yaml(), encoding="utf-8")
                write_manifest(tmp)  # last: a folder with a manifest is complete
                job.run_dir.commit(tmp, final)
                job.run_dir.prune_checkpoints(job.recipe.train.keep_checkpoints)
        finally:
            if tmp is not None and world.main and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if world.size > 1:
            self.collective.sum([0.0])  # nobody runs ahead while rank 0 renames
        self.saved = final
        job.log(f"checkpoint {final}")
        return final
