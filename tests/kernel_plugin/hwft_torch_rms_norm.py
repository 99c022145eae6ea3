"""An out-of-tree kernel, as a vendor writes one: torch's own fused ``rms_norm`` for each
RMSNorm module on the torch ``cpu`` backend, for the llama family, added through the hooks
alone (hwft.kernels, hwft.families). No file of hwft/ or backends/ names it.

    y = x / sqrt(mean(x^2) + eps) * w      (in fp32, cast back to x's dtype, as Llama's RMSNorm)
"""

from __future__ import annotations

import types

import pluggy

from hwft.families import Family
from hwft.kernels import Kernel

HWFT_PLUGIN_API = "2.0"
hookimpl = pluggy.HookimplMarker("hwft")


def _forward(self, hidden_states):
    import torch.nn.functional as F

    x = hidden_states.float()
    return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.variance_epsilon).to(hidden_states.dtype)


class TorchRmsNorm:
    def __init__(self, job):
        self.job = job
        self.patched = []

    def check(self, model) -> str | None:
        return None if self._norms(model) else "the model has no RMSNorm module"

    def apply(self, model) -> str:
        for module in self._norms(model):
            module.forward = types.MethodType(_forward, module)
            self.patched.append(module)
        return f"torch_rms_norm x{len(self.patched)}"

    def undo(self) -> None:
        for module in self.patched:
            del module.forward  # the class's forward again
        self.patched.clear()

    @staticmethod
    def _norms(model):
        return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]


@hookimpl
def hwft_register_kernels(register):
    register(
        Kernel(
            "torch_rms_norm",
            "rms_norm",
            "torch",
            "torch.nn.functional.rms_norm for each RMSNorm",
            f"{__name__}:TorchRmsNorm",
            backends=("cpu",),
            path="torch_rms_norm",
        )
    )


@hookimpl
def hwft_register_model_families(register):
    register(Family("llama", "torch", paths=frozenset({"torch_rms_norm"})))  # adds a path to the built-in row
