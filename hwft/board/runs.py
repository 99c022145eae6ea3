"""Runs and tasks the board starts: ``hwft train`` (and eval, export) as child processes.

Every child is started from an argument list (never a shell), in the workspace, with this
Python's ``-m hwft``; its stdout and stderr go to ``.hwft-board/logs/NAME.log``. A child dies with
the board (hwft's own ``stop_with_parent``). Stopping a run is SIGTERM, on which ``hwft train``
writes a checkpoint and ends (hwft.stopping); resuming is ``hwft train RUN/recipe.yaml --resume``.

What a run folder holds is read from the folder (metrics.jsonl, eval.jsonl, checkpoints/,
adapter/ or model/), so runs started from the command line are listed too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hwft.board.workspace import Workspace
from hwft.errors import UserError
from hwft.processes import start_child


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a step log (a line being written is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


@dataclass
class Child:
    """A process the board started."""

    name: str  #: the run's folder relative to the workspace, or a task's name
    kind: str  #: train, eval, export
    argv: list[str]
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    stopping: bool = False

    @property
    def code(self) -> int | None:
        return self.process.poll()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


class Runs:
    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.children: dict[str, Child] = {}  #: by name: the newest child of each run or task
        self.lock = threading.Lock()

    # -- starting and stopping ----------------------------------------------------------------
    def _start(self, name: str, kind: str, args: list[str]) -> Child:
        with self.lock:
            old = self.children.get(name)
            if old is not None and old.code is None:
                raise UserError(f"{name} is already running (pid {old.process.pid}); stop it first")
            log = self.log_path(name.removesuffix(f":{kind}"), kind)
            log.parent.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "hwft", *args]
            with log.open("a", encoding="utf-8") as out:
                out.write(f"$ hwft {' '.join(args)}\n")
                out.flush()
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                process = start_child(
                    argv, cwd=self.ws.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                )
            child = Child(name, kind, argv, log, process)
            self.children[name] = child
            return child

    def start(self, recipe_path: Path, recipe) -> Child:
        """``hwft train RECIPE``: the run is named after its output folder."""
        self.ws.check_recipe_paths(recipe)
        out = self.ws.inside(recipe.output.dir, "output.dir")
        name = self.ws.relative(out)
        child = self._start(name, "train", ["train", self.ws.relative(recipe_path)])
        started = self._started()
        started[name] = self.ws.relative(recipe_path)
        (self.ws.state / "started.json").write_text(json.dumps(started, indent=1), encoding="utf-8")
        return child

    def _started(self) -> dict[str, str]:
        """Run -> the recipe file it was started from (.hwft-board/started.json)."""
        try:
            started = json.loads((self.ws.state / "started.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return started if isinstance(started, dict) else {}

    def resume(self, name: str) -> Child:
        """``hwft train RECIPE --resume`` with the recipe the run was started from (what the
        stopped run's own message says to run); a run started elsewhere: its folder's copy."""
        folder = self.folder(name)
        if not (folder / "checkpoints").is_dir() or not any((folder / "checkpoints").glob("step-*")):
            raise UserError(
                f"{name} has no checkpoint to resume from (train.save_every writes them; stopping a run writes one)"
            )
        recipe = self._started().get(name)
        if recipe is None or not self.ws.inside(recipe, "recipe").is_file():
            recipe = self.ws.relative(folder / "recipe.yaml")
        return self._start(name, "train", ["train", recipe, "--resume"])

    def stop(self, name: str) -> None:
        child = self.children.get(name)
        if child is None or child.code is not None:
            raise UserError(f"{name} is not running")
        child.stopping = True
        child.process.send_signal(signal.SIGTERM)

    def task(self, name: str, kind: str, args: list[str]) -> Child:
        """hwft eval or export of a run, as a child process with its own log."""
        return self._start(f"{name}:{kind}", kind, args)

    def close(self) -> None:
        for child in self.children.values():
            if child.code is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.process.kill()

    # -- reading ------------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        path = self.ws.inside(name, "run")
        if not (path / "recipe.yaml").is_file() and name not in self.children:
            raise UserError(f"{name} is not a run folder (no recipe.yaml)")
        return path

    def names(self) -> list[str]:
        """Run folders under --runs (any depth up to two), and the runs started here."""
        found = set()
        if self.ws.runs.is_dir():
            for recipe in [*self.ws.runs.glob("*/recipe.yaml"), *self.ws.runs.glob("*/*/recipe.yaml")]:
                if "checkpoints" not in recipe.parts:
                    found.add(self.ws.relative(recipe.parent))
        found |= {n for n, c in self.children.items() if c.kind == "train"}
        return sorted(found)

    def log_path(self, name: str, kind: str = "train") -> Path:
        """.hwft-board/logs/RUN.log for a run, RUN.KIND.log for its eval or export."""
        return self.ws.state / "logs" / f"{_slug(name)}{'' if kind == 'train' else '.' + kind}.log"

    def log(self, name: str, kind: str = "train", tail: int = 200_000) -> str:
        child = self.children.get(name if kind == "train" else f"{name}:{kind}")
        path = child.log if child else self.log_path(name, kind)
        if not path.is_file():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - tail))
            return f.read().decode("utf-8", errors="replace")

    def status(self, name: str) -> dict:
        """What the page shows of a run: its state, the last logged step, and the figures."""
        folder = self.ws.inside(name, "run")
        metrics = read_jsonl(folder / "metrics.jsonl")
        evals = read_jsonl(folder / "eval.jsonl")
        child = self.children.get(name)
        checkpoints = sorted(
            int(p.name.split("-")[1]) for p in (folder / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()
        )
        result = "adapter" if (folder / "adapter").is_dir() else "model" if (folder / "model").is_dir() else None
        if child is not None and child.code is None:
            state = "stopping" if child.stopping else "running"
        elif child is not None:
            state = (
                "finished"
                if child.code == 0 and result
                else "stopped"
                if child.stopping or child.code in (143, -15)
                else "failed"
            )
        else:
            state = "finished" if result else "incomplete"
        last = metrics[-1] if metrics else {}
        total = last.get("total_steps")
        eta = None
        if state == "running" and last and total:
            eta = last["elapsed"] / last["step"] * (total - last["step"])
        return {
            "name": name,
            "state": state,
            "code": child.code if child else None,
            "step": last.get("step"),
            "total_steps": total,
            "loss": last.get("loss"),
            "lr": last.get("lr"),
            "tokens_per_second": last.get("tokens_per_second"),
            "elapsed": last.get("elapsed"),
            "eta": eta,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "checkpoints": checkpoints,
            "result": result,
            "resumable": bool(checkpoints) and state not in ("running", "stopping") and not result,
        }

    def series(self, name: str) -> dict:
        folder = self.ws.inside(name, "run")
        return {"metrics": read_jsonl(folder / "metrics.jsonl"), "eval": read_jsonl(folder / "eval.jsonl")}
