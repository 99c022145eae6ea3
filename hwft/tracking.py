"""Experiment tracking: every metrics line and evaluation also goes to the trackers named in
``output.report_to``, through the ``hwft_register_loggers`` hook (plugin API 0.4).

Built in, each used only when asked for and its package installed:

- ``tensorboard``: event files in ``OUTPUT/tensorboard`` (``torch.utils.tensorboard``, or
  ``tensorboardX`` where torch is absent); offline by nature: ``tensorboard --logdir OUTPUT``;
- ``wandb``: a Weights & Biases run named after the output folder in project
  ``output.project``, files under ``OUTPUT/wandb``; ``WANDB_MODE=offline`` keeps it local
  (``wandb sync`` uploads it later);
- ``mlflow``: an MLflow run in experiment ``output.project``, the recipe as parameters, at
  ``MLFLOW_TRACKING_URI`` or else a local SQLite store ``OUTPUT/mlflow.db`` (``mlflow ui
  --backend-store-uri sqlite:///OUTPUT/mlflow.db``).

Logged: ``train/<key>`` for every number of a metrics line (loss, lr, grad_norm, tokens/s,
peak memory, and the method's own: DPO rewards and margins, GRPO rewards and KL), and
``eval/loss`` for each evaluation on held-out data. Only rank 0 tracks.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pluggy

from hwft.errors import RecipeError, did_you_mean

hookimpl = pluggy.HookimplMarker("hwft")


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Logger:
    """A registered tracker kind: ``open(run_dir, recipe) -> Tracker``; ``requires``: the
    importable module it needs (checked before any weight loads)."""

    name: str
    open: Callable[[Path, Any], Tracker]
    requires: tuple[str, ...] = ()
    description: str = ""


def numbers(record: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a metrics record, keyed ``prefix/key`` (step and the run's length aside)."""
    return {
        f"{prefix}/{k}": float(v)
        for k, v in record.items()
        if k not in ("step", "total_steps")
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    }


def flat_recipe(recipe) -> dict[str, Any]:
    """The recipe as dotted keys and scalar values (trackers' parameter tables)."""
    out: dict[str, Any] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value if isinstance(value, int | float | str | bool) or value is None else str(value)

    walk(recipe.model_dump(mode="json"), "")
    return out


class TensorBoard:
    """TensorBoard event files, written with tensorboard's own event writer and protos (no
    torch or TensorFlow): one scalar per metric and step, and the recipe as text."""

    def __init__(self, run_dir: Path, recipe):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(run_dir / "tensorboard"))
        self._text("recipe", "```yaml\n" + recipe.to_yaml() + "\n```", 0)

    def _write(self, step: int, value) -> None:
        import time

        from tensorboard.compat.proto import event_pb2, summary_pb2  # generated protobuf modules: no static members

        self.writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value]))  # pyright: ignore[reportAttributeAccessIssue]
        )

    def _text(self, tag: str, text: str, step: int) -> None:
        """A text summary as TensorBoard's text plugin reads it: a string tensor tagged "text"."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))  # pyright: ignore[reportAttributeAccessIssue]
        tensor = tensor_pb2.TensorProto(  # pyright: ignore[reportAttributeAccessIssue]
            dtype=types_pb2.DT_STRING,  # pyright: ignore[reportAttributeAccessIssue]
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),  # pyright: ignore[reportAttributeAccessIssue]
        )
        self._write(step, summary_pb2.Summary.Value(tag=f"{tag}/text_summary", metadata=metadata, tensor=tensor))  # pyright: ignore[reportAttributeAccessIssue]

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        for key, value in values.items():
            self._write(step, summary_pb2.Summary.Value(tag=key, simple_value=float(value)))  # pyright: ignore[reportAttributeAccessIssue]
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, recipe):
        import wandb

        self.run = wandb.init(
            project=recipe.output.project,
            name=run_dir.name,
            dir=str(run_dir),
            config=flat_recipe(recipe),
            reinit="create_new",
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, recipe):
        from mlflow import MlflowClient

        # MLflow 3's local store is SQLite (its file store is in maintenance mode).
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(recipe.output.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(recipe.output.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = list(flat_recipe(recipe).items())
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params[start : start + 100]])

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow's metric names allow "/" and the path of the key.
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BUILTIN_LOGGERS = (
    Logger("tensorboard", TensorBoard, ("tensorboard",), "TensorBoard event files in OUTPUT/tensorboard"),
    Logger("wandb", WandB, ("wandb",), "a Weights & Biases run (WANDB_MODE=offline keeps it local)"),
    Logger("mlflow", MLflow, ("mlflow",), "an MLflow run (MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db)"),
)


@hookimpl
def hwft_register_loggers(register):
    for logger in BUILTIN_LOGGERS:
        register(logger)


def collect_loggers(pm: pluggy.PluginManager) -> dict[str, Logger]:
    found: dict[str, Logger] = {}

    def register(logger: Logger) -> None:
        found.setdefault(logger.name, logger)

    pm.hook.hwft_register_loggers(register=register)
    return found


def check_loggers(names: list[str], loggers: dict[str, Logger]) -> None:
    """output.report_to: known trackers whose packages are installed; before weights load."""
    for name in names:
        if name not in loggers:
            raise RecipeError(
                f"output.report_to: unknown tracker '{name}'{did_you_mean(name, loggers)} (known: {', '.join(loggers)})"
            )
        missing = [m for m in loggers[name].requires if importlib.util.find_spec(m) is None]
        if missing:
            raise RecipeError(f"output.report_to: {name} needs the package {missing[0]} (pip install {missing[0]})")


def open_trackers(names: list[str], loggers: dict[str, Logger], run_dir: Path, recipe) -> list[Tracker]:
    return [loggers[name].open(run_dir, recipe) for name in names]
