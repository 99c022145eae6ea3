"""``parallel.accelerate_config``: an accelerate config file (what ``accelerate config`` writes)
read as the recipe's parallel settings, for users who already have one.

hwft drives the engines itself, so the file is translated, not handed to accelerate:

=====================================  =============================================
accelerate                             hwft
=====================================  =============================================
distributed_type NO                    parallel.strategy none
MULTI_GPU, MULTI_NPU, MULTI_CPU,       ddp
MULTI_XPU, MULTI_MLU, MULTI_HPU
FSDP                                   fsdp2 (hwft shards with FSDP2 ``fully_shard``)
DEEPSPEED                              deepspeed
deepspeed_config.zero_stage            parallel.zero_stage
deepspeed_config.offload_*_device cpu  parallel.offload_optimizer / offload_params
deepspeed_config.deepspeed_config_file parallel.deepspeed_config
fsdp_config.fsdp_offload_params        parallel.offload_params
fsdp_config.fsdp_activation_checkpoint parallel.activation_checkpointing
mixed_precision no / bf16 / fp16       train.precision fp32 / bf16 / fp16
num_processes, num_machines,           the defaults of --nproc, --nnodes, --node-rank,
machine_rank, main_process_ip/port     --master-addr, --master-port
=====================================  =============================================

A value the recipe (or a command-line override) already sets differently is refused, naming
both; keys about other environments (TPU, SageMaker, dynamo) are refused, not ignored.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hwft.distributed import Launch
from hwft.errors import RecipeError
from hwft.recipe import Precision, Recipe
from hwft.textfile import read_text

STRATEGIES = {
    "NO": "none",
    "FSDP": "fsdp2",
    "DEEPSPEED": "deepspeed",
    **{f"MULTI_{d}": "ddp" for d in ("GPU", "NPU", "CPU", "XPU", "MLU", "HPU", "SDAA", "MUSA")},
}
PRECISIONS: dict[str, Precision] = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
#: Keys about what accelerate launches or where, which hwft's own launch or nothing covers.
LAUNCH_ONLY = {
    "compute_environment",
    "debug",
    "downcast_bf16",
    "enable_cpu_affinity",
    "gpu_ids",
    "main_training_function",
    "rdzv_backend",
    "same_network",
    "use_cpu",
    "tpu_env",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "num_cpu_threads_per_process",
}
TRANSLATED = {
    "distributed_type",
    "deepspeed_config",
    "fsdp_config",
    "mixed_precision",
    "num_processes",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
}


def read(path: Path) -> dict:
    try:
        config = yaml.safe_load(read_text(path, RecipeError))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"parallel.accelerate_config: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise RecipeError(f"parallel.accelerate_config: {path} holds no mapping of accelerate settings")
    unknown = sorted(set(config) - LAUNCH_ONLY - TRANSLATED)
    unknown = [k for k in unknown if config[k] not in (None, False, {}, [], "", "no", "NO")]
    if unknown:
        raise RecipeError(
            f"parallel.accelerate_config: {path} sets {', '.join(unknown)}, which hwft does not "
            f"translate; it translates {', '.join(sorted(TRANSLATED))}"
        )
    return config


def apply(recipe: Recipe) -> tuple[Recipe, Launch | None]:
    """The recipe with the accelerate file's settings in place, and the launch it describes
    (None when the file names no processes). A recipe without the key comes back as it is."""
    name = recipe.parallel.accelerate_config
    if not name:
        return recipe, None
    path = recipe.resolve_path(name)
    config = read(path)
    out = recipe.model_copy(deep=True)
    p = out.parallel
    defaults = type(p)()

    def take(field: str, value, what: str) -> None:
        current = getattr(p, field)
        if current == value:
            return
        if current != getattr(defaults, field):
            raise RecipeError(
                f"parallel.accelerate_config: {path} says {what} (parallel.{field}: {value!r}) but "
                f"the recipe says parallel.{field}: {current!r}; remove one of them"
            )
        setattr(p, field, value)

    kind = str(config.get("distributed_type", "NO"))
    if kind not in STRATEGIES:
        raise RecipeError(
            f"parallel.accelerate_config: distributed_type {kind} is not one hwft runs "
            f"(it runs {', '.join(sorted(STRATEGIES))})"
        )
    take("strategy", STRATEGIES[kind], f"distributed_type {kind}")
    ds = config.get("deepspeed_config") or {}
    if kind == "DEEPSPEED":
        if "zero_stage" in ds:
            take("zero_stage", int(ds["zero_stage"]), f"zero_stage {ds['zero_stage']}")
        for key, field in (
            ("offload_optimizer_device", "offload_optimizer"),
            ("offload_param_device", "offload_params"),
        ):
            device = str(ds.get(key, "none"))
            if device not in ("none", "cpu"):
                raise RecipeError(f"parallel.accelerate_config: {key} {device}: hwft offloads to cpu only")
            if device == "cpu":
                take(field, True, f"{key} cpu")
        if ds.get("deepspeed_config_file"):
            file = (path.parent / ds["deepspeed_config_file"]).resolve()
            take("deepspeed_config", str(file), f"deepspeed_config_file {ds['deepspeed_config_file']}")
    fsdp = config.get("fsdp_config") or {}
    if kind == "FSDP":
        if fsdp.get("fsdp_offload_params"):
            take("offload_params", True, "fsdp_offload_params true")
        if fsdp.get("fsdp_activation_checkpointing"):
            take("activation_checkpointing", True, "fsdp_activation_checkpointing true")
    precision = config.get("mixed_precision")
    if precision:
        if str(precision) not in PRECISIONS:
            raise RecipeError(f"parallel.accelerate_config: mixed_precision {precision}: hwft has no, bf16, fp16")
        wanted = PRECISIONS[str(precision)]
        if out.train.precision not in ("auto", wanted):
            raise RecipeError(
                f"parallel.accelerate_config: {path} says mixed_precision {precision} but the recipe "
                f"says train.precision: {out.train.precision}; remove one of them"
            )
        out.train.precision = wanted
    launch = None
    if config.get("num_processes"):
        machines = int(config.get("num_machines") or 1)
        launch = Launch(
            nproc=max(int(config["num_processes"]) // machines, 1),
            nnodes=machines,
            node_rank=int(config.get("machine_rank") or 0),
            master_addr=config.get("main_process_ip"),
            master_port=int(config.get("main_process_port") or 29500),
        )
    return out, launch
