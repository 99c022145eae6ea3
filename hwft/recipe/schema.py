"""The recipe's schema: every section as a typed pydantic model with help text (what to
train, never where). Unknown keys are errors with a "did you mean"; values that are valid but
cannot run are refused by backend selection (:mod:`hwft.select`), which names what is missing.
A method's own section (``method.<name>``) is its record's (hwft.methods)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from hwft.methods import DEFAULT
from hwft.section import Section

Tuning = Literal["full", "freeze", "lora", "qlora"]
#: The tunings that train a LoRA adapter (saved as adapter/); full and freeze save model/.
ADAPTER_TUNINGS = ("lora", "qlora")
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ModelSpec(Section):
    name: str = Field(
        default="smollm2-135m",
        description="Built-in alias (smollm2-135m), a local HF model directory, or a hub id "
        "already in the local Hugging Face cache. hwft never downloads weights.",
    )
    revision: str | None = Field(default=None, description="Cache revision (commit or branch) for a hub id.")
    trust_remote_code: bool = Field(
        default=False, description="Run Python code shipped with the model. Off unless you trust it."
    )
    adapter: str | None = Field(
        default=None,
        description="A PEFT LoRA adapter folder to continue training from (tuning lora or qlora); "
        "its rank and targets replace method.lora's.",
    )
    shape: str | None = Field(
        default=None,
        description="A Hugging Face config.json (relative to the recipe): train a model of this shape with "
        "random weights, made on the device, instead of model.name's weights; model.name gives the "
        "tokenizer only. For benchmarks at real sizes without the checkpoint (configs/bench/); the run "
        "saves no model anyone can use.",
    )

    @model_validator(mode="after")
    def _shape_alone(self) -> ModelSpec:
        if self.shape and self.adapter:
            raise ValueError(
                "model.shape builds random weights; an adapter trained on real ones "
                "(model.adapter) does not apply to them: remove one"
            )
        return self


class RandomTokens(Section):
    rows: int = Field(gt=0, description="How many rows.")
    length: int = Field(gt=1, description="Tokens in each row.")


class DatasetSpec(Section):
    path: str | None = Field(
        default=None, description="A .json, .jsonl or .parquet file, or a folder of them, relative to the recipe."
    )
    name: str | None = Field(default=None, description="An entry of data.registry (LLaMA-Factory dataset_info.json).")
    random_tokens: RandomTokens | None = Field(
        default=None,
        description="No file: rows of token ids drawn uniformly from the tokenizer's ordinary "
        "(not special) tokens, seeded by train.seed; every token a label (cpt). For benchmarks.",
    )
    format: str = Field(
        default="auto",
        description="Row shape: auto, alpaca, sharegpt, messages, text, preference or prompt "
        "(plugins may add more). auto looks at the first row.",
    )
    weight: float | None = Field(
        default=None, gt=0, description="Mixing weight: with 7 and 3, 70% of training rows come from this dataset."
    )
    max_samples: int | None = Field(default=None, gt=0, description="Use at most the first N rows.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename fields: {expected_name: name_in_file}.")
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="Rename role keys and values, as LLaMA-Factory's tags: role_tag, content_tag, "
        "user_tag, assistant_tag, system_tag, observation_tag, function_tag.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(x is not None for x in (self.path, self.name, self.random_tokens)) != 1:
            raise ValueError(
                "give one of path (a file or folder), name (a registry entry) or random_tokens ({rows, length})"
            )
        return self


#: Suffixes that make a bare string in data.train a path rather than a registry name.
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


class DataSpec(Section):
    train: list[DatasetSpec] = Field(description="Training datasets.")
    eval: list[DatasetSpec] = Field(default_factory=list, description="Held-out datasets.")
    val_size: int | float | None = Field(
        default=None,
        gt=0,
        description="Hold out part of the training examples for evaluation: a fraction "
        "below 1 or a count, drawn with train.seed before any mixing; they join data.eval (sft, cpt).",
    )
    registry: str | None = Field(
        default=None, description="A LLaMA-Factory dataset_info.json whose entries `train` may name."
    )
    packing: bool | None = Field(
        default=None,
        description="Pack several examples into each row, attention kept within each example. "
        "Default: on for sft and cpt, off for dpo and grpo.",
    )
    group_by_length: bool = Field(
        default=True, description="Without packing, batch rows of similar length together (less padding)."
    )
    streaming: bool = Field(default=False, description="Read files lazily (larger than memory); needs train.max_steps.")
    shuffle_buffer: int = Field(
        default=10000, gt=0, description="Streaming: rows shuffled, packed and grouped together at a time."
    )
    reasoning: Literal["keep", "strip"] = Field(
        default="keep", description="Keep or strip <think> blocks in assistant turns."
    )
    mask_history: bool = Field(
        default=False, description="Train on the last assistant turn only; earlier ones are context."
    )
    train_on_prompt: bool = Field(
        default=False, description="Compute the loss on every token of a conversation, prompts included."
    )
    image_max_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Images with more pixels are scaled down to about this many (LLaMA-Factory's "
        "image_max_pixels); default: the model's image processor's own.",
    )
    image_min_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Images with fewer pixels are scaled up to about this many (LLaMA-Factory's image_min_pixels).",
    )
    video_max_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Video frames with more pixels are scaled down to about this many before the model's own "
        "processing (LLaMA-Factory's video_max_pixels); default 65536 (256 x 256).",
    )
    video_min_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Video frames with fewer pixels are scaled up to about this many (LLaMA-Factory's "
        "video_min_pixels); default 256 (16 x 16).",
    )
    video_fps: float | None = Field(
        default=None,
        gt=0,
        description="Frames sampled per second of each video (LLaMA-Factory's video_fps); default 2.",
    )
    video_maxlen: int | None = Field(
        default=None,
        gt=0,
        description="At most this many frames of one video (LLaMA-Factory's video_maxlen); default 128.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `data: file.jsonl` and `data: [a.json, b.jsonl]` are shorthands for `data: {train: ...}`;
        # with a registry, a bare name such as `identity` names one of its entries.
        if isinstance(value, str | list):
            value = {"train": value}
        if isinstance(value, dict):
            registry = value.get("registry")

            def entry(item: Any) -> Any:
                if not isinstance(item, str):
                    return item
                is_name = registry and "/" not in item and not item.endswith(_DATA_SUFFIXES)
                return {"name": item} if is_name else {"path": item}

            for split in ("train", "eval"):
                items = value.get(split)
                if isinstance(items, str):
                    items = [items]
                if isinstance(items, list):
                    value = {**value, split: [entry(t) for t in items]}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataSpec:
        if not self.train:
            raise ValueError("data.train names no dataset")
        if not self.registry and any(d.name for d in self.train + self.eval):
            raise ValueError("a dataset gives a registry name but data.registry is not set")
        weighted = [d.weight is not None for d in self.train]
        if any(weighted) and not all(weighted):
            raise ValueError("give every training dataset a weight, or none (none: all rows, concatenated)")
        return self


class LoraSpec(Section):
    r: int = Field(default=16, gt=0, description="Rank of the low-rank update.")
    alpha: float = Field(default=32, gt=0, description="Scale numerator: the update is (alpha / r) * B A.")
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input (default 0, as in PEFT, LLaMA-Factory and "
        "mlx-lm); each adapter draws its own mask, which costs about a quarter of a CPU step.",
    )
    target_modules: str | list[str] = Field(
        default="all-linear", description="'all-linear' or a list of module names (q_proj, v_proj, ...)."
    )
    dora: bool = Field(default=False, description="DoRA: learn each weight's magnitude apart from its direction.")
    rslora: bool = Field(default=False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r.")
    loraplus_lr_ratio: float | None = Field(
        default=None,
        gt=0,
        description="LoRA+: each adapter's B matrix learns at this multiple of train.lr (A and "
        "everything else at train.lr); the paper suggests 16. LLaMA-Factory's loraplus_lr_ratio.",
    )


class QLoraSpec(Section):
    bits: Literal[4, 8] = Field(default=4, description="Bits of the quantised base weights.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantise the quantisation constants too.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="Dtype the de-quantised matmuls run in; auto: the run's compute dtype."
    )
    allow_fallback: bool = Field(
        default=False,
        description="Where the device cannot quantise (no bitsandbytes), train plain LoRA on the "
        "unquantised base instead; the fallback is logged.",
    )


class FreezeSpec(Section):
    trainable_layers: int = Field(
        default=2,
        description="freeze tuning: the last N decoder layers train (N < 0: the first |N|); "
        "LLaMA-Factory's freeze_trainable_layers.",
    )
    trainable_modules: Literal["all"] | list[str] = Field(
        default="all",
        description="Within those layers, all or the module names that train (mlp, self_attn, q_proj, "
        "...); LLaMA-Factory's freeze_trainable_modules.",
    )
    extra_modules: list[str] = Field(
        default_factory=list,
        description="Modules outside the decoder layers that train too (embed_tokens, "
        "lm_head, norm); LLaMA-Factory's freeze_extra_modules.",
    )

    @field_validator("trainable_layers")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 layers would train nothing; give N > 0 (the last N) or N < 0 (the first |N|)")
        return value


class VisionSpec(Section):
    """Which parts of a vision-language model train (LLaMA-Factory's freeze_vision_tower,
    freeze_multi_modal_projector and freeze_language_model, with their defaults). Under lora
    and qlora, all-linear adapts the parts that train; under full and freeze, the frozen parts'
    weights keep requires_grad off."""

    freeze_tower: bool = Field(default=True, description="Keep the vision tower (the image encoder) frozen.")
    freeze_projector: bool = Field(
        default=True, description="Keep the projector (vision features into the language model's embeddings) frozen."
    )
    freeze_language_model: bool = Field(default=False, description="Keep the language model frozen.")


class MethodSpec(Section):
    """What the loss is and which weights move. Every registered method (hwft.methods) has its
    own section here, ``method.<name>``, validated by its own spec and filled with its defaults
    whichever method runs (so that one recipe can switch methods with an override)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    objective: str = Field(
        default=DEFAULT,
        description="What the loss is: a registered method (sft, cpt, dpo, orpo, simpo, kto, rm, grpo, ppo, or a "
        "plugin's; "
        "`hwft plugins` lists them).",
    )
    tuning: Tuning = Field(
        default="lora", description="Which weights move: full, freeze (some layers, whole), lora or qlora."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings (lora, qlora).")
    freeze: FreezeSpec = Field(default_factory=FreezeSpec, description="Which layers train (freeze).")
    qlora: QLoraSpec = Field(default_factory=QLoraSpec, description="Quantisation (qlora).")
    vision: VisionSpec = Field(
        default_factory=VisionSpec, description="What trains of a vision-language model (hwft.vision)."
    )

    @property
    def adapter(self) -> bool:
        """Whether the tuning trains a LoRA adapter (lora, qlora) rather than the model's own weights."""
        return self.tuning in ADAPTER_TUNINGS

    @classmethod
    def sections(cls) -> dict[str, type[BaseModel]]:
        """The registered methods' sections by name (method.dpo, method.grpo, ...)."""
        from hwft.methods.lookup import registry

        return registry().sections()

    @model_validator(mode="after")
    def _registered(self) -> MethodSpec:
        from hwft.methods.lookup import registry

        methods = registry()
        if self.objective not in methods:
            message = methods.unknown(self.objective).removeprefix("method.objective: ")
            raise ValidationError.from_exception_data(
                "MethodSpec",
                [
                    {
                        "type": PydanticCustomError("unknown_method", "{message}", {"message": message}),
                        "loc": ("objective",),
                        "input": self.objective,
                    }
                ],
            )
        sections = methods.sections()
        extra = self.__pydantic_extra__
        assert extra is not None  # model_config extra="allow": pydantic keeps the method sections here
        for key in extra:
            if key not in sections:
                raise ValidationError.from_exception_data(
                    "MethodSpec", [{"type": "extra_forbidden", "loc": (key,), "input": extra[key]}]
                )
        for name, spec in sections.items():
            value = extra.get(name, {})
            if isinstance(value, spec):
                continue
            try:
                extra[name] = spec.model_validate(value)
            except ValidationError as err:  # keep the section in each error's location
                raise ValidationError.from_exception_data(
                    "MethodSpec",
                    [
                        InitErrorDetails(
                            type=e["type"],
                            loc=(name, *e["loc"]),
                            input=e["input"],
                            **({"ctx": e["ctx"]} if "ctx" in e else {}),
                        )
                        for e in err.errors()
                    ],
                ) from None
        return self


class TrainSpec(Section):
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "fused_adamw", "sgd"] = Field(
        default="adamw",
        description="adamw: AdamW (torch's fused kernel on the CPU, CUDA and ROCm); fused_adamw: the device's "
        "fused AdamW (torch's fused kernel on CPU, CUDA and ROCm, torch_npu.optim.NpuFusedAdamW on "
        "Ascend), refused where there is none; sgd.",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup, in optimizer steps.")
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Linear warmup as a fraction of the run's optimizer steps, rounded up "
        "(transformers' warmup_ratio); instead of warmup_steps.",
    )
    epochs: float = Field(default=1.0, gt=0, description="Passes over the data (ignored if max_steps).")
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(
        default=4,
        gt=0,
        description="Rows per forward pass (dpo: preference pairs; grpo: prompts, each "
        "with num_generations completions).",
    )
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per step.")
    max_length: int = Field(default=1024, gt=1, description="Truncate examples to this many tokens.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip gradients to this norm.")
    seed: int = Field(default=42, description="Seeds data order, adapter init and dropout.")
    precision: Precision = Field(default="auto", description="auto: bf16 autocast where the device has it, else fp32.")
    frozen_weights: Literal["auto", "fp32", "compute"] = Field(
        default="auto",
        description="How a lora run stores its frozen linear weights under bf16 or fp16: compute (in "
        "that dtype: half the memory, the same products, since autocast casts them to it in every "
        "forward anyway), fp32, or auto: compute on accelerators, fp32 on the CPU. Embeddings, norms "
        "and the adapter stay fp32; one process or ddp (sharded strategies keep fp32).",
    )
    log_every: int = Field(default=1, gt=0, description="Write metrics every N steps.")
    save_every: int | None = Field(
        default=None,
        gt=0,
        description="Write checkpoints/step-N every N steps (weights, optimizer, data position, "
        "RNG states): `hwft train R.yaml --resume` continues from the newest. SIGTERM and SIGINT also "
        "write one before the run stops.",
    )
    keep_checkpoints: int = Field(default=2, gt=0, description="Keep the newest K checkpoints.")
    nonfinite_limit: int = Field(
        default=3,
        ge=0,
        description="Steps with a NaN or Inf loss or gradient norm skipped (no update) before "
        "the run stops with an error naming the step.",
    )
    eval_every: int | None = Field(default=None, gt=0, description="Evaluate on data.eval every N steps.")
    early_stopping_patience: int | None = Field(
        default=None,
        gt=0,
        description="Stop once the held-out loss has not improved on its best by more than "
        "early_stopping_threshold for this many evaluations in a row (transformers' EarlyStoppingCallback); "
        "needs held-out data (data.eval or data.val_size) and train.eval_every. The weights of the last step "
        "are saved and the best step is named.",
    )
    early_stopping_threshold: float = Field(
        default=0.0,
        ge=0,
        description="How much lower than the best held-out loss an evaluation must be to count as an improvement.",
    )

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) and train.warmup_ratio ({self.warmup_ratio}) "
                "both set the warmup: keep one"
            )
        return self

    def warmup(self, steps: int) -> int:
        """Warmup steps of a run of ``steps`` optimizer steps: warmup_steps, or
        ceil(warmup_ratio x steps) as transformers counts it."""
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * steps)
        return self.warmup_steps


