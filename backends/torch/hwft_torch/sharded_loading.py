"""FSDP2 with the base model loaded straight into each rank's shards: no rank ever holds it whole.

Loading every weight on every rank and sharding afterwards (what ``from_pretrained`` then
``fully_shard`` does) needs the whole model in each rank's memory first: a 70B-class model in
4 bits is 35 GB, more than a 24 GB card. Here instead, as torch's FSDP2 meta-device recipe:

1. **A skeleton** (:func:`skeleton`): the model built from its config with every parameter on
   the meta device (accelerate's ``init_empty_weights``; buffers such as rotary frequencies are
   made for real, they are small), quantised for qlora by transformers' own bitsandbytes
   quantizer (its ``Linear4bit`` layers, each weight a meta tensor of the packed 4-bit shape),
   then the tuning: LoRA adapters made by peft exactly as on a loaded model. peft puts an adapter
   on its base layer's device, so while it builds them each base layer shows a real empty
   weight: the adapters are initialised for real, from the same random stream as a run that
   loads the whole model, and the run's numbers are the same.
2. **Sharding** (``hwft_torch.parallel.FullyShardedDataParallel``): ``fully_shard`` on the meta
   skeleton, which lays out each parameter's shard and allocates nothing.
3. **Filling** (:meth:`ShardedWeights.fill`): ``to_empty`` allocates this rank's shards; each
   one is read from the safetensors files as only its rows (``get_slice``: the file is mapped,
   and only the pages of those rows are touched), one tensor at a time, each file opened for one
   layer's worth and closed again. A 4-bit weight is read whole, quantised (bitsandbytes'
   ``quantize_4bit``, as ``from_pretrained`` does), and its rows of the packed bytes kept; each
   rank keeps the quantisation state of the whole weight on its module, where bitsandbytes
   finds it after FSDP's all-gather. What already held values (the adapters, buffers, ppo's
   value head) keeps them.

A rank's peak while loading is then its shards plus one weight read whole (a qlora linear) or
one tensor's rows: below its shards plus one decoder layer (``tests/test_sharded_loading.py``).

The skeleton is matched to the checkpoint by name before anything loads. Where a run needs the
weights before sharding, or the names do not match (a checkpoint that transformers converts
while loading, such as fused MoE experts, or a head the checkpoint lacks), :func:`why_not`
says so, and every rank loads the whole model as before.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hwft.errors import ModelError
from hwft.methods.lookup import method
from hwft.recipe import Recipe


def why_not(recipe: Recipe, tuning: str) -> str | None:
    """Why an fsdp2 run loads the whole model on every rank instead of only its shards (None: it
    loads shards): what needs the loaded weights before they are sharded."""
    spec = getattr(recipe.method, recipe.method.objective, None)
    if tuning in ("full", "freeze") and (method(recipe.method.objective).reference or (lambda _: False))(recipe):
        return f"method.tuning {tuning} with {recipe.method.objective} copies the loaded model as its frozen reference"
    if getattr(spec, "reference", None) == "precomputed":
        return f"method.{recipe.method.objective}.reference precomputed runs the loaded model before sharding"
    if recipe.model.adapter:
        return "model.adapter continues an adapter on the loaded model"
    if recipe.model.shape:
        return "model.shape builds random weights, with no checkpoint to read shards of"
    if tuning in ("lora", "qlora") and recipe.method.lora.dora:
        return "method.lora.dora starts each magnitude from its loaded weight's norm"
    return None


def checkpoint_names(folder: Path) -> dict[str, str]:
    """Each tensor's name in a safetensors checkpoint -> the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    from safetensors import safe_open

    names: dict[str, str] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file.name))
    return names


@dataclass
class Slot:
    """Where one parameter of the skeleton lives in the model and in the checkpoint."""

    module: torch.nn.Module
    name: str  #: the parameter's attribute on ``module``
    source: str  #: the checkpoint tensor that fills it
    file: str  #: the safetensors file that holds it
    quantised: bool  #: a bitsandbytes 4-bit weight (read whole, quantised, then its rows kept)


