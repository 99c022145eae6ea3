"""LoRA+ (Hayou, Ghosh and Yu, 2024): the B matrix of each adapter learns at ``ratio`` times the
learning rate of everything else, which the paper finds trains faster than one rate for both
(``method.lora.loraplus_lr_ratio``; PEFT's ``create_loraplus_optimizer``, LLaMA-Factory's
``loraplus_lr_ratio``). One rule, by parameter path, for every engine: PEFT names the B matrix
``...q_proj.lora_B.default.weight`` and mlx-lm ``...q_proj.lora_b``. hwft adapts linear layers
only, so PEFT's separate rate for embedding adapters never applies.
"""

from __future__ import annotations

B_NAMES = frozenset(("lora_B", "lora_b"))


def is_b_matrix(path: str) -> bool:
    """Whether the parameter at ``path`` is an adapter's B matrix."""
    return not B_NAMES.isdisjoint(path.split("."))


def split(named: list[tuple[str, object]]) -> tuple[list, list]:
    """(the other parameters, the B matrices) of ``(path, parameter)`` pairs."""
    rest = [p for name, p in named if not is_b_matrix(name)]
    faster = [p for name, p in named if is_b_matrix(name)]
    return rest, faster