class KernelSpec(Section):
    use: Literal["auto"] | list[str] = Field(
        default="auto",
        description="The kernels to apply, by id (`hwft plugins` lists them: hwft_chunked_cross_entropy, "
        "hwft_sibling_projections, liger_rms_norm, npu_rms_norm, ...), or auto: every kernel the "
        "backend recommends whose libraries are installed. A named kernel that cannot run on the "
        "backend, or cannot apply to the model, is refused; [] applies none. The fused_* switches "
        "below add (true) or remove (false) the backend's kernel for their slot.",
    )
    attention: Literal[
        "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "npu_fusion_attention"
    ] = Field(
        default="auto",
        description="Attention implementation; auto picks the backend's best (and the family's "
        "own where the engine's default cannot serve it).",
    )
    fused_rms_norm: bool | None = Field(
        default=None,
        description="The backend's fused RMSNorm kernel (Ascend: npu_rms_norm; CUDA/ROCm: liger_rms_norm). "
        "Default: as kernels.use says (no backend recommends it).",
    )
    fused_rope: bool | None = Field(
        default=None,
        description="The backend's fused rotary embedding kernel (npu_rotary_mul; liger_rope). Default: as "
        "kernels.use says.",
    )
    fused_swiglu: bool | None = Field(
        default=None,
        description="The backend's fused gated-MLP activation (npu_swiglu; liger_swiglu). Default: as "
        "kernels.use says.",
    )
    fused_cross_entropy: bool | None = Field(
        default=None,
        description="Cross-entropy from the hidden states of the label positions, in chunks: no "
        "logits for prompts or padding, never full-vocabulary fp32 logits for the whole batch "
        "(sft, cpt). Default: on where the backend has it (hwft_chunked_cross_entropy, or "
        "liger_fused_linear_cross_entropy on CUDA/ROCm with liger-kernel).",
    )
    fused_projections: bool | None = Field(
        default=None,
        description="LoRA: each decoder layer's sibling projections that read the same input "
        "(q/k/v, gate/up) as one matmul for their frozen weights and one for their A matrices, "
        "instead of one each (hwft_sibling_projections). Plain LoRA without dropout, one process "
        "or parallel.strategy ddp. Default: on where the backend has it (torch engine).",
    )
    compile: bool | None = Field(
        default=None,
        description="torch.compile each decoder layer's training forward (fuses the element-wise "
        "work between matmuls; costs a compile of about a minute at the start). Default (null): on "
        "for CPU runs of 100 steps or more, where it was measured to pay; opt-in elsewhere.",
    )


