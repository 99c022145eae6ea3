"""train.frozen_weights: a lora run's frozen linear weights stored in the compute dtype.

Under bf16 (or fp16) autocast every ``nn.Linear`` casts its fp32 weight and bias to the compute
dtype in each forward, and its backward multiplies by that cast copy: for a frozen weight that
copy is all the training ever uses. Storing the frozen weights in the compute dtype once (the
same round-to-nearest cast) therefore gives the same products and gradients, while holding half
the bytes and skipping a cast per forward and per recomputation. Embeddings, norms, a head tied
to the embedding and every trained parameter (the adapter) stay fp32.

Casting needs the parameters to stay plain tensors of one process (none, ddp): DeepSpeed and
FSDP2 flatten or shard them as the dtype they find. Outside autocast (generation, evaluation)
the model's linears then need it too: :func:`stored_dtype` tells the callers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from hwft.recipe import Recipe


def wanted(recipe: Recipe, tuning: str, compute: torch.dtype, device_type: str) -> torch.dtype | None:
    """The dtype to store frozen linear weights in on a ``device_type`` device (cpu, cuda, npu),
    or None to keep fp32."""
    choice = recipe.train.frozen_weights
    if choice == "fp32" or compute == torch.float32 or tuning != "lora" or recipe.method.lora.dora:
        return None
    if recipe.parallel.strategy not in ("none", "ddp"):
        return None
    if choice == "auto" and device_type == "cpu":
        return None
    return compute


def frozen_linears(model) -> list[torch.nn.Linear]:
    """The plain ``nn.Linear`` layers none of whose parameters train, other than a head tied to
    an embedding (the lookup reads the same tensor in fp32)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and not any(p.requires_grad for p in m.parameters())
        and id(m.weight) not in embedded
        and m.weight.dtype == torch.float32
    ]


def store(model, dtype: torch.dtype) -> int:
    """Cast the frozen linear weights (and biases) to ``dtype`` in place; returns the bytes saved."""
    saved = 0
    for layer in frozen_linears(model):
        for parameter in layer.parameters(recurse=False):
            saved += parameter.numel() * (parameter.element_size() - torch.finfo(dtype).bits // 8)
            parameter.data = parameter.data.to(dtype)  # the same Parameter: what refers to it still does
    return saved


def count(model, dtype: torch.dtype) -> int:
    """How many frozen plain linears are stored in ``dtype``."""
    return sum(
        1
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype == dtype and not m.weight.requires_grad
    )


def stored_dtype(model) -> torch.dtype | None:
    """The dtype :func:`store` left the frozen linears in, None where they are fp32."""
    for m in model.modules():
        if (
            type(m) is torch.nn.Linear
            and m.weight.dtype in (torch.bfloat16, torch.float16)
            and not m.weight.requires_grad
        ):
            if any(p.dtype == torch.float32 for p in model.parameters()):
                return m.weight.dtype
            return None  # the whole model in that dtype (a baseline loaded so): no autocast needed
    return None


def autocast_for(model, device: torch.device):
    """Autocast in the frozen linears' dtype where :func:`store` cast them (their inputs stay fp32
    outside a training step's autocast), else a null context."""
    dtype = stored_dtype(model)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
