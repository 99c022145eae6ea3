"""Exporters: the formats ``hwft export --to`` writes, each registered through
``hwft_register_exporters`` by the backend whose engine's libraries write and reload it (hf,
peft and gguf by the torch backend, mlx by the MLX backend), exactly as a plugin would add one.

An exporter is keyed by (format, engine): ``hwft export`` takes the one on the trained result's
engine where there is one (so a device plugin on the torch engine exports with no change), else
any registered one. An exporter declares its own settings (``Exporter.options``, a
:class:`hwft.section.Section`) as a method declares its recipe section: each field is the flag
``--<format>-<field>`` of ``hwft export`` (gguf's ``type`` is ``--gguf-type``), which the CLI
builds from the registry; the core names no format's options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hwft.errors import UserError, did_you_mean
from hwft.methods.record import resolve


@dataclass(frozen=True)
class ExportOptions:
    """The choices of one ``hwft export``: those of every format, and the exporter's own."""

    dtype: str = "auto"  #: auto, fp32, bf16, fp16: the dtype of merged weights (hf, mlx)
    exporters: Any = None  #: the :class:`Exporters` registry, for an exporter built on another
    #: the exporter's own settings (an instance of its ``Exporter.options``), or None
    settings: Any = None


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
    #: its own settings: a :class:`hwft.section.Section` whose fields (typed, with defaults and
    #: descriptions) are the ``--<format>-<field>`` flags of ``hwft export``; None: none
    options: type | None = None

    def flags(self) -> dict[str, tuple[str, Any]]:
        """``--<format>-<field>`` -> (field, its pydantic FieldInfo), for the CLI."""
        if self.options is None:
            return {}
        return {
            f"--{self.format}-{name.replace('_', '-')}": (name, info)
            for name, info in self.options.model_fields.items()
        }

    def settings(self, given: dict[str, Any]) -> Any:
        """Its settings from the flags given (field -> value; None: not given), validated; a
        UserError names the flag."""
        if self.options is None:
            return None
        try:
            return self.options(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error.get("loc") else ""
            raise UserError(f"export --{self.format}-{field.replace('_', '-')}: {error['msg']}") from None

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

    def flags(self) -> dict[str, tuple[str, str, Any]]:
        """Every exporter's ``--<format>-<field>`` flag -> (format, field, FieldInfo)."""
        out: dict[str, tuple[str, str, Any]] = {}
        for fmt in self.formats():
            for exporter in self.by_format[fmt].values():
                for flag, (name, info) in exporter.flags().items():
                    out.setdefault(flag, (fmt, name, info))
        return out

    def get(self, format: str, engine: str | None = None) -> Exporter:
        """The exporter of ``format``: the one on ``engine`` where there is one, else the first
        by engine name; a UserError naming the formats there are."""
        engines = self.by_format.get(format)
        if not engines:
            have = ", ".join(self.formats()) or "none (install a backend)"
            raise UserError(
                f"export --to {format}: no exporter for it{did_you_mean(format, self.formats())} (formats: {have})"
            )
        return (engines.get(engine) if engine else None) or engines[sorted(engines)[0]]


def collect_exporters(pm) -> Exporters:
    found = Exporters()

    def register(exporter: Exporter) -> None:
        found.by_format.setdefault(exporter.format, {})[exporter.engine] = exporter

    pm.hook.hwft_register_exporters(register=register)
    return found
