"""kernels.compile: torch.compile on each decoder layer's training forward.

Regional compilation: each decoder layer's ``forward`` is compiled, not the whole model. The
layers share one piece of code, so Dynamo compiles it with dynamic shapes once for every layer,
and lengths never recompile. Where the embeddings are frozen (lora, qlora), the first layer's
input needs no gradient, and compiling it would cost a second compile as long as the first (its
guards differ) for one layer's fusion; it runs eagerly instead, so a run compiles once. Inductor
fuses what runs between the matmuls: RMSNorm, rotary embedding, SwiGLU, LoRA's scaling and the
residual adds, forward and backward. The matmuls stay with the vendor library (oneDNN/MKL on the
CPU, cuBLAS).

Only the training forward is compiled (gradients on). Generation, evaluation and the frozen
reference of DPO and GRPO run with gradients off and take the eager forward, so they never
trigger a compile for every new length of a KV cache. Parameters, state dicts and saved results
are the model's own: nothing is wrapped.

On the bench workload (configs/bench.yaml) compiled steps are faster and take less memory, but
compiling costs tens of seconds the first time and less once Inductor's cache
(``/tmp/torchinductor_$USER``) holds the kernels (docs/benchmarks.md, "The measurements behind the code"). That cost
is why ``compile: null`` turns it on only for long runs (hwft.select.compile_decision).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from hwft_torch.unwrap import base_model

# torch is imported where it is used: the capability record (hwft_torch.devices) asks about the
# compilers without importing an engine.


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor's CPU code generation would call, or None."""
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "g++", "clang++") if name)
    return next((path for path in found if path), None)


def triton_installed() -> bool:
    """Inductor's GPU code generation (CUDA and ROCm) needs Triton, which torch's GPU wheels bring."""
    return importlib.util.find_spec("triton") is not None


def decoder_layers(model) -> list:
    """The repeated decoder layers (torch modules) of a (peft-wrapped) causal LM, or [] when not found."""
    import torch

    base = base_model(model)
    try:
        decoder = base.get_decoder()
    except (AttributeError, ValueError):
        return []
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def compile_layers(model) -> tuple[int, int]:
    """Compile each decoder layer's forward for training (all but the first where the embeddings
    are frozen); returns (layers compiled, layers).

    The layer's ``forward`` attribute becomes a function that runs the compiled forward while
    gradients are on and the eager one otherwise.
    """
    import torch

    layers = decoder_layers(model)
    base = base_model(model)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    frozen = embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())
    compiled_layers = layers[1:] if frozen and len(layers) > 1 else layers
    for layer in compiled_layers:
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            return (_compiled if torch.is_grad_enabled() else _eager)(*args, **kwargs)

        layer.forward = forward
    return len(compiled_layers), len(layers)
