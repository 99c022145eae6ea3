"""Entry point of hwft-completion (group ``hwft``, name ``completion``): a data kind, the format
that makes it, and a method that trains on it with each engine's own next-token loss."""

from __future__ import annotations

import pluggy

from hwft.methods import Cell, Implementation, Method
from hwft_completion.kind import FORMAT, KIND

HWFT_PLUGIN_API = "2.0"
hookimpl = pluggy.HookimplMarker("hwft")

ROWS = tuple({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."} for a, b in ((1, 2), (2, 2), (3, 4), (5, 1)))

METHOD = Method(
    "csft",
    "supervised fine-tuning on prompt-completion rows (hwft-completion)",
    kind="completion",
    packs=True,
    held_out=True,
    cell=Cell(ROWS),
)


@hookimpl
def hwft_register_data_kinds(register):
    register(KIND)


@hookimpl
def hwft_register_data_formats(register):
    register(FORMAT)


@hookimpl
def hwft_register_methods(register):
    register(METHOD)


@hookimpl
def hwft_register_method_implementations(register):
    # each engine's own next-token loss on token rows: what sft and cpt train with
    register(Implementation("csft", "torch", "hwft_torch.language_modelling:build"))
    register(Implementation("csft", "mlx", "hwft_mlx.objective:build"))
