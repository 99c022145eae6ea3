"""Data parallelism on the torch engine: ``parallel.strategy`` mapped onto the engines that
exist — torch DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO 1-3. hwft adds no runtime of its
own: it starts the process group, wraps the model, and drives the wrapper from the same loop.

The arithmetic every strategy shares: each rank trains its share of an optimizer step's
micro-batches (``hwft.distributed.World.share``), and each micro-batch's loss is already
normalised by a count over the whole global step (``hwft.objective``), so the step's gradient
is the *sum* of the ranks' gradients. DDP, FSDP2 and DeepSpeed average over ranks instead, so
each rank backpropagates ``world_size * loss``; the update is then exactly the single-process
one with ``world_size`` times the accumulation.

A strategy object gives the loop six verbs:

    forward(fn, micro, last)  fn(model, micro) -> Loss, run so the wrapper sees the forward;
                          gradients are synchronised in the backward of the step's last one
    backward(loss)        accumulate this micro-batch's gradient
    step()                clip, optimizer and schedule step, zero grads -> (lr, grad norm);
                          a NaN/Inf gradient norm skips the update (skips_nonfinite)
    full_state_dict()     every parameter, gathered on rank 0 (None where model.state_dict() is)
    whole_model()         the context generation runs in (ZeRO-3: the parameters gathered once)
    model                 what generation, evaluation and saving call
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from typing import Any

import torch

from hwft.distributed import Collective, World, torch_rendezvous_env
from hwft.errors import RecipeError
from hwft.objective import Loss
from hwft.recipe import Recipe
from hwft.textfile import read_text
from hwft_torch.unwrap import base_model

#: Capability.collective -> torch.distributed backend name (ROCm's RCCL answers to "nccl").
PROCESS_GROUP = {"gloo": "gloo", "nccl": "nccl", "rccl": "nccl", "hccl": "hccl", "xccl": "xccl", "ccl": "ccl"}


def sharded(recipe: Recipe) -> bool:
    """Whether parameters live in shards between forwards (fsdp2, ZeRO-3): a layer's weights
    exist whole only inside its forward, so nothing may read them directly (the fused
    cross-entropy head) and every rank must take part in each forward (generation in lockstep)."""
    p = recipe.parallel
    return p.strategy == "fsdp2" or (p.strategy == "deepspeed" and p.zero_stage == 3)


#: The rendezvous variables a run may set in its own environment, and their values before it
#: did (:func:`restore_environment` puts them back when the run leaves the group it made).
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_before: dict[str, str | None] = {}


def init_process_group(world: World, collective: str, timeout: int, device: torch.device) -> bool:
    """Join the run's process group (env:// rendezvous, as torchrun and hwft --nproc set it).
    False where the caller's own group already exists: the run uses it and leaves it standing."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    _before.clear()
    _before.update({key: os.environ.get(key) for key in RENDEZVOUS})
    os.environ.update(torch_rendezvous_env(world))
    if world.size == 1:  # one process running a strategy (e.g. ZeRO offload on one GPU)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    kwargs: dict[str, Any] = {"device_id": device} if device.type != "cpu" else {}
    dist.init_process_group(
        PROCESS_GROUP.get(collective, collective), timeout=datetime.timedelta(seconds=timeout), **kwargs
    )
    return True


def restore_environment() -> None:
    """The rendezvous variables as they were before :func:`init_process_group`: a one-process run
    sets RANK=0 and WORLD_SIZE=1, which a process started afterwards (a later ``hwft train
    --nproc 2`` from the same Python process) would inherit and read as its own world."""
    for key, value in _before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _before.clear()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchCollective(Collective):
    """hwft's two reductions over torch.distributed."""

    def sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, items: list) -> list[list]:
        import torch.distributed as dist

        out: list = [None] * self.world.size
        dist.all_gather_object(out, json.dumps(items))  # JSON values only, as strings
        return [json.loads(x) for x in out]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator()
    return torch.device(acc.type, torch.accelerator.current_device_index()) if acc else torch.device("cpu")


class Call(torch.nn.Module):
    """Lets a wrapper that hooks ``forward`` (DDP, DeepSpeed) see every objective's forward:
    ``Call(model)(fn, micro)`` runs ``fn(model, micro)`` and returns the loss tensor (the
    wrapper must see a tensor), keeping the whole :class:`Loss` in ``last``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.last: Loss | None = None

    def forward(self, fn, micro):
        last = fn(self.model, micro)
        self.last = last
        return last.value


class Single:
    """One process (parallel.strategy none): the plain loop."""

    name = "none"
    skips_nonfinite = True  #: step() leaves the weights alone when the gradient norm is NaN or Inf
    owns_group = True  #: close() ends the process group (not one a caller started and keeps)

    def __init__(self, model, optimizer, scheduler, world: World, max_norm: float, scaler=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.world, self.max_norm, self.scaler = world, max_norm, scaler
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, fn, micro, last: bool) -> Loss:
        """``fn(model, micro)``; ``last``: the step's last micro-batch on this rank, whose
        backward synchronises the gradients."""
        return fn(self.model, micro)

    def whole_model(self):
        """A context in which ``model`` generates (answers, grpo and ppo rollouts): here the
        model as it is; ZeRO-3 gathers it once (ZeroRedundancy.whole_model)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The wrappers average gradients over ranks; the step's gradient is their sum.
        loss = loss * self.world.size
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))

    def step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule -> (lr, gradient norm). A non-finite gradient norm
        (a NaN or Inf loss) skips the update; the schedule still advances, as the step counts."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip()
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(grad_norm) and self.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return lr, grad_norm
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm

    def full_state_dict(self) -> dict | None:
        return None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            if not self.owns_group:
                dist.barrier()
                return
            # Leave together: a rank that tears its group down while rank 0 is still saving can
            # take gloo's connection threads down mid-use (rank 1 then aborts with "terminate
            # called without an active exception").
            dist.barrier()
            dist.destroy_process_group()
            restore_environment()


