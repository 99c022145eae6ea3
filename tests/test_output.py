"""The output folder's pieces: metrics, atomic directories, checkpoints, progress display."""

from __future__ import annotations

import io

import pytest

from hwft.output import METRIC_KEYS, RunDir
from hwft.progress import Progress
from hwft.recipe import recipe_from_dict


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(step: int) -> dict:
    return {
        "step": step,
        "epoch": step / 10,
        "loss": 1.0 / step,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_second": 100.0,
        "trained_tokens_per_second": 40.0,
        "elapsed": float(step),
    }


def test_progress_bar_on_a_terminal_and_lines_elsewhere():
    tty = Terminal()
    bar = Progress(4, log_every=1, stream=tty)
    bar.update(record(1))
    bar.update(record(2))
    bar.close()
    text = tty.getvalue()
    assert "2/4" in text and "loss=0.5000" in text and "tok_s=100" in text and "<" in text  # ETA
    pipe = io.StringIO()
    lines = Progress(4, log_every=2, stream=pipe)
    for step in range(1, 5):
        lines.update(record(step))
    assert pipe.getvalue().splitlines()[0].startswith("step 2/4  loss 0.5000  lr 1.00e-03")
    assert len(pipe.getvalue().splitlines()) == 2 and "eta 0s" in pipe.getvalue()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    run = RunDir(recipe_from_dict({"data": "x.jsonl", "output": str(tmp_path / "o")}))
    final = run.checkpoint_dir(3)
    with run.atomic_dir(final) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(RuntimeError), run.atomic_dir(final) as tmp:
        (tmp / "a").write_text("half-written")
        raise RuntimeError("killed mid-write")
    assert (final / "a").read_text() == "first"
    assert [p.name for p in final.parent.iterdir()] == ["step-3"]  # no temporary left behind
    with run.atomic_dir(final) as tmp:
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "second"


def test_metrics_records_need_every_key(tmp_path):
    run = RunDir(recipe_from_dict({"data": "x.jsonl", "output": str(tmp_path / "o")}))
    run.log_metrics(record(1))
    with pytest.raises(ValueError, match="lacks"):
        run.log_metrics({k: 1 for k in METRIC_KEYS if k != "lr"})
    assert (tmp_path / "o" / "recipe.yaml").is_file()
    assert run.plot_loss().name == "loss.png"
