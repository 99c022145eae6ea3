"""The MLX backend's exporter (registered through ``hwft_register_exporters``): ``mlx``, an
mlx-lm model folder converted by ``mlx_lm.convert`` from the merged HF model that the ``hf``
exporter writes (reached through the registry; ``--mlx-bits 4`` or ``8`` quantises it, MLX
affine). ``--verify`` reloads it with ``mlx_lm.load``.

A vision-language model of the families the MLX engine trains (hwft_mlx.media) becomes an
mlx-vlm model folder instead: the merged HF model loaded as mlx-vlm's model (hwft_mlx.vision),
its weights saved under mlx-vlm's names with the config mlx-vlm reads, the tokenizer's and
processors' files beside them; ``mlx_vlm.load`` (and ``--verify``) reads it back."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from hwft.errors import ModelError
from hwft.section import Section
from hwft.use.exporters import Exporter, ExportOptions

ENGINE = "mlx"


class MlxOptions(Section):
    """``hwft export --to mlx``'s own settings (``--mlx-bits``)."""

    bits: Literal[4, 8] | None = Field(default=None, description="quantise the MLX export to 4 or 8 bits (MLX affine)")


def write_mlx(trained, staged: Path, options: ExportOptions) -> Path:
    from mlx_lm import convert

    from hwft import vision
    from hwft_mlx.loading import config_overrides

    family = vision.family_of(Path(trained.weights))
    if family is not None:
        return write_vision(trained, staged, options, family)

    merged = options.exporters.get("hf").make(trained, staged.parent / "merged", options)
    # mlx-lm reads rope_theta at the top of config.json; transformers 5 nests it.
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    refuse_unproven(config)
    config.update(config_overrides(config))
    (merged / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm reports progress on stdout
        bits = options.settings.bits
        try:
            convert(
                str(merged),
                str(staged),
                quantize=bits is not None,
                q_bits=bits,
                trust_remote_code=trained.trust_remote_code,
            )
        except (TypeError, ValueError, KeyError) as exc:  # a config or weights mlx-lm's module does not take
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"export mlx: mlx-lm cannot convert this {config.get('model_type')} model ({reason}); "
                "export --to hf or peft instead"
            ) from None
    return staged


#: What an mlx-vlm folder holds beside its weights and config: the tokenizer's and processors' files.
BESIDE = ("tokenizer", "chat_template", "preprocessor_config", "video_preprocessor_config", "processor_config")


def write_vision(trained, staged: Path, options: ExportOptions, family) -> Path:
    """An mlx-vlm model folder of a vision-language run (see the module's docstring)."""
    import shutil

    from mlx_vlm.utils import save_config, save_weights

    from hwft_mlx.media import MEDIA_FAMILIES
    from hwft_mlx.vision import load_model, mlx_vlm_config

    if family.model_type not in MEDIA_FAMILIES:
        raise ModelError(
            f"export mlx: {family.description} is a vision-language model hwft does not run on mlx-vlm (it runs "
            f"{', '.join(MEDIA_FAMILIES)}); export --to hf or peft instead"
        )
    if options.settings.bits is not None:
        raise ModelError(
            f"export mlx: --mlx-bits with a vision-language model ({family.description}) is not written yet; "
            "export without it (mlx_vlm.convert -q quantises the folder)"
        )
    merged = options.exporters.get("hf").make(trained, staged.parent / "merged", options)
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    model = load_model(merged, config)
    staged.mkdir(parents=True, exist_ok=True)
    save_weights(staged, model, donate_weights=True)
    save_config(mlx_vlm_config(config), staged / "config.json")
    for item in merged.iterdir():
        if item.is_file() and item.name.startswith(BESIDE):
            shutil.copy2(item, staged / item.name)
    return staged


def refuse_unproven(config: dict) -> None:
    """A family outside the MLX table exports only where mlx-lm computes what transformers does
    (hwft_mlx.agreement): else one line, before anything is written."""
    from hwft.plugins import get_host
    from hwft_mlx.agreement import disagreement
    from hwft_mlx.loading import mlx_architecture

    architecture = mlx_architecture(config)
    if get_host().families().lookup("mlx", architecture).known:
        return
    refusal = disagreement(config, architecture)
    if refusal is not None:
        raise ModelError(f"export mlx: {refusal}; export --to hf or peft instead")


def reload_mlx(path: Path, ids: list[int], trained):
    import mlx.core as mx
    import numpy as np

    from hwft_mlx.vision import wanted

    if wanted(json.loads((path / "config.json").read_text(encoding="utf-8"))):  # an mlx-vlm folder
        from mlx_vlm.utils import load_model

        from hwft_mlx.vision import logits

        rows = mx.array([ids])
        return np.array(logits(load_model(path), rows, mx.ones_like(rows))[0].astype(mx.float32))
    from mlx_lm import load

    model = load(str(path))[0]
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


EXPORTERS = (
    Exporter(
        "mlx",
        ENGINE,
        "an mlx-lm model folder, optionally quantised (--mlx-bits); for a vision-language model, mlx-vlm's",
        write_mlx,
        reload_mlx,
        tolerance=lambda options: 1e-3,
        options=MlxOptions,
    ),
)