class ShardedWeights:
    """A skeleton's weights, still in the checkpoint: :meth:`fill` reads each rank's rows into its
    FSDP2 shards (see the module docstring)."""

    def __init__(self, folder: Path, slots: list[Slot], device: torch.device, rank: int, world_size: int):
        self.folder, self.slots, self.device, self.rank, self.world_size = folder, slots, device, rank, world_size
        self.held_bytes = 0  #: once filled: this rank's shards of every parameter, and its 4-bit weights' states

    def rows(self, length: int) -> tuple[int, int]:
        """This rank's rows of a tensor of ``length`` rows, as FSDP2 shards dim 0 (torch.chunk:
        ceil(length / world) rows each, the last ranks' shorter or empty)."""
        each = math.ceil(length / self.world_size)
        start = min(self.rank * each, length)
        return start, min(start + each, length)

    def fill(self, model: torch.nn.Module, device: torch.device) -> None:
        """Allocate the sharded model on ``device`` and read this rank's rows of every weight;
        what already held values keeps them."""
        from torch.distributed.tensor import DTensor

        def local(tensor):
            return tensor.to_local() if isinstance(tensor, DTensor) else tensor

        # to_empty gives every tensor fresh memory: keep what the checkpoint does not fill and
        # already holds values (adapters, buffers, a value head), this rank's part of it.
        def tensors():  # parameters and buffers, persistent or not
            yield from model.named_parameters(remove_duplicate=False)
            yield from model.named_buffers(remove_duplicate=False)

        filled = {id(getattr(slot.module, slot.name)) for slot in self.slots}
        kept = {name: local(t).detach().clone() for name, t in tensors() if id(t) not in filled and not t.is_meta}
        model.to_empty(device=device)
        with torch.no_grad():
            for name, tensor in tensors():
                if name in kept:
                    local(tensor).copy_(kept.pop(name))
            by_file: dict[str, list[Slot]] = {}
            for slot in self.slots:
                by_file.setdefault(slot.file, []).append(slot)
            for file, slots in by_file.items():
                self._read(self.folder / file, slots, device, local)
        unique = {id(p): local(p) for p in model.parameters()}
        self.held_bytes = sum(t.numel() * t.element_size() for t in unique.values()) + sum(
            quantisation_state_bytes(slot.module.quant_state) for slot in self.slots if slot.quantised
        )

    def _read(self, file: Path, slots: list[Slot], device, local) -> None:
        from safetensors import safe_open

        for slot in slots:
            # One tensor per opening: the file's pages this read touched are unmapped after it.
            with safe_open(str(file), framework="pt") as f:
                target = local(getattr(slot.module, slot.name))
                if slot.quantised:
                    packed = self._quantise(slot, f.get_tensor(slot.source), device)
                    first, end = self.rows(packed.shape[0])
                    target.copy_(packed[first:end])
                    continue
                stored = f.get_slice(slot.source)
                shape = stored.get_shape()
                if not shape:  # a scalar: every rank holds it
                    target.copy_(f.get_tensor(slot.source))
                    continue
                first, end = self.rows(shape[0])
                target.copy_(stored[first:end].to(device=device, dtype=target.dtype).reshape(target.shape))

    @staticmethod
    def _quantise(slot: Slot, weight: torch.Tensor, device) -> torch.Tensor:
        """A whole weight in 4 bits as from_pretrained quantises it (fp32 in, bitsandbytes'
        quantize_4bit); the module keeps the state, the caller this rank's rows of the bytes."""
        import bitsandbytes.functional as bnb_functional

        module: Any = slot.module  # a Linear4bit with the fields _quantise_skeleton gave it
        packed, state = bnb_functional.quantize_4bit(
            weight.to(device=device, dtype=torch.float32).contiguous(),
            blocksize=module.quant_blocksize,
            compress_statistics=module.quant_compress_statistics,
            quant_type=module.quant_type_name,
            quant_storage=module.quant_storage,
        )
        module.quant_state = state
        return packed


def quantisation_state_bytes(state) -> int:
    """The bytes of a bitsandbytes QuantState's tensors, its nested state's included."""
    if state is None:
        return 0
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    own = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return own + quantisation_state_bytes(getattr(state, "state2", None))