class DataParallel(Single):
    """torch DistributedDataParallel: the model replicated, gradients all-reduced (averaged) in
    buckets during the backward of the step's last micro-batch (no sync before it)."""

    name = "ddp"

    def __init__(self, model, optimizer, scheduler, world, max_norm, scaler=None):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, optimizer, scheduler, world, max_norm, scaler)
        # device_ids None: the module sits on one device and hwft moves its inputs itself.
        self.ddp = DistributedDataParallel(Call(model), device_ids=None)

    def forward(self, fn, micro, last: bool) -> Loss:
        self.ddp.require_backward_grad_sync = last  # what DDP's no_sync() context toggles
        self.ddp(fn, micro)
        return self.ddp.module.last


def fsdp_units(model) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: the model's own ``_no_split_modules`` (its decoder
    layers, as transformers names them); the rest stays with the root."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise RecipeError(
            f"parallel.strategy fsdp2: {type(base).__name__} names no decoder layer class "
            "(_no_split_modules) to shard; use strategy ddp or deepspeed"
        )
    return units


class FullyShardedDataParallel(Single):
    """torch FSDP2: each decoder layer's parameters, gradients and optimizer state sharded over
    the ranks (``fully_shard``), all-gathered for its forward and backward and reduce-scattered
    after; ``offload_params`` keeps the shards in host memory (CPUOffloadPolicy). A skeleton
    (``weights``: hwft_torch.sharded_loading) is sharded first, then each rank reads its shards."""

    name = "fsdp2"

    def __init__(
        self, model, optimizer_factory, scheduler_factory, world, max_norm, recipe: Recipe, weights=None, extras=()
    ):
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

        # Pinned host memory exists only beside an accelerator; on the CPU the shards are host memory already.
        on_host = (weights.device if weights is not None else next(model.parameters()).device).type == "cpu"
        offload: dict[str, Any] = (
            {"offload_policy": CPUOffloadPolicy(pin_memory=not on_host)} if recipe.parallel.offload_params else {}
        )
        for unit in fsdp_units(model):
            fully_shard(unit, **offload)
        for extra in extras:
            # a method's extra module (ppo's value head) is called after the model's forward: its
            # own unit, gathered when called
            fully_shard(getattr(model, extra.name), **offload)
        fully_shard(model, **offload)
        if weights is not None:
            weights.fill(model, torch.device("cpu") if recipe.parallel.offload_params else weights.device)
        # generate() is a forward too: a PEFT model's generate calls the inner model's forward,
        # never the root's, so the root's own shards (embeddings, final norm, head) would stay
        # sharded without FSDP's hooks around it (aten.embedding on a DTensor).
        register_fsdp_forward_method(model, "generate")
        optimizer = optimizer_factory(model)
        super().__init__(model, optimizer, scheduler_factory(optimizer), world, max_norm)

    def forward(self, fn, micro, last: bool) -> Loss:
        self.model.set_requires_gradient_sync(last)
        return fn(self.model, micro)

    def clip(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor's, the gradients being sharded
        return float(full_tensor() if full_tensor is not None else norm)

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        adapter = hasattr(self.model, "peft_config")  # an adapter saves its own weights only
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter)
        return get_model_state_dict(self.model, options=options)


def deepspeed_config(recipe: Recipe, max_norm: float) -> dict:
    """The DeepSpeed config hwft writes, over an expert's ``parallel.deepspeed_config`` file
    (JSON). The keys hwft owns must agree with the recipe where the file sets them."""
    p, t = recipe.parallel, recipe.train
    config: dict = {}
    if p.deepspeed_config:
        path = recipe.resolve_path(p.deepspeed_config)
        try:
            config = json.loads(read_text(path, RecipeError))
        except (OSError, ValueError) as exc:
            raise RecipeError(f"parallel.deepspeed_config: cannot read {path} as JSON: {exc}") from None
        if not isinstance(config, dict):
            raise RecipeError(f"parallel.deepspeed_config: {path} holds a JSON {type(config).__name__}, not an object")
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
    }
    for key, value in owned.items():
        if key in config and config[key] not in ("auto", value):
            raise RecipeError(
                f"parallel.deepspeed_config sets {key}={config[key]!r} but the recipe means {value} "
                f"(train.{'micro_batch_size' if 'micro' in key else 'gradient_accumulation_steps'}); "
                'remove it from the file or write "auto"'
            )
        config[key] = value
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the ranks
    zero = config.setdefault("zero_optimization", {})
    zero.setdefault("stage", p.zero_stage)
    if p.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if p.offload_params:
        zero.setdefault("offload_param", {"device": "cpu"})
    config.setdefault("gradient_clipping", max_norm if max_norm != float("inf") else 0.0)
    config.setdefault("steps_per_print", 1 << 30)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # hwft's AdamW, also when offloading
    return config


