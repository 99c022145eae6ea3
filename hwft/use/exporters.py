"""Exporters: the formats ``hwft export --to`` writes, each registered through
``hwft_register_exporters`` by the backend whose engine's libraries write and reload it (hf,
peft and gguf by the torch backend, mlx by the MLX backend), exactly as a plugin would add one.

An exporter is keyed by (format, engine): ``hwft export`` takes the one on the trained result's
engine where there is one (so a device plugin on the torch engine exports with no change), else
any registered one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwft.errors import UserError, did_you_mean
from hwft.methods.record import resolve


@dataclass(frozen=True)
class ExportOptions:
    """The choices of one ``hwft export``."""

    gguf_type: str = "q8_0"  #: f16 or q8_0 (gguf)
    dtype: str = "auto"  #: auto, fp32, bf16, fp16 (merged weights)
    mlx_bits: int | None = None  #: quantise an MLX export to 4 or 8 bits
    exporters: Any = None  #: the :class:`Exporters` registry, for an exporter built on another


@dataclass(frozen=True)
class Exporter:
    """One export format on one engine."""

    format: str  #: the --to value
    engine: str  #: the engine whose libraries write and reload it
    description: str
    #: (hwft.inference.Trained, staged: Path, ExportOptions) -> Path: write the export at
    #: ``staged`` (a folder, or a file for single-file formats) and return it; a callable or a
    #: "module:function" path, imported on use
    write: str | Callable
    #: (path, token ids, Trained) -> numpy array (tokens, vocabulary): the export's logits,
    #: reloaded the way its users load it (``hwft export --verify``)
    reload_logits: str | Callable
    #: ExportOptions -> the largest logit difference, relative to the largest |logit|, that
    #: --verify accepts
    tolerance: Callable[[ExportOptions], float] = lambda options: 1e-4
    #: ExportOptions -> the default name under RUN/export/ (a file name for single-file formats)
    name: Callable[[ExportOptions], str] | None = None
    single_file: bool = False  #: the export is one file (gguf) rather than a folder
    needs_adapter: bool = False  #: only an adapter can be exported this way (peft)

    def default_name(self, options: ExportOptions) -> str:
        return self.name(options) if self.name else self.format

    def make(self, trained, staged: Path, options: ExportOptions) -> Path:
        return resolve(self.write)(trained, staged, options)

    def reload(self, path: Path, ids: list[int], trained):
        return resolve(self.reload_logits)(path, ids, trained)


@dataclass
class Exporters:
    """Every registered exporter, by format and engine."""

    by_format: dict[str, dict[str, Exporter]] = field(default_factory=dict)

    def formats(self) -> list[str]:
        return sorted(self.by_format)

    def get(self, format: str, engine: str | None = None) -> Exporter:
        """The exporter of ``format``: the one on ``engine`` where there is one, else the first
        by engine name; a UserError naming the formats there are."""
        engines = self.by_format.get(format)
        if not engines:
            have = ", ".join(self.formats()) or "none (install a backend)"
            raise UserError(f"export --to {format}: no exporter for it{did_you_mean(format, self.formats())} "
                            f"(formats: {have})")
        return engines.get(engine) or engines[sorted(engines)[0]]


def collect_exporters(pm) -> Exporters:
    found = Exporters()

    def register(exporter: Exporter) -> None:
        found.by_format.setdefault(exporter.format, {})[exporter.engine] = exporter

    pm.hook.hwft_register_exporters(register=register)
    return found
