"""``hwft export``: a trained result in the formats other tools load.

The formats are registered exporters (:mod:`hwft.use.exporters`, ``hwft_register_exporters``):
the torch backend brings ``hf`` (the merged model as Hugging Face safetensors), ``peft`` (the
adapter alone) and ``gguf`` (f16 or q8_0, :mod:`hwft.use.gguf_writer`); the MLX backend brings
``mlx`` (an mlx-lm folder, ``--mlx-bits 4`` or ``8`` quantises it). `hwft plugins` lists them.

Each is written under a temporary name and renamed into place, so a failed export leaves
nothing half-written. ``--verify`` reloads the export with the library its users use and
compares its logits with the trained model's (:func:`verify`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from hwft.errors import UserError
from hwft.inference import Trained, open_trained
from hwft.use.exporters import Exporter, ExportOptions

#: A short text whose logits an export must reproduce.
PROBE = "The quick brown fox jumps over the lazy dog. Fine-tuning is done; hello from hwft!"


def exporter_for(trained: Trained, to: str) -> Exporter:
    """The registered exporter of ``to``, on the trained result's engine where there is one."""
    from hwft.plugins import get_host

    host = get_host()
    engine = None
    if trained.recipe is not None and trained.recipe.backend in host.backends:
        engine = host.backend(trained.recipe.backend).engine
    return host.exporters().get(to, engine)


def default_out(trained: Trained, to: str, options: ExportOptions) -> Path:
    if trained.run is None:
        raise UserError("export: give --out (where to write): the target is not a run folder")
    return trained.run / "export" / exporter_for(trained, to).default_name(options)


def options_for(trained: Trained, to: str, given: dict | None = None, dtype: str = "auto") -> ExportOptions:
    """The options of one export: ``dtype`` and the exporter's own settings from ``given``
    (field -> value, None where its flag was not given)."""
    from hwft.plugins import get_host

    exporter = exporter_for(trained, to)
    return ExportOptions(dtype, get_host().exporters(), exporter.settings(given or {}))


def given_settings(args, to: str) -> dict:
    """The ``--<to>-<field>`` flags of the command line, by field."""
    prefix = f"export_{to}__"
    return {key.removeprefix(prefix): value for key, value in vars(args).items() if key.startswith(prefix)}


def _fresh(path: Path, overwrite: bool) -> None:
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise UserError(f"export: {path} exists; choose another --out, or pass --overwrite")


def _place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``, replacing an older export."""
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    tmp.rename(final)


def export(
    trained: Trained, to: str, out: Path, options: ExportOptions | None = None, overwrite: bool = False, log=print
) -> Path:
    """Write ``trained`` as ``to`` at ``out`` (a folder; a file for single-file formats)."""
    exporter = exporter_for(trained, to)
    options = options or options_for(trained, to)
    if exporter.needs_adapter and trained.adapter is None:
        raise UserError(f"export --to {to}: {trained.label} is a full model, not an adapter; use --to hf")
    if exporter.single_file and out.suffix != Path(exporter.default_name(options)).suffix:
        out = out / exporter.default_name(options)
    _fresh(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    try:
        staged = exporter.make(trained, work / out.name, options)
        _place(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = " ".join(
        str(v) for v in (options.settings.model_dump().values() if options.settings else ()) if v is not None
    )
    log(f"hwft export: wrote {out} ({to}{' ' + settings if settings else ''})")
    return out


def verify(trained: Trained, path: Path, to: str, options: ExportOptions | None = None) -> dict:
    """Reload the export and compare its logits on :data:`PROBE` with the trained model's on
    the torch CPU backend: {max_abs, relative, argmax_agreement, tolerance, ok}."""
    import numpy as np

    from hwft.inference import open_session

    exporter = exporter_for(trained, to)
    session = open_session(trained, "cpu", "fp32")
    ids = session.tokenizer(PROBE)["input_ids"]
    want = session.logits(ids)
    tolerance = exporter.tolerance(options or options_for(trained, to))
    try:
        got = exporter.reload(path, ids, trained)
    except Exception as exc:  # noqa: BLE001 - the reader's own failure, reported in one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return {
            "ok": False,
            "tolerance": tolerance,
            "error": f"{path} was written but does not load back for --verify ({type(exc).__name__}: {first})",
        }
    diff = float(np.abs(got - want).max())
    relative = diff / float(np.abs(want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    return {
        "max_abs": diff,
        "relative": relative,
        "argmax_agreement": agree,
        "tolerance": tolerance,
        "ok": relative <= tolerance,
    }


def run(args) -> int:
    trained = open_trained(args.target, base=args.base, trust_remote_code=args.trust_remote_code)
    if trained.head == "score":
        raise UserError(
            f"{trained.describe()} is a reward model; hwft export writes language models (gguf, mlx, "
            "merged safetensors). Use the run's model/ or adapter/ folder as it is: transformers loads "
            "it with AutoModelForSequenceClassification"
        )
    options = options_for(trained, args.to, given_settings(args, args.to), args.dtype)
    out = Path(args.out).expanduser() if args.out else default_out(trained, args.to, options)
    path = export(trained, args.to, out, options, args.overwrite, log=lambda m: print(m, file=sys.stderr))
    if args.verify:
        report = verify(trained, path, args.to, options)
        print(json.dumps({"export": str(path), "format": args.to, **report}))
        if "error" in report:
            print(f"hwft: error: {report['error']}", file=sys.stderr)
            return 1
        if not report["ok"]:
            print(
                f"hwft: error: the export's logits differ from the trained model's by {report['relative']:.2e} "
                f"of the largest logit (tolerance {report['tolerance']:.0e})",
                file=sys.stderr,
            )
            return 1
    else:
        print(path)
    return 0