def skeleton(
    folder: Path,
    recipe: Recipe,
    head,
    tuning: str,
    compute_dtype: torch.dtype,
    load_kwargs: dict,
    device: torch.device,
    rank: int,
    world_size: int,
):
    """(the model with no weights loaded and its tuning applied, its :class:`ShardedWeights`), or
    (None, why) when the checkpoint's names do not match the model's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=recipe.model.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = head.auto_class().from_config(
            config, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code, **load_kwargs
        )
    model.tie_weights()  # as from_pretrained ties them once loaded (a tied output layer has no tensor of its own)
    if tuning == "qlora":
        _quantise_skeleton(model, recipe, compute_dtype)
    stored = checkpoint_names(folder)
    slots, missing = [], []
    holders: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((f"{module_name}.{name}".lstrip("."), module, name))
    for places in holders.values():
        found = [(full, module, name) for full, module, name in places if full in stored]
        if not found:
            missing.append(places[0][0])
            continue
        full, module, name = found[0]
        quantised = type(getattr(module, name)).__name__ == "Params4bit"
        slots.append(Slot(module, name, full, stored[full], quantised))
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return None, f"the checkpoint has no tensor named {listed} (transformers renames or makes them while loading)"
    return model, ShardedWeights(folder, slots, device, rank, world_size)


def _quantise_skeleton(model, recipe: Recipe, compute_dtype: torch.dtype) -> None:
    """transformers' bitsandbytes quantizer on the skeleton, as from_pretrained runs it: its
    linear layers become ``Linear4bit``; each weight then becomes a meta tensor of the packed
    4-bit shape (what FSDP2 shards), the layer remembering how to quantise it."""
    from bitsandbytes.nn.modules import Linear4bit
    from bitsandbytes.nn.modules import Params4bit as _Params4bit
    from transformers.quantizers.auto import AutoHfQuantizer

    from hwft_torch.modeling import quantization_config

    quantizer = AutoHfQuantizer.from_config(quantization_config(recipe, compute_dtype))
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    # Params4bit's __new__ takes the quantisation fields; type checkers read Parameter's __init__.
    params4bit: Any = _Params4bit
    for module in model.modules():
        if isinstance(module, Linear4bit):
            weight: Any = module.weight  # a Params4bit
            module.quant_blocksize = weight.blocksize
            module.quant_compress_statistics = weight.compress_statistics
            module.quant_type_name = weight.quant_type
            elements = module.in_features * module.out_features
            packed = torch.empty(((elements + 1) // 2, 1), dtype=weight.quant_storage, device="meta")
            module.weight = params4bit(
                packed,
                requires_grad=False,
                blocksize=weight.blocksize,
                compress_statistics=weight.compress_statistics,
                quant_type=weight.quant_type,
                quant_storage=weight.quant_storage,
                module=module,
                bnb_quantized=True,
            )


@contextmanager
def adapters_made_for_real(model):
    """While peft adds adapters: each meta weight of a linear layer shows as an empty real one,
    so that peft, which puts an adapter where its base layer's weight is, keeps the adapters it
    initialised (on the meta device their values would be lost)."""
    swapped = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, torch.nn.Parameter) and weight.is_meta:
            stand_in = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=weight.requires_grad)
            for key in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
                if hasattr(weight, key):
                    setattr(stand_in, key, getattr(weight, key))
            module._parameters["weight"] = stand_in
            swapped.append((module, weight, stand_in))
    try:
        yield
    finally:
        for module, weight, stand_in in swapped:
            weight.requires_grad_(stand_in.requires_grad)  # peft (or freeze tuning) froze the stand-in, not the weight
            module._parameters["weight"] = weight


def load_skeleton(path: Path, recipe: Recipe, device: torch.device, tuning: str, compute_dtype: torch.dtype, world):
    """(the model without its weights, its tuning applied; the weights to read into its FSDP2
    shards), or (None, why not) where the checkpoint does not match it by name
    (see the module's doc)."""
    from hwft_torch.modeling import built_as, head_of, tune

    if why := why_not(recipe, tuning):
        return None, why
    head = head_of(recipe, path)
    try:
        model, weights = skeleton(
            path, recipe, head, tuning, compute_dtype, built_as(path, recipe), device, world.rank, world.size
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a {head.what} from {path}: {exc}") from None
    if model is None:
        return None, weights
    with adapters_made_for_real(model):
        model = tune(model, recipe, tuning)
    return model, weights
