"""Typed records that backends hand to hwft through the plugin hooks.

A backend answers four questions (docs/architecture.md): am I here (:class:`Availability`, from
a cheap side-effect-free probe), what can I do (:class:`Capability`), how do I run this recipe
(``Backend.train``), and how sure is that (selection in :mod:`hwft.select`, by ``priority``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Priority bands for ``backend: auto`` (highest wins among available backends; ties by name).
PRIORITY_ACCELERATOR = 300  #: a GPU, NPU or other accelerator device
PRIORITY_APPLE_GPU = 200  #: MLX on Metal
PRIORITY_CPU = 100  #: the torch engine on the host CPU
PRIORITY_CPU_FALLBACK = 50  #: another engine on the host CPU (e.g. MLX's CPU build)


#: Backend names fixed for everyone, and the distribution that provides each. A vendor's
#: backend takes any other name.
FIXED_BACKENDS = {
    "cpu": "hwft-torch (backends/torch)",
    "cuda": "hwft-torch (backends/torch)",
    "rocm": "hwft-torch (backends/torch)",
    "npu": "hwft-ascend (backends/ascend, with torch-npu)",
    "mlx": "hwft-mlx (backends/mlx, with mlx and mlx-lm)",
}


@dataclass(frozen=True)
class Availability:
    """The answer of a backend's probe."""

    available: bool
    reason: str = ""  #: why not, when unavailable ("torch_npu not installed", "no CUDA device")
    devices: tuple[Mapping[str, Any], ...] = ()  #: one mapping per device: name, memory_gb, ...
    details: Mapping[str, Any] = field(default_factory=dict)  #: versions and the like
    priority: int | None = None  #: overrides Backend.priority (e.g. MLX on CPU vs Metal)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Capability:
    """What a backend can run. Names match the recipe's values so refusals can cite them."""

    #: objective -> tunings it runs; with ``tunings`` set, these are added to what the engine implements
    methods: Mapping[str, tuple[str, ...]]
    dtypes: tuple[str, ...]  #: fp32, bf16, fp16
    quantization: tuple[str, ...] = ()  #: e.g. bnb-nf4, bnb-int8, mlx-q4
    attention: tuple[str, ...] = ("eager",)  #: kernels.attention values
    #: train.optimizer values: fused_adamw where the device has a fused AdamW kernel. (The fused
    #: kernels a backend runs are the kernels registered for it: hwft.kernels.)
    optimizers: tuple[str, ...] = ("adamw", "sgd")
    compile: bool = False  #: kernels.compile
    collective: str | None = None  #: gloo, nccl, rccl, hccl, mlx-ring
    parallel: tuple[str, ...] = ("none",)  #: parallel.strategy values
    packing: bool = False  #: honours data.packing without cross-example attention
    #: media kinds (image, video, audio) the engine feeds a vision-language model (hwft.vision)
    media: tuple[str, ...] = ()
    #: the vision-language families (model_type) it feeds them to; None: every family of hwft.vision
    media_families: tuple[str, ...] | None = None
    #: the data kinds (hwft.data.kinds) whose rows it feeds them with; None: those of every method
    #: whose record does (Method.media)
    media_data_kinds: tuple[str, ...] | None = None
    #: it packs a vision-language model's text rows (where data.packing is unset: false runs
    #: them unpacked, as image rows always run)
    media_packing: bool = True
    #: why something is missing, by recipe value (e.g. {"qlora": "bitsandbytes is not installed"})
    notes: Mapping[str, str] = field(default_factory=dict)
    #: every method the backend's engine implements (hwft.methods), with these tunings; () runs
    #: only what ``methods`` names. Either way the host keeps only what the engine implements
    #: (PluginHost.capability). Since plugin API 1.1.
    tunings: tuple[str, ...] = ()

    def runs(self, objective: str, tuning: str) -> bool:
        """Whether it runs ``objective`` with ``tuning``; freeze (some layers of the whole model)
        runs wherever full does."""
        return ("full" if tuning == "freeze" else tuning) in self.methods.get(objective, ())

    def to_json(self) -> dict:
        d = asdict(self)
        d["methods"] = {k: list(v) for k, v in self.methods.items()}
        d["notes"] = dict(self.notes)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclass(frozen=True)
class Backend:
    """A device backend, registered through ``hwft_register_backends``.

    ``probe`` and ``capability`` must be cheap and import no engine at hwft import time; they
    are called lazily and cached by the registry. ``train`` runs a :class:`hwft.job.Job`.
    """

    name: str  #: cpu, cuda, rocm, npu, mlx, or a vendor's name
    engine: str  #: torch, mlx, ...
    description: str
    priority: int  #: see the PRIORITY_* bands
    probe: Callable[[], Availability]
    capability: Callable[[], Capability]
    train: Callable[[Any], Any]  #: (hwft.job.Job) -> the run's results
    accelerator: bool = False
    #: ``launch(hwft.distributed.Launch, argv) -> exit code``: start the processes of
    #: ``hwft train --nproc N`` with the engine's own launcher, each running ``hwft *argv``;
    #: None: the backend runs one process only. Since plugin API 0.3.
    launch: Callable[[Any, list[str]], int] | None = None
    #: ``inference(hwft.inference.Trained, precision) -> hwft.inference.Session``: load a trained
    #: model to generate and score with (hwft chat, serve, eval, export checks); None: the
    #: backend trains only. Since plugin API 0.4.
    inference: Callable[[Any, str], Any] | None = None
    #: the module of the engine's ``hwft bench`` tools (``model_dims``, ``peak_flops``,
    #: ``held_out_loss``, ``device_of``, ``dtype_named``; the torch engine's also the Trainer
    #: baseline): a "package.module" path, imported when a bench runs. None: another backend's
    #: on the same engine serves (a 1.0 plugin on the torch engine), else the bench times without
    #: FLOPs or held-out loss. Since plugin API 1.1.
    bench: str | None = None
