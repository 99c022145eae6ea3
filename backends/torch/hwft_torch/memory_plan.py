"""The torch engine's measurements for ``hwft plan`` (:class:`hwft.plan.Shape`), without loading
a weight: the recipe's model is built from its config.json with fake tensors (torch's
FakeTensorMode: shapes and dtypes, no storage), its tuning applied as hwft applies it, and one
micro-batch's forward and backward run on them while every tensor that comes to life is counted
until it dies. The largest number of bytes alive at once, less the weights and gradients, is the
micro-batch's activation memory; the same with activation checkpointing on gives the other.

The forward is transformers' own with ``labels``, whose loss makes the whole (rows, tokens,
vocabulary) logits: hwft's chunked cross-entropy makes less, so the figure errs on the safe side.
qlora is measured as lora and its linear weights counted at 4 bits (NF4 or FP4: half a byte a
weight, one fp32 scale per 64; double quantisation: a byte per 64 and an fp32 per 16,384).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hwft.methods.lookup import method
from hwft.plan import Devices, Shape
from hwft.recipe import Recipe
from hwft_torch.unwrap import base_model


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive (``now``, at most ``peak``): a storage is
    counted once however many tensors view it (keyed by the storage itself, not its Python
    wrapper), and leaves the count when the last of them dies."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  #: storage -> [bytes, tensors alive on it]
        self.now = self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self.drop, key)

    def drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def rows_per_micro_batch(recipe: Recipe) -> int:
    """Rows one micro-batch runs through the model with gradients, as the method's record
    counts them (hwft.methods.Method.sequences: a preference pair is two, a grpo prompt its
    completions)."""
    return method(recipe.method.objective).rows_per_micro_batch(recipe)


def empty_model(recipe: Recipe, config, checkpointing: bool = False):
    """The recipe's model and tuning on the meta device (real buffers: rotary tables)."""
    from accelerate import init_empty_weights

    from hwft_torch.modeling import add_lora, freeze_layers, head_of

    head = head_of(recipe, Path("."), getattr(config, "model_type", None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames of gradient checkpointing
        with init_empty_weights(include_buffers=False):
            model = head.auto_class().from_config(config, dtype=torch.float32, **head.extra)
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.method.tuning in ("lora", "qlora"):
            spec = recipe.model_copy(deep=True)
            spec.model.adapter = None  # an adapter continued trains the same shapes
            spec.parallel.activation_checkpointing = checkpointing
            model = add_lora(model, spec)
        elif recipe.method.tuning == "freeze":
            freeze_layers(model, recipe.method.freeze)
    base = base_model(model)
    base.tie_weights()  # tied input and output embeddings: one tensor, as loading makes them
    return model


def fake_model(recipe: Recipe, config, fake_mode, checkpointing: bool, dtype: torch.dtype = torch.float32):
    """:func:`empty_model` with fake parameters in ``fake_mode`` (tied weights stay one tensor).
    qlora's frozen linear weights are in the compute dtype: bitsandbytes dequantises them in each
    matmul and its backward, where autocast would keep a cast copy of an fp32 weight."""
    model = empty_model(recipe, config, checkpointing)
    quantised = {
        id(m.weight)
        for n, m in model.named_modules()
        if recipe.method.tuning == "qlora" and isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    }
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    kind = dtype if id(p) in quantised else p.dtype
                    with fake_mode:
                        made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=kind), p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_mode.from_tensor(b)
    return model


def trained_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def compute_dtype(recipe: Recipe, backend: str) -> torch.dtype:
    """The autocast dtype the run computes in: train.precision, where auto is bf16 on an
    accelerator and on a CPU with bf16 units (hwft_torch.engine.compute_dtype), fp32 elsewhere."""
    from hwft_torch.modeling import DTYPES
    from hwft_torch.runtime import cpu_bf16_units

    if recipe.train.precision != "auto":
        return DTYPES[recipe.train.precision]
    return torch.float32 if backend == "cpu" and cpu_bf16_units() is None else torch.bfloat16


def activations_of_step(
    recipe: Recipe, config, rows: int, tokens: int, checkpointing: bool, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes alive at most in one forward and backward beyond the parameters, buffers and
    gradients (each dropped as soon as it is accumulated), counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    model = fake_model(recipe, config, fake_mode, checkpointing, dtype)
    for p in model.parameters():
        if p.requires_grad:  # gradients are the plan's own term (4 bytes each): not kept here
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    live = LiveBytes()
    for t in [*model.parameters(), *model.buffers()]:  # there before the step: counted, then taken off
        live.add(t)
    before = live.now
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with fake_mode, live, autocast:
        ids = torch.zeros(rows, tokens, dtype=torch.long)
        if method(recipe.method.objective).head == "score":
            loss = model(input_ids=ids, use_cache=False).logits.float().sum()
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        del loss
    return live.peak - before


def text_part(config):
    """The config of the decoder layers: a vision-language model's text config, else itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def with_layers(config, n: int):
    """A copy of ``config`` with its first ``n`` decoder layers (per-layer lists cut alike; a
    vision-language model's in its text config, the vision tower whole)."""
    layers = text_part(config).num_hidden_layers
    cut = copy.deepcopy(config)
    text = text_part(cut)
    for key, value in vars(text_part(config)).items():
        if isinstance(value, list) and len(value) == layers:
            setattr(text, key, value[:n])
    text.num_hidden_layers = n
    return cut


def activations(recipe: Recipe, config, rows: int, tokens: int, checkpointing: bool, dtype: torch.dtype) -> int:
    """One micro-batch's activation bytes in the whole model: measured with one decoder layer
    and with two, the second's addition counted once per further layer (each layer adds its own
    activations; the embeddings' and the head's are counted once)."""
    one, two = (activations_of_step(recipe, with_layers(config, n), rows, tokens, checkpointing, dtype) for n in (1, 2))
    return max(one + (text_part(config).num_hidden_layers - 1) * (two - one), 0)


def quantised_bytes(count: int, double_quant: bool) -> float:
    """Bytes of ``count`` 4-bit weights with their block scales (blocks of 64; double
    quantisation: 8-bit scales with an fp32 scale per 256 of them)."""
    scales = count / 64 * (1 + 4 / 256) if double_quant else count / 64 * 4
    return count / 2 + scales


def layer_bytes(layer, recipe: Recipe) -> int:
    """A decoder layer's weights as held: fp32, qlora's linear weights 4-bit."""
    if recipe.method.tuning != "qlora":
        return sum(p.numel() * 4 for p in layer.parameters())
    linear = {
        id(m.weight): m.weight.numel()
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    }
    rest = sum(p.numel() * 4 for p in layer.parameters() if id(p) not in linear)
    return rest + int(quantised_bytes(sum(linear.values()), recipe.method.qlora.double_quant))


def model_config(model):
    """The config of a resolved model (hwft.models.ResolvedModel): its folder's config.json, or
    an embedded GGUF's metadata where the model is not converted yet (no weight is read)."""
    from transformers import AutoConfig

    if model.kind == "random" and not model.ready:  # model.shape, its folder not made yet
        return AutoConfig.from_pretrained(str(model.source), local_files_only=True)
    if model.ready or model.kind != "embedded":
        return AutoConfig.from_pretrained(model.path, local_files_only=True)
    return AutoConfig.from_pretrained(model.source.parent, gguf_file=model.source.name, local_files_only=True)


def shape(recipe: Recipe, model, backend: str = "cpu") -> Shape:
    """The recipe's model (``model``: hwft.models.ResolvedModel) measured with fake tensors (see
    the module's doc), computing as it would on ``backend``."""
    from hwft_torch import frozen_weights
    from hwft_torch.modeling import attention_implementation

    config = model_config(model)
    config._attn_implementation = "eager" if attention_implementation(recipe, config.model_type) == "eager" else "sdpa"
    rows, tokens = rows_per_micro_batch(recipe), recipe.train.max_length
    dtype = compute_dtype(recipe, backend)
    model = empty_model(recipe, config)
    base = base_model(model)
    params = {id(p): p for n, p in base.named_parameters() if ".lora_" not in n and "modules_to_save" not in n}
    trainable = trained_count(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values() if not p.requires_grad) + sum(
        p.numel() * 4 for p in params.values() if p.requires_grad
    )
    if recipe.method.tuning == "qlora":
        head = base.get_output_embeddings()
        linear = [
            m
            for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in n and "modules_to_save" not in n
        ]
        count = sum(m.weight.numel() for m in linear)
        weight_bytes += int(quantised_bytes(count, recipe.method.qlora.double_quant)) - count * 4
    device_type = {"rocm": "cuda"}.get(backend, backend)
    if stored := frozen_weights.wanted(recipe, recipe.method.tuning, dtype, device_type):  # as the engine stores them
        weight_bytes -= sum(
            p.numel() * (4 - stored.itemsize)
            for layer in frozen_weights.frozen_linears(base)
            for p in layer.parameters(recurse=False)
        )
    layers = [m for m in base.modules() if type(m).__name__ in set(getattr(base, "_no_split_modules", None) or ())]
    unit = max((layer_bytes(layer, recipe) for layer in layers), default=0)
    m = method(recipe.method.objective)
    reference = recipe.method.tuning == "full" and m.reference is not None and bool(m.reference(recipe))
    return Shape(
        parameters=sum(p.numel() for p in params.values()),
        trainable=trainable,
        weight_bytes=weight_bytes,
        unit_bytes=unit,
        activation_bytes=activations(recipe, config, rows, tokens, False, dtype),
        checkpointed_activation_bytes=activations(recipe, config, rows, tokens, True, dtype),
        rows=rows,
        tokens=tokens,
        reference_copy=reference,
    )


def devices(backend: str) -> Devices | None:
    """This machine's devices of the backend: the GPUs torch sees, or the host's memory."""
    if backend in ("cuda", "rocm") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return Devices(
            count, torch.cuda.get_device_properties(0).total_memory, f"this machine's {torch.cuda.get_device_name(0)}"
        )
    if backend == "cpu":
        try:
            with open("/proc/meminfo") as f:
                total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        except (OSError, StopIteration, ValueError):
            return None
        return Devices(1, total, "this machine's memory")
    return None
