"""``hwft plan RECIPE [--devices 8x80GB]``: the memory each device needs under each parallel
strategy, before any weight loads, and which strategies fit.

The engine measures the recipe's model without its weights (:class:`Shape`: the torch engine
builds it with fake tensors from config.json and runs one micro-batch's forward and backward on
them, hwft_torch.memory_plan); the arithmetic here shares the parts out over N devices:

    W  the base's weights as the engine holds them (fp32; qlora: the linear layers 4-bit)
    G  the trained parameters' gradients, 4 bytes each (fp32)
    O  the optimizer state: AdamW's two moments, 8 bytes per trained parameter (SGD: none)
    A  one micro-batch's activations, forward and backward, beyond W and G
    U  the largest decoder layer's weights: what a sharded strategy gathers whole at a time

    none, ddp              W + G + O + A            (every rank a whole replica)
    deepspeed zero 1       W + G + O/N + A
    deepspeed zero 2       W + (G + O)/N + A        (+ offload_optimizer: O in host memory)
    fsdp2, zero 3          (W + G + O)/N + 2U + A   (one layer gathered, the next prefetched)
    + offload_params       2U + A on the device; (W + G + O)/N in host memory

A full-tuning method with a reference (dpo, kto, grpo, ppo) holds a frozen copy of W beside the
policy (sharded where the policy is). A device fits a strategy when the total is at most
:data:`USABLE` of its memory (the rest for the runtime, kernels' workspace and fragmentation).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from hwft.errors import UserError

GiB = 1 << 30
#: The share of a device's memory a plan may fill.
USABLE = 0.9
#: Optimizer state bytes per trained parameter (fp32 moments).
OPTIMIZER_BYTES = {"adamw": 8, "fused_adamw": 8, "sgd": 0}


@dataclass(frozen=True)
class Shape:
    """What the engine measured of the recipe's model and micro-batch, without its weights."""

    parameters: int  #: the base model's parameters
    trainable: int  #: the parameters the optimizer steps (adapter or whole model)
    weight_bytes: int  #: the base's weights as the engine holds them
    unit_bytes: int  #: the largest decoder layer's weights
    activation_bytes: int  #: one micro-batch's forward and backward beyond weights and gradients
    checkpointed_activation_bytes: int  #: the same with activation checkpointing
    rows: int  #: rows of one micro-batch's forward (pairs count twice, completions each)
    tokens: int  #: tokens per row (train.max_length)
    reference_copy: bool  #: a frozen copy of the weights is held (full tuning with a reference)


@dataclass(frozen=True)
class Devices:
    count: int
    bytes: int
    what: str  #: where the figure came from

    @classmethod
    def parse(cls, text: str) -> Devices:
        """``8x80GB``, ``2x24GiB``, ``80GB`` (one device). GB is read as GiB, as devices are sold."""
        match = re.fullmatch(r"\s*(?:(\d+)\s*[x*]\s*)?(\d+(?:\.\d+)?)\s*(GB|GiB|G|TB|TiB)?\s*", text, re.IGNORECASE)
        if not match or int(match.group(1) or 1) < 1:
            raise UserError(f"--devices {text!r}: give COUNTxSIZE, e.g. 8x80GB or 2x24GB (one device: 80GB)")
        unit = (match.group(3) or "GB").upper()
        size = float(match.group(2)) * GiB * (1024 if unit.startswith("T") else 1)
        return cls(int(match.group(1) or 1), int(size), f"--devices {text.strip()}")


@dataclass(frozen=True)
class Row:
    """One strategy's figures per device, in bytes."""

    strategy: str
    overrides: str  #: how a recipe asks for it
    weights: int
    gradients: int
    optimizer: int
    activations: int
    checkpointed_activations: int
    host: int  #: what it keeps in host memory per device instead (offload)
    needs: int  #: processes it needs at least
    settings: tuple = ()  #: the recipe's parallel settings for it, (key, value) pairs

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def checkpointed_total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.checkpointed_activations