class ZeroRedundancy(Single):
    """DeepSpeed ZeRO: optimizer state (stage 1), gradients (2) and parameters (3) partitioned
    over the ranks, optionally offloaded to host memory. Compute precision stays hwft's
    (fp32 weights under autocast), so the numbers match the other strategies."""

    name = "deepspeed"

    def close(self) -> None:
        """Leave the group as every strategy does; where the group goes with it, DeepSpeed also
        forgets the groups it cached from it, so that a later run in the same process (a second
        ``hwft train`` called from Python) starts afresh instead of on a destroyed group."""
        owned = self.owns_group
        super().close()
        if owned:
            from deepspeed.utils import groups

            for name, value in vars(groups).items():
                if name.startswith("_") and name.endswith(("GROUP", "GROUP_RANKS")) and isinstance(value, dict):
                    value.clear()
                elif name.startswith("_") and name.endswith("GROUP"):
                    setattr(groups, name, None)

    skips_nonfinite = False  # DeepSpeed has stepped inside backward() already

    def __init__(self, model, optimizer, scheduler, world, max_norm, recipe: Recipe):
        import deepspeed

        super().__init__(model, optimizer, scheduler, world, max_norm)
        if next(model.parameters()).device.type == "cpu":
            # DeepSpeed's CPU accelerator would JIT-compile its shared-memory all-reduce, an
            # inference kernel (tens of seconds with a C++ compiler, an error without one); training
            # reduces over gloo, so the kernel is marked unavailable.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        config = deepspeed_config(recipe, max_norm)
        # One process started without a launcher (hwft train, no --nproc): DeepSpeed reads the
        # rank from the environment a launcher would have set.
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=Call(model), optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.stage = config["zero_optimization"]["stage"]

    def forward(self, fn, micro, last: bool) -> Loss:
        self.engine(fn, micro)
        call: Call = self.engine.module  # pyright: ignore[reportAssignmentType] - the Call deepspeed.initialize was given
        assert call.last is not None
        return call.last

    def backward(self, loss):
        # hwft's loss shares already sum to the step's loss: no division by the accumulation.
        self.engine.backward(loss * self.world.size, scale_wrt_gas=False)
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step updates with, before the schedule moves
        self.engine.step()  # DeepSpeed updates (and steps the schedule) on the accumulation boundary only

    def step(self) -> tuple[float, float]:
        lr = self.lr
        norm = self.engine.get_global_grad_norm()
        return lr, float(norm if norm is not None else 0.0)

    @contextlib.contextmanager
    def whole_model(self):
        """ZeRO-3: every parameter gathered once, and DeepSpeed's per-module hooks removed while
        the model generates, then put back. With the hooks on, each decoder layer of each new
        token gathered and released its parameters (in Python); the gathered model generates
        as one process would, as TRL's trainers generate under ZeRO-3 (ds3_gather_for_generation).
        Each rank holds the whole model for that time: the price of the speed."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        offload = self.engine.optimizer.parameter_offload  # pyright: ignore[reportOptionalMemberAccess,reportAttributeAccessIssue] - ZeRO-3's optimizer
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            for param in offload.module.parameters():
                param.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                # registered again on the root, the hooks also invalidate the recorded order
                # of parameter fetches, so the next training forward records it anew
                offload._register_deepspeed_module(offload.module)

    def full_state_dict(self) -> dict | None:
        if self.stage < 3:
            return None
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


def make_strategy(
    recipe: Recipe,
    model,
    make_optimizer,
    make_scheduler,
    world: World,
    max_norm: float,
    scaler=None,
    weights=None,
    extras=(),
) -> Single:
    """The recipe's parallel.strategy around ``model`` (optimizer and schedule built on it);
    ``weights``: a skeleton's, read into its shards (fsdp2); ``extras``: the method's modules
    attached to the model (hwft.objective.Extra), each its own shard unit under fsdp2."""
    strategy = recipe.parallel.strategy
    if strategy == "fsdp2":
        return FullyShardedDataParallel(model, make_optimizer, make_scheduler, world, max_norm, recipe, weights, extras)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    if strategy == "deepspeed":
        return ZeroRedundancy(model, optimizer, scheduler, world, max_norm, recipe)
    if strategy == "ddp":
        return DataParallel(model, optimizer, scheduler, world, max_norm, scaler)
    return Single(model, optimizer, scheduler, world, max_norm, scaler)
