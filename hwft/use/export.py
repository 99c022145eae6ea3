"""``hwft export``: a trained result in the formats other tools load.

- ``hf``: the merged full model (LoRA folded into the base weights, ``W + (alpha/r) B A``) as
  Hugging Face safetensors with its tokenizer and chat template: transformers, vLLM and TGI load
  the folder as it is;
- ``peft``: the adapter alone, PEFT's own layout (``PeftModel.from_pretrained``);
- ``mlx``: an mlx-lm model folder, converted from the merged model by ``mlx_lm.convert``
  (``--mlx-bits 4`` or ``8`` quantises it, MLX affine);
- ``gguf``: one file for llama.cpp and Ollama, f16 or q8_0, Llama and Qwen2 families
  (:mod:`hwft.use.gguf_writer`).

Each is written under a temporary name and renamed into place, so a failed export leaves
nothing half-written. ``--verify`` reloads the export with the library its users use and
compares its logits with the trained model's (:func:`verify`).
"""

from __future__ import annotations

import warnings

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hwft.errors import UserError
from hwft.inference import Trained, open_trained

FORMATS = ("hf", "peft", "mlx", "gguf")
#: A short text whose logits an export must reproduce.
PROBE = "The quick brown fox jumps over the lazy dog. Fine-tuning is done; hello from hwft!"


def default_out(trained: Trained, to: str, gguf_type: str) -> Path:
    if trained.run is None:
        raise UserError("export: give --out (where to write): the target is not a run folder")
    name = f"model-{gguf_type}.gguf" if to == "gguf" else to
    return trained.run / "export" / name


def merge_to_hf(trained: Trained, out: Path, dtype: str = "auto") -> Path:
    """The merged model as an HF safetensors folder with tokenizer (torch and peft)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from hwft.models import load_tokenizer

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    model = AutoModelForCausalLM.from_pretrained(
        trained.weights, dtype=torch.float32, local_files_only=True, use_safetensors=True,
        trust_remote_code=trained.trust_remote_code,
    )
    if trained.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained.adapter).merge_and_unload()
    saved = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if saved is not None:
        model = model.to(saved)
    model.config._name_or_path = out.name
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(trained.tokenizer_dir, trained.trust_remote_code).save_pretrained(out)
    return out


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


def export(trained: Trained, to: str, out: Path, gguf_type: str = "q8_0", dtype: str = "auto",
           mlx_bits: int | None = None, overwrite: bool = False, log=print) -> Path:
    """Write ``trained`` as ``to`` at ``out`` (a folder; a .gguf file for gguf)."""
    if to not in FORMATS:
        raise UserError(f"export --to {to}: choose one of {', '.join(FORMATS)}")
    if to == "peft" and trained.adapter is None:
        raise UserError(f"export --to peft: {trained.label} is a full model, not an adapter; use --to hf")
    if to == "gguf" and out.suffix != ".gguf":
        out = out / f"model-{gguf_type}.gguf"
    _fresh(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    try:
        if to == "peft":
            staged = work / "adapter"
            shutil.copytree(trained.adapter, staged)
        elif to == "hf":
            staged = merge_to_hf(trained, work / "model", dtype)
        elif to == "mlx":
            from mlx_lm import convert

            from hwft_mlx.modeling import config_overrides

            merged = merge_to_hf(trained, work / "merged", dtype)
            # mlx-lm reads rope_theta at the top of config.json; transformers 5 nests it.
            config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
            config.update(config_overrides(config))
            (merged / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            staged = work / "mlx"
            with contextlib.redirect_stdout(sys.stderr):  # mlx-lm reports progress on stdout
                convert(str(merged), str(staged), quantize=mlx_bits is not None, q_bits=mlx_bits,
                        trust_remote_code=trained.trust_remote_code)
        else:
            from hwft.use.gguf_writer import write_gguf

            merged = merge_to_hf(trained, work / "merged", "fp32")
            staged = write_gguf(merged, work / out.name, gguf_type, out.stem)
        _place(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"hwft export: wrote {out} ({to}{' ' + gguf_type if to == 'gguf' else ''})")
    return out


def reload_logits(path: Path, to: str, ids: list[int], base: Path | None = None):
    """The export's logits for ``ids``, read back the way its users read it: transformers for
    hf, peft on the base for peft, mlx-lm for mlx, transformers' GGUF reader for gguf."""
    import numpy as np

    if to == "mlx":
        import mlx.core as mx
        from mlx_lm import load

        model, _ = load(str(path))
        return np.array(model(mx.array([ids]))[0].astype(mx.float32))
    import torch
    from transformers import AutoModelForCausalLM

    if to == "gguf":
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader draws a progress bar
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    elif to == "peft":
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()


#: How far an export's logits may be from the trained model's (max |difference| relative to the
#: largest |logit|): fp32 round-trips exactly up to summation order; f16 and q8_0 round.
TOLERANCE = {"fp32": 1e-4, "f16": 1e-2, "q8_0": 5e-2, "mlx": 1e-3}


def verify(trained: Trained, path: Path, to: str, gguf_type: str = "q8_0") -> dict:
    """Reload the export and compare its logits on :data:`PROBE` with the trained model's on
    the torch CPU backend: {max_abs, relative, argmax_agreement, tolerance, ok}."""
    import numpy as np

    from hwft.inference import open_session

    session = open_session(trained, "cpu", "fp32")
    ids = session.tokenizer(PROBE)["input_ids"]
    want = session.logits(ids)
    got = reload_logits(path, to, ids, trained.weights)
    diff = float(np.abs(got - want).max())
    relative = diff / float(np.abs(want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    tolerance = TOLERANCE[gguf_type if to == "gguf" else "mlx" if to == "mlx" else "fp32"]
    return {"max_abs": diff, "relative": relative, "argmax_agreement": agree, "tolerance": tolerance,
            "ok": relative <= tolerance}


def run(args) -> int:
    trained = open_trained(args.target, base=args.base, trust_remote_code=args.trust_remote_code)
    out = Path(args.out).expanduser() if args.out else default_out(trained, args.to, args.gguf_type)
    path = export(trained, args.to, out, args.gguf_type, args.dtype, args.mlx_bits, args.overwrite,
                  log=lambda m: print(m, file=sys.stderr))
    if args.verify:
        report = verify(trained, path, args.to, args.gguf_type)
        print(json.dumps({"export": str(path), "format": args.to, **report}))
        if not report["ok"]:
            print(f"hwft: error: the export's logits differ from the trained model's by {report['relative']:.2e} "
                  f"of the largest logit (tolerance {report['tolerance']:.0e})", file=sys.stderr)
            return 1
    else:
        print(path)
    return 0
