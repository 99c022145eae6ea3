"""Every text model family both transformers and mlx-lm implement, tried as a user would: a tiny
model of each (hwft.testing.tiny), two LoRA steps of sft on packed rows on each engine, and the
torch run's result exported to hf, mlx and gguf with ``--verify``.

Each stage runs through ``hwft``'s own command line (in one child process per family, so one
family's crash or memory cannot take the others down) and ends as :func:`outcome` says: ok,
unpacked (training refused packed rows in one line, and trained with ``data.packing: false``),
refused (exit 2, one line), fails (exit 1, one line with its cause) or broken (a traceback, a
crash, a bare name; the enumerating test allows none). A family transformers cannot build a
small model of from its own default config is ``untested``.

    python -m hwft.testing.family_probe                    # every shared model type, the table
    python -m hwft.testing.family_probe glm4 starcoder2    # some
    python -m hwft.testing.family_probe --json results.json

The table in docs/families.md ("Every family transformers and mlx-lm share") is this command's
output (:func:`table` over ``docs/family-probe.json``), held to it by tests/test_family_probe.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: The stages, in order: (name, the column's heading).
STAGES = (
    ("build", "tiny model"),
    ("torch", "trains on torch"),
    ("mlx", "trains on MLX"),
    ("hf", "--to hf"),
    ("mlx_export", "--to mlx"),
    ("gguf", "--to gguf"),
)
#: What a probe of one family may take before it counts as broken.
TIMEOUT_S = 600


def shared_model_types() -> list[str]:
    """Every model type transformers builds as a causal LM and mlx-lm loads (directly, or as
    the architecture its MODEL_REMAPPING names)."""
    import pkgutil

    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    modules = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in modules or MODEL_REMAPPING.get(t) in modules)


ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]
    }
    for i in range(12)
]


def run_cli(*args: str | Path) -> dict:
    """``hwft ARGS`` in this process: its exit code and what it printed."""
    from hwft import cli
    from hwft.plugins import reset_host

    reset_host()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - a traceback is the outcome being recorded
            import traceback

            traceback.print_exc(file=err)
            code = f"{type(exc).__name__}: {exc}"
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def outcome(done: dict, verified: bool = False) -> str:
    """How a stage ended:

    - ``ok``;
    - ``refused: <the line>``: exit 2, one line naming why (a family, setting or export hwft
      cannot run, said before anything is written);
    - ``fails: <the line>``: exit 1, one line with its cause (a failure hwft did not foresee, or an
      export that does not verify);
    - ``broken: <the last thing it said>``: a traceback, a crash, or a line naming no cause. The
      enumerating test allows none."""
    lines = [line for line in done["stderr"].splitlines() if line.strip()]
    if done["code"] == 0 and (not verified or '"ok": true' in done["stdout"]):
        return "ok"
    said = [line for line in lines if line.startswith("hwft: error: ")]
    one_line = len(said) == 1 and "Traceback" not in done["stderr"] and not said[0].rstrip().endswith(".weight.")
    if one_line and done["code"] in (1, 2):
        return ("refused: " if done["code"] == 2 else "fails: ") + said[0].removeprefix("hwft: error: ")
    last = said[-1] if said else (lines[-1] if lines else f"exit {done['code']}")
    return f"broken: {last[:300]}"


def probe(model_type: str, folder: Path) -> dict[str, str]:
    """Every stage for one model type in ``folder``: stage -> outcome, with the folders it
    names written as ``MODEL`` (the tiny model) and ``SMALL`` (the MLX proof's small model)."""
    return {stage: normalised(value, folder) for stage, value in stages(model_type, folder).items()}


def normalised(outcome: str, folder: Path) -> str:
    import re

    outcome = outcome.replace(str(folder / "model"), "MODEL").replace(str(folder), "RUN")
    return re.sub(r"/\S*hwft-agreement-\w+", "SMALL", outcome)


def stages(model_type: str, folder: Path) -> dict[str, str]:
    import yaml

    from hwft.testing.cells import write_jsonl
    from hwft.testing.tiny import build_tiny_model

    results: dict[str, str] = {}
    model = folder / "model"
    try:
        build_tiny_model(model_type, model)
        results["build"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded
        results["build"] = f"untested: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return results
    write_jsonl(folder / "rows.jsonl", ROWS)
    for engine in ("torch", "mlx"):
        recipe = {
            "model": str(model),
            "data": {"train": [{"path": "rows.jsonl"}], "packing": True},
            "method": {"tuning": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "train": {"lr": 1e-3, "max_steps": 2, "micro_batch_size": 2, "max_length": 64, "precision": "fp32"},
            "backend": "cpu" if engine == "torch" else "mlx",
            "output": {"dir": str(folder / f"run-{engine}"), "plot": False},
        }
        path = folder / f"{engine}.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        results[engine] = outcome(run_cli("train", path, "--quiet"))
        if results[engine].startswith("refused: data.packing:"):  # what it takes: packing off
            again = outcome(run_cli("train", path, "--quiet", "data.packing=false", "output.overwrite=true"))
            if again == "ok":
                results[engine] = "unpacked: " + results[engine].removeprefix("refused: ")
    if results["torch"].split(":")[0] not in ("ok", "unpacked"):
        return results
    for stage, to in (("hf", "hf"), ("mlx_export", "mlx"), ("gguf", "gguf")):
        results[stage] = outcome(
            run_cli("export", folder / "run-torch", "--to", to, "--verify", "--out", folder / f"export-{to}"),
            verified=True,
        )
    return results


def probe_in_child(model_type: str, root: Path) -> dict[str, str]:
    """:func:`probe` in a child process of its own; a crash or a timeout is its outcome."""
    folder = root / model_type
    folder.mkdir(parents=True, exist_ok=True)
    answer = folder / "outcome.json"
    from hwft.processes import child_process

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("HWFT_TRACEBACKS", None)  # what a user sees: a traceback is a failure
    command = [sys.executable, "-m", "hwft.testing.family_probe", "--child", model_type, "--dir", str(folder)]
    with child_process(
        command, f"the {model_type} probe", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            _, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"build": f"broken: no outcome within {TIMEOUT_S} s"}
    if answer.exists():
        return json.loads(answer.read_text())
    tail = [line for line in err.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
    return {"build": f"broken: the probe process ended ({proc.returncode}): {tail[0][:300]}"}


def cell(value: str | None) -> str:
    if value is None:
        return "-"
    if value == "ok":
        return "yes"
    kind, _, why = value.partition(": ")
    why = why if len(why) <= 160 else why[:157] + "..."
    return f"{kind}: {why}".replace("|", "\\|")


def table(results: dict[str, dict[str, str]]) -> str:
    """The Markdown table of :func:`probe`'s results, one row per model type."""
    lines = [
        "| model type | " + " | ".join(heading for _, heading in STAGES[1:]) + " |",
        "|---|" + "---|" * (len(STAGES) - 1),
    ]
    for model_type in sorted(results):
        row = results[model_type]
        if row.get("build", "ok") != "ok":
            lines.append(f"| {model_type} | " + cell(row["build"]) + " |" + " |" * (len(STAGES) - 2))
            continue
        lines.append(f"| {model_type} | " + " | ".join(cell(row.get(stage)) for stage, _ in STAGES[1:]) + " |")
    return "\n".join(lines) + "\n"


def counts(results: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """stage -> {"ok": n, "refused": n, "fails": n, "broken": n, "not reached": n}."""
    out: dict[str, dict[str, int]] = {}
    for stage, _ in STAGES:
        tally = {"ok": 0, "unpacked": 0, "refused": 0, "fails": 0, "broken": 0, "untested": 0, "not reached": 0}
        for row in results.values():
            value = row.get(stage)
            tally[value.split(":")[0] if isinstance(value, str) else "not reached"] += 1
        out[stage] = tally
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hwft.testing.family_probe", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("model_types", nargs="*", help="model types to probe (default: every shared one)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--dir", type=Path, help="where the models and runs go (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="families probed at once (each in its own process)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        outcome_path = args.dir / "outcome.json"
        outcome_path.write_text(json.dumps(probe(args.child, args.dir)))
        return 0
    types = args.model_types or shared_model_types()
    with tempfile.TemporaryDirectory(prefix="hwft-family-probe-") as scratch:
        root = args.dir or Path(scratch)
        results = {}

        def one(model_type: str) -> None:
            results[model_type] = probe_in_child(model_type, root)
            print(f"{model_type}: {json.dumps(results[model_type])}", file=sys.stderr, flush=True)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, types))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(table(results), end="")
    print(json.dumps(counts(results)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
