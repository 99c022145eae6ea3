"""The torch engine's part of a checkpoint (the format is :mod:`hwft.checkpoint`'s).

Weights: ``adapter/`` or ``model/`` exactly as the result is saved (sharded weights gathered
first). Optimizer: torch's *full* optimizer state keyed by parameter name
(``torch.distributed.checkpoint.state_dict``), so a checkpoint from one process, DDP or FSDP2
resumes under any of them; its tensors go to ``optimizer.safetensors``, the rest to
``optimizer.json``. DeepSpeed keeps its partitioned optimizer in its own checkpoint
(``deepspeed/``, pickled by DeepSpeed, guarded by hwft's manifest). Nothing here unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hwft.checkpoint import Checkpoint, EngineState, join_arrays, split_arrays
from hwft.errors import UserError
from hwft.extras import read_extras


def _options(strategy, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full = strategy.name == "fsdp2"  # sharded parameters: gather to full tensors, and back
    return StateDictOptions(full_state_dict=full, cpu_offload=full, **extra)


class TorchState(EngineState):
    name = "torch"

    def __init__(self, strategy, tokenizer, recipe, device: torch.device, save_result, extras: tuple = ()):
        self.strategy, self.tokenizer, self.recipe, self.device = strategy, tokenizer, recipe, device
        self.save_result = save_result
        self.extras = (
            extras  #: the method's modules beside the model (hwft.objective.Extra), saved as the result saves them
        )
        self.adapter = hasattr(strategy.model, "peft_config")
        self.deepspeed = strategy.name == "deepspeed"

    # ------------------------------------------------------------------ RNG

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state().tolist()}
        if self.device.type != "cpu":
            module = torch.get_device_module(self.device.type)
            state["device"] = module.get_rng_state(self.device).tolist()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "device" in state and self.device.type != "cpu":
            module = torch.get_device_module(self.device.type)
            module.set_rng_state(torch.tensor(state["device"], dtype=torch.uint8), self.device)

    # ------------------------------------------------------------------ saving

    def write_sharded(self, folder: Path) -> None:
        if self.deepspeed:
            self.strategy.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def gather(self):
        """(full weights or None, full optimizer state or None): collective under FSDP2."""
        weights = self.strategy.full_state_dict()
        if self.deepspeed:
            return weights, None
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.strategy.model, self.strategy.optimizer, options=_options(self.strategy))
        return weights, optim

    def write(self, folder: Path, gathered) -> dict:
        from safetensors.torch import save_file

        weights, optim = gathered
        out = folder / ("adapter" if self.adapter else "model")
        self.save_result(self.strategy.model, self.tokenizer, out, self.recipe, weights, self.extras)
        if optim is not None:
            skeleton, tensors = split_arrays(optim, torch.is_tensor, "optimizer")
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / "optimizer.safetensors")
            (folder / "optimizer.json").write_text(json.dumps(skeleton), encoding="utf-8")
        state = {"scheduler": self.strategy.scheduler.state_dict() if not self.deepspeed else None}
        if self.strategy.scaler is not None:
            state["scaler"] = self.strategy.scaler.state_dict()
        return state

    # ------------------------------------------------------------------ loading

    def load(self, checkpoint: Checkpoint) -> None:
        folder = checkpoint.path
        if self.deepspeed:
            # DeepSpeed's loader unpickles: hwft.checkpoint has verified every file's sha256
            # against the manifest hwft wrote before this point.
            path, _ = self.strategy.engine.load_checkpoint(
                str(folder / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise UserError(f"{folder}: DeepSpeed found no checkpoint in deepspeed/ to resume from")
            return
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(
            self.strategy.model, self._saved_weights(folder), options=_options(self.strategy, strict=False)
        )
        skeleton = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        optim = join_arrays(skeleton, load_file(folder / "optimizer.safetensors"))
        set_optimizer_state_dict(self.strategy.model, self.strategy.optimizer, optim, options=_options(self.strategy))
        self.strategy.scheduler.load_state_dict(checkpoint.state["scheduler"])
        if self.strategy.scaler is not None and "scaler" in checkpoint.state:
            self.strategy.scaler.load_state_dict(checkpoint.state["scaler"])

    def _saved_weights(self, folder: Path) -> dict[str, Any]:
        """The checkpoint's weights under the model's own names for its trained parameters.
        PEFT saves adapter weights without the adapter's name (``lora_A.weight`` for
        ``lora_A.default.weight``); a tied output embedding is one parameter, saved once."""
        from safetensors.torch import load_file

        sub = folder / ("adapter" if self.adapter else "model")
        saved: dict[str, torch.Tensor] = {}
        extra_files = {e.file for e in self.extras}
        for f in sorted(sub.glob("*.safetensors")):
            if f.name not in extra_files:
                saved.update(load_file(f))
        saved.update({k: torch.from_numpy(v) for k, v in read_extras(sub, self.extras).items()})
        model = self.strategy.model
        adapter_name = getattr(model, "active_adapter", "default") if self.adapter else None
        out, missing = {}, []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = name.replace(f".{adapter_name}.", ".") if adapter_name else name
            if key in saved:
                out[name] = saved[key]
            else:
                missing.append(name)
        if missing:
            raise UserError(
                f"{sub}: the checkpoint has no weight for {missing[0]} ({len(missing)} missing); it was written "
                "for another model or tuning"
            )
        return out
