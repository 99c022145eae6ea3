"""Checkpoints: what a run writes so that it can resume exactly (the format, the manifest, and
the loop's part, :class:`Checkpointer`). What resuming checks is :mod:`hwft.resume`; stop signals
are :mod:`hwft.stopping`; non-finite steps and running out of memory, :mod:`hwft.guards`.

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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwft import __version__
from hwft.errors import UserError
from hwft.guards import NonFinite
from hwft.stopping import StopSignals, stopped_message

SCHEMA = "hwft.checkpoint/1"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"

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
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "files": files}, indent=1), encoding="utf-8")


def data_digests(recipe) -> list[str]:
    """sha256 of each training dataset's files, in data.train's order: what the data position
    counts in. A dataset moved to another path is the same data; an edited file is not."""
    digests = []
    for spec in recipe.data.train:
        if spec.random_tokens is not None:  # drawn from train.seed, which a resume keeps
            digests.append(f"random_tokens:{spec.random_tokens.rows}x{spec.random_tokens.length}")
            continue
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
            raise UserError(f"{folder}: {name} is missing; the checkpoint is incomplete. {_another(folder)}")
        size = path.stat().st_size
        if size < entry.get("bytes", 0):
            raise UserError(
                f"{folder}: {name} differs from what hwft wrote: {size} of its {entry['bytes']} bytes (cut "
                f"short by an interrupted copy?); refusing to load the checkpoint. {_another(folder)}"
            )
        if size != entry.get("bytes") or file_digest(path) != entry.get("sha256"):
            raise UserError(
                f"{folder}: {name} differs from what hwft wrote (sha256 mismatch); refusing to load the "
                f"checkpoint. {_another(folder)}"
            )


def _another(folder: Path) -> str:
    """What to resume from instead of the damaged checkpoint ``folder``: the newest other one."""
    others = [p for _, p in checkpoint_steps(folder.parent.parent) if p.resolve() != folder.resolve()]
    if not others:
        return "Resume from another checkpoints/step-N folder, if the run has one"
    return f"Resume from the one before: --resume {others[-1]}"


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

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]
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


def make_temporary(final: Path) -> Path:
    """A temporary folder beside ``final``, for a write renamed into place at the end."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))


def discard_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoint folders a killed run left behind."""
    root = run_dir / "checkpoints"
    for p in root.glob(".step-*-tmp-*") if root.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True)


def trainer_state(
    step: int,
    steps: int,
    world_size: int,
    accumulation: int,
    strategy: str,
    engine: str,
    data: dict,
    log: dict,
    nonfinite: int,
    rng: list[dict],
    engine_state: dict,
) -> dict:
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


class Checkpointer:
    """When and how the loop checkpoints, resumes and stops on a signal, for every engine.

    The loop calls ``restore(engine)`` once before its first step (returns the step to start
    after), ``after_step(step, engine)`` after each step's log line and evaluation."""

    def __init__(
        self,
        job,
        objective,
        log,
        strategy: str,
        steps: int,
        nonfinite: NonFinite,
        resumable: Callable[[int], bool] = lambda step: True,
    ):
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
        self.job.log(
            f"resumed from {checkpoint.path} (step {checkpoint.step} of {self.steps}, "
            f"{state['data']['micro_batches']} micro-batches drawn)"
        )
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
        assert tmp is not None  # rank 0 made it; the other ranks were told where
        try:
            engine.write_sharded(tmp)
            gathered = engine.gather()
            rng = {"host": host_rng_state(), "engine": engine.rng_state()}
            rngs = [part[0] for part in self.collective.gather([rng])] if world.size > 1 else [rng]
            if world.main:
                engine_state = engine.write(tmp, gathered)
                state = trainer_state(
                    step,
                    self.steps,
                    world.size,
                    job.recipe.train.gradient_accumulation_steps,
                    self.strategy,
                    engine.name,
                    self.objective.position(),
                    self.log.carry(),
                    self.nonfinite.count,
                    rngs,
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