def rows(shape: Shape, optimizer: str, n: int) -> list[Row]:
    """Every strategy's per-device figures for ``n`` devices (the arithmetic of the module's doc)."""
    copies = 2 if shape.reference_copy else 1
    w, g = shape.weight_bytes * copies, 4 * shape.trainable
    o = OPTIMIZER_BYTES.get(optimizer, 8) * shape.trainable
    u = 2 * shape.unit_bytes * copies
    a, ac = shape.activation_bytes, shape.checkpointed_activation_bytes

    def row(name: str, settings: dict, weights: float, grads: float, opt: float, host: float = 0, needs: int = 1):
        """``settings``: the row's parallel settings; its overrides text is made from them."""
        overrides = ", ".join(
            f"{'parallel.' if i == 0 else ''}{k}: {str(v).lower() if isinstance(v, bool) else v}"
            for i, (k, v) in enumerate(settings.items())
        )
        return Row(
            name, overrides, int(weights), int(grads), int(opt), a, ac, int(host), needs, tuple(settings.items())
        )

    shard = max(n, 1)
    ds = {"strategy": "deepspeed"}
    return [
        row("none", {"strategy": "none"}, w, g, o),
        row("ddp", {"strategy": "ddp"}, w, g, o, needs=2),
        row("deepspeed zero 1", {**ds, "zero_stage": 1}, w, g, o / shard, needs=2),
        row("deepspeed zero 2", {**ds, "zero_stage": 2}, w, g / shard, o / shard, needs=2),
        row(
            "deepspeed zero 2 + offload_optimizer",
            {**ds, "zero_stage": 2, "offload_optimizer": True},
            w,
            g / shard,
            0,
            host=o / shard,
        ),
        row("fsdp2", {"strategy": "fsdp2"}, w / shard + u, g / shard, o / shard, needs=2),
        row("fsdp2 + offload_params", {"strategy": "fsdp2", "offload_params": True}, u, 0, 0, host=(w + g + o) / shard),
        row("deepspeed zero 3", {**ds, "zero_stage": 3}, w / shard + u, g / shard, o / shard, needs=2),
        row(
            "deepspeed zero 3 + offload",
            {**ds, "zero_stage": 3, "offload_params": True, "offload_optimizer": True},
            u,
            0,
            0,
            host=(w + g + o) / shard,
        ),
    ]


def fits(row: Row, devices: Devices, checkpointed: bool = False) -> bool:
    total = row.checkpointed_total if checkpointed else row.total
    return total <= USABLE * devices.bytes and devices.count >= row.needs


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def report(
    model: str, shape: Shape, devices: Devices, optimizer: str, tuning: str, refused=lambda settings: None
) -> tuple[str, dict]:
    """The printed plan and its JSON form (hwft.plan/1); ``refused(settings)``: why hwft train
    would refuse the recipe with a row's parallel settings, or None."""
    table = rows(shape, optimizer, devices.count)
    why = {r.strategy: refused(dict(r.settings)) for r in table}
    lines = [
        f"hwft plan: {model}: {shape.parameters / 1e6:.1f}M parameters, {shape.trainable / 1e6:.2f}M trained "
        f"({tuning}); a micro-batch of {shape.rows} x {shape.tokens} tokens"
        + ("; a frozen reference copy of the weights" if shape.reference_copy else ""),
        f"devices: {devices.count} x {devices.bytes / GiB:.1f} GiB ({devices.what}); a plan fits in "
        f"{USABLE:.0%} of a device",
        "",
        f"{'GiB per device':40} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7}"
        f"  {'checkpointed':>12}  {'host':>6}  fits",
    ]
    for r in table:
        mark = "yes" if fits(r, devices) else "with checkpointing" if fits(r, devices, True) else "no"
        if r.needs > devices.count:
            mark = f"needs {r.needs}+ devices"
        if why[r.strategy]:
            mark = "refused"
        lines.append(
            f"{r.strategy:40} {gib(r.weights):>8} {gib(r.gradients):>7} {gib(r.optimizer):>7} "
            f"{gib(r.activations):>7} {gib(r.total):>7}  {gib(r.checkpointed_total):>12}  "
            f"{gib(r.host) if r.host else '-':>6}  {mark}"
        )
    fitting = [r.strategy for r in table if fits(r, devices) and not why[r.strategy]]
    with_ckpt = [r.strategy for r in table if not fits(r, devices) and fits(r, devices, True) and not why[r.strategy]]
    lines.append("")
    for reason in dict.fromkeys(r for r in why.values() if r):
        lines.append(f"refused ({', '.join(n for n, r in why.items() if r == reason)}): {reason}")
    lines.append(
        "fits: "
        + (", ".join(fitting) if fitting else "none as written")
        + (f"; with parallel.activation_checkpointing: true also {', '.join(with_ckpt)}" if with_ckpt else "")
    )
    if not fitting and not with_ckpt:
        lines.append(
            "nothing fits: lower train.micro_batch_size or train.max_length, or use more devices"
            + ("" if tuning == "qlora" else ", or method.tuning qlora")
        )
    data = {
        "schema": "hwft.plan/1",
        "model": model,
        "tuning": tuning,
        "shape": asdict(shape),
        "devices": asdict(devices),
        "usable": USABLE,
        "strategies": [
            {
                **asdict(r),
                "total": r.total,
                "checkpointed_total": r.checkpointed_total,
                "fits": fits(r, devices) and not why[r.strategy],
                "fits_checkpointed": fits(r, devices, True) and not why[r.strategy],
                "refused": why[r.strategy],
            }
            for r in table
        ],
    }
    return "\n".join(lines), data