class ParallelSpec(Section):
    strategy: Literal["none", "ddp", "fsdp2", "deepspeed"] = Field(
        default="none",
        description="Data-parallel strategy across processes (hwft train --nproc N): ddp "
        "replicates the model, fsdp2 shards parameters, gradients and optimizer state (torch "
        "fully_shard), deepspeed runs DeepSpeed ZeRO at zero_stage. none with several processes "
        "means ddp.",
    )
    zero_stage: Literal[1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(default=False, description="Keep optimizer state in host memory.")
    offload_params: bool = Field(default=False, description="Keep parameters in host memory.")
    activation_checkpointing: bool = Field(default=False, description="Recompute activations in backward.")
    sequence_parallel: int = Field(
        default=1,
        ge=1,
        description="Split each row's tokens over this many ranks (DeepSpeed's Ulysses attention "
        "over SDPA; torch engine, sft and cpt, unpacked rows): for rows longer than one device holds. The "
        "processes must be a multiple of it; the model's attention heads must split over it.",
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file (accelerate config's YAML), translated into these "
        "settings and the default process counts of --nproc/--nnodes (see hwft/accelerate_config.py).",
    )
    deepspeed_config: str | None = Field(default=None, description="A DeepSpeed JSON config, verbatim.")
    timeout: int = Field(
        default=1800,
        gt=0,
        description="Seconds a rank waits for the others in a collective before the "
        "run fails (a rank that died on another machine).",
    )


class OutputSpec(Section):
    dir: str = Field(default="runs/hwft", description="Output folder, relative to the working directory.")
    overwrite: bool = Field(default=False, description="Reuse a non-empty output folder.")
    plot: bool = Field(default=True, description="Write loss.png at the end.")
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers that also receive the metrics: tensorboard, "
        "wandb, mlflow, or a plugin's (hwft_register_loggers).",
    )
    project: str = Field(default="hwft", description="wandb project / MLflow experiment of report_to.")
    log_examples: bool = Field(
        default=False,
        description="Write examples.jsonl: per optimizer step, the indices of the tokenised "
        "training sequences it trained on (all ranks together).",
    )


class EvalSpec(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts answered before and after training.")
    max_new_tokens: int = Field(default=48, gt=0, description="Length limit of those answers.")


class BenchBaseline(Section):
    micro_batch_size: int = Field(default=4, gt=0, description="The Trainer's per_device_train_batch_size.")
    gradient_checkpointing: bool = Field(
        default=False,
        description="The Trainer's gradient_checkpointing (non-reentrant), as a user short of memory sets it; "
        "set parallel.activation_checkpointing alike for the hwft arm.",
    )
    dtypes: list[Literal["fp32", "bf16"]] = Field(
        default=["fp32"],
        min_length=1,
        description="One baseline arm per dtype: fp32, bf16 (the Trainer's bf16=True, "
        "weights loaded in bf16 where the checkpoint or model.shape's config says bf16). --baseline-bf16 adds bf16.",
    )


class BenchSpec(Section):
    baseline: BenchBaseline = Field(
        default_factory=BenchBaseline,
        description="The transformers Trainer + peft arms of `hwft bench --baseline`: "
        "their settings, written in the recipe and stored in each result. They train on the very rows the hwft arm "
        "trained on (padded to the longest in each batch).",
    )


class Recipe(Section):
    """A whole recipe. ``model``, ``data`` and ``output`` take plain strings as shorthands."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    template: str | None = Field(
        default=None, description="Chat template override: a built-in name (chatml) or a .jinja file."
    )
    data: DataSpec = Field(description="Training data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="Objective and tuning.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    kernels: KernelSpec = Field(default_factory=KernelSpec, description="Kernel switches.")
    backend: str = Field(default="auto", description="auto, or a backend name: cpu, cuda, rocm, npu, mlx.")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec, description="Multi-process.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Answers to show.")
    bench: BenchSpec = Field(default_factory=BenchSpec, description="How `hwft bench` runs its baselines.")

    #: Folder the recipe file was read from; relative data paths resolve against it.
    _base_dir: str = PrivateAttr(".")
    _imported: Any = PrivateAttr(None)  #: the hwft.llamafactory.Translation it was read from, if any

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("output", mode="before")
    @classmethod
    def _output_shorthand(cls, value: Any) -> Any:
        return {"dir": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> Recipe:
        if self.model.adapter and not self.method.adapter:
            raise ValueError(
                f"model.adapter continues a LoRA adapter, but method.tuning is {self.method.tuning}; set "
                "method.tuning: lora (or qlora), or remove model.adapter"
            )
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> Recipe:
        if self.train.early_stopping_patience is None:
            return self
        if not (self.data.eval or self.data.val_size):
            raise ValueError(
                "train.early_stopping_patience watches the held-out loss, and there is no held-out "
                "data: set data.eval (datasets) or data.val_size (a share of data.train)"
            )
        if not self.train.eval_every:
            raise ValueError(
                "train.early_stopping_patience counts evaluations: set train.eval_every (steps between evaluations)"
            )
        return self

    def resolve_path(self, path: str) -> Path:
        """A path from the recipe, made absolute against the recipe's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self._base_dir) / p).resolve()

    def to_yaml(self) -> str:
        """The resolved recipe as YAML: every default filled in, and every file path made
        absolute, so the copy in a run's folder runs again from anywhere."""
        raw = self.model_dump(mode="json")
        for spec in raw["data"]["train"] + raw["data"]["eval"]:
            if spec["path"]:
                spec["path"] = str(self.resolve_path(spec["path"]))
        if raw["data"]["registry"]:
            raw["data"]["registry"] = str(self.resolve_path(raw["data"]["registry"]))
        if raw["model"]["adapter"]:
            raw["model"]["adapter"] = str(self.resolve_path(raw["model"]["adapter"]))
        if raw["template"] and raw["template"].endswith(".jinja"):
            raw["template"] = str(self.resolve_path(raw["template"]))
        return yaml.safe_dump(raw, sort_keys=False)
