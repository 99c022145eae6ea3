"""Loading the model with its tuning (full, LoRA, QLoRA), the reference model, and saving.

QLoRA: the base's linear layers are loaded as bitsandbytes 4-bit (NF4 or FP4, optionally double
quantised) or 8-bit modules, frozen; LoRA adapters on top train in the compute dtype. The saved
adapter is a plain PEFT adapter whose base is the *unquantised* model folder, so it loads (and
merges) onto the full-precision weights.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hwft import lora_targets, vision
from hwft.errors import ModelError, RecipeError
from hwft.extras import write_extras
from hwft.methods.lookup import method
from hwft.models import has_random_weights
from hwft.recipe import Recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Head:
    """How the model of a method's ``head`` (hwft.methods.Method.head) loads in transformers,
    and the PEFT task its adapter is saved as."""

    auto_class: Callable[[], type]
    task_type: str
    what: str
    extra: dict = field(default_factory=dict)  #: from_pretrained arguments


def _causal_lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _sequence_score():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def _image_text_to_text():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


#: A vision-language family's (hwft.vision) next-token model: its language model, vision tower and projector.
IMAGE_TEXT_TO_TEXT = Head(_image_text_to_text, "CAUSAL_LM", "vision-language model")


def head_of(recipe: Recipe, path: Path, model_type: str | None = None) -> Head:
    """How the model a recipe trains loads: its method's head (hwft.methods.Method.head), a
    vision-language family's whole image-text-to-text model for a next-token head (its tower
    reads the rows' images: hwft.vision). ``model_type`` where there is no folder to read."""
    head = HEADS[method(recipe.method.objective).head]
    family = vision.FAMILIES.get(model_type or "") if model_type else vision.family_of(path)
    return IMAGE_TEXT_TO_TEXT if head is HEADS["causal_lm"] and family is not None else head


#: causal_lm: next-token logits; score: one scalar per sequence (a reward model). PEFT's SEQ_CLS
#: task trains and saves the new ``score`` head beside the adapter (its modules_to_save).
HEADS = {
    "causal_lm": Head(_causal_lm, "CAUSAL_LM", "causal language model"),
    "score": Head(_sequence_score, "SEQ_CLS", "sequence-scoring model (one reward per sequence)", {"num_labels": 1}),
}


def family_attention(model_type: str | None) -> tuple[str, str] | None:
    """(implementation, why) where the family's record (hwft_torch.families) names the
    attention it needs because sdpa cannot serve it (Gemma 2's soft-capped scores), or a
    family without a record is one whose transformers class has no sdpa path (eager), else None."""
    from hwft.plugins import get_host

    family = get_host().families().lookup("torch", model_type)
    if family.attention is None:
        return None if family.known or supports_sdpa(model_type) else ("eager", f"{model_type} has no sdpa path")
    return family.attention, str(family.options.get("attention_why", f"{model_type} needs it"))


def supports_sdpa(model_type: str | None) -> bool:
    """Whether transformers' causal-LM class of ``model_type`` runs torch's SDPA (its
    ``_supports_sdpa``, which transformers checks when it loads the model); True where the
    class is not found, so that loading says what it says."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")
    try:
        import transformers

        cls = getattr(transformers, name) if isinstance(name, str) else None
    except (AttributeError, ImportError):
        cls = None
    return cls is None or bool(getattr(cls, "_supports_sdpa", True))


def model_type_of(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def experts_implementation(model_type: str | None) -> dict:
    """``{"experts_implementation": name}`` where the family's record names one (an MoE
    family's grouped matmul, hwft_torch.families) and this torch has it; else nothing."""
    from hwft.plugins import get_host

    name = get_host().families().lookup("torch", model_type).options.get("experts")
    if name == "grouped_mm" and not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return {}
    return {"experts_implementation": name} if name else {}


def attention_implementation(recipe: Recipe, model_type: str | None = None) -> str:
    """kernels.attention; auto is sdpa, or what the model's family needs where sdpa cannot serve
    it (:func:`family_attention`). For methods whose rows may be packed (sft, cpt), sdpa runs
    once per packed example (:mod:`hwft_torch.packed_attention`), unless data.packing is false."""
    name = "sdpa" if recipe.kernels.attention == "auto" else recipe.kernels.attention
    needed = family_attention(model_type) if recipe.kernels.attention == "auto" else None
    if needed is not None:
        return needed[0]
    if name == "sdpa" and method(recipe.method.objective).packs and recipe.data.packing is not False:
        from hwft_torch.packed_attention import register

        return register()
    return name


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for method.qlora."""
    from transformers import BitsAndBytesConfig

    q = recipe.method.qlora
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = compute_dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(
    path: Path,
    recipe: Recipe,
    device: torch.device,
    tuning: str,
    compute_dtype: torch.dtype,
    frozen: torch.dtype | None = None,
):
    """The base model (fp32 weights, or quantised for qlora; mixed precision runs under
    autocast), with its tuning applied. ``tuning`` is the one that runs (after any fallback).
    ``frozen``: the dtype its frozen linear weights are stored in (hwft_torch.frozen_weights), cast
    before the model reaches the device, so the device never holds their fp32 copy."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from hwft_torch import frozen_weights

    hf_logging.disable_progress_bar()  # hwft draws its own progress
    head = head_of(recipe, path)
    extra = dict(head.extra)
    if tuning == "qlora":
        extra.update(quantization_config=quantization_config(recipe, compute_dtype), device_map={"": device})
    if has_random_weights(path):  # model.shape: built on the device, seeded by train.seed (engine.seed_everything)
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=recipe.model.trust_remote_code
        )
        with torch.device(device):
            model = head.auto_class().from_config(
                config, dtype=frozen or torch.float32, **head.extra, **built_as(path, recipe)
            )
        if frozen:  # random numbers either way: made in the stored dtype, all but the linears back in fp32
            linears = {id(p) for m in model.modules() if type(m) is torch.nn.Linear for p in m.parameters()}
            embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
            for p in model.parameters():
                if id(p) not in linears or id(p) in embedded:
                    p.data = p.data.float()
        model = tune(model, recipe, tuning)
        for p in model.parameters():  # what trains is fp32 whatever it was made in
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        return model
    try:
        model = head.auto_class().from_pretrained(
            path,
            dtype=torch.float32,
            trust_remote_code=recipe.model.trust_remote_code,
            local_files_only=True,
            use_safetensors=True,  # never a pickled checkpoint (hwft.models.check_safe_weights)
            **extra,
            **built_as(path, recipe),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a {head.what} from {path}: {exc}") from None
    if frozen:  # tuned and cast where it was loaded, then moved
        model = tune(model, recipe, tuning)
        frozen_weights.store(model, frozen)
        return model.to(device)
    if tuning != "qlora":
        model.to(device)
    return tune(model, recipe, tuning)


def import_model_code(path: Path, recipe: Recipe, tuning: str) -> None:
    """Import the code that loading the model runs (its transformers modeling module, peft for an
    adapter, the 4-bit quantizers, what fsdp2's sharded loading uses) ahead of it, so that the
    memory measured around the load is the model's, not the ~140 MiB of Python modules the first
    load would import, nor the compiler's where a module's bytecode is not written yet."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=recipe.model.trust_remote_code
        )
        head_of(recipe, path).auto_class()._model_mapping[type(config)]
    except (OSError, ValueError, KeyError):
        return  # loading itself says what is wrong
    if tuning in ("lora", "qlora"):
        import peft  # noqa: F401
    if tuning == "qlora":  # transformers' bitsandbytes quantizer and bitsandbytes' own, imported when first used
        import bitsandbytes.functional  # noqa: F401
        import transformers.integrations.bitsandbytes  # noqa: F401
        import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
    if recipe.parallel.strategy == "fsdp2":
        import accelerate.big_modeling  # noqa: F401  (hwft_torch.sharded_loading's skeleton)
        import safetensors  # noqa: F401
        import torch.distributed.fsdp  # noqa: F401
        import torch.distributed.tensor  # noqa: F401


def built_as(path: Path, recipe: Recipe) -> dict:
    """How the model class is built for this recipe, whether loaded or a skeleton: its attention
    and its experts' implementation."""
    return dict(
        attn_implementation=attention_implementation(recipe, model_type_of(path)),
        **experts_implementation(model_type_of(path)),
    )


def tune(model, recipe: Recipe, tuning: str):
    """The loaded (or skeleton) model made ready for its tuning: qlora's k-bit preparation or
    checkpointing, no KV cache, then the adapter or the frozen layers."""
    checkpointing = recipe.parallel.activation_checkpointing
    if tuning == "qlora":
        from peft import prepare_model_for_kbit_training

        # Freezes the base, keeps norms and embeddings in fp32, and (optionally) checkpoints.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # No KV cache in a training forward (generation asks for one itself): with one, transformers
    # would not read packed examples from the position ids (hwft_torch.objective.to_tensors).
    model.config.use_cache = False
    if tuning in ("lora", "qlora"):
        model = add_lora(model, recipe)
    elif tuning == "freeze":
        freeze_layers(model, recipe.method.freeze)
    if tuning in ("full", "freeze"):
        freeze_vision_parts(model, recipe.method.vision)
    return model


def freeze_layers(model, spec) -> int:
    """freeze tuning (:mod:`hwft.freeze`): gradients only for the chosen layers' weights (spec:
    hwft.recipe.FreezeSpec); returns how many tensors train."""
    from hwft.freeze import trainable

    chosen = trainable([name for name, _ in model.named_parameters()], spec)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return len(chosen)


def add_lora(model, recipe: Recipe):
    """Wrap in a peft LoRA adapter: W x + s * B A x with B initialised to zero and s = alpha / r
    (rsLoRA: alpha / sqrt(r)); DoRA also learns a per-output magnitude. With model.adapter, the
    saved adapter is loaded, trainable, instead of a new one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if recipe.parallel.activation_checkpointing:
        model.enable_input_require_grads()
    if recipe.model.adapter:
        folder = recipe.resolve_path(recipe.model.adapter)
        if not (folder / "adapter_config.json").is_file():
            raise ModelError(
                f"model.adapter: {folder} is not a PEFT adapter folder (no adapter_config.json); "
                "give the adapter/ folder of an earlier run"
            )
        try:
            return PeftModel.from_pretrained(model, folder, is_trainable=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"model.adapter: cannot load {folder} onto this model: {exc}") from None
    spec = recipe.method.lora
    lora_targets.check(spec.target_modules, *adaptable_modules(model))
    skipped = (
        linears_peft_leaves_out(model) + vision_linears(model, recipe.method.vision)
        if spec.target_modules == "all-linear"
        else []
    )
    config = LoraConfig(
        task_type=HEADS[method(recipe.method.objective).head].task_type,
        r=spec.r,
        lora_alpha=spec.alpha,  # pyright: ignore[reportArgumentType] - typed int, scales by any number
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.dora,
        use_rslora=spec.rslora,
        exclude_modules=skipped or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # PEFT's own refusal: Mamba's out_proj and conv1d, say
        raise RecipeError(
            f"method.lora.target_modules: PEFT cannot adapt what {spec.target_modules!r} names in this model: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from None


def adaptable_modules(model) -> tuple[list[str], list[str]]:
    """(linear layers but the output layer, embeddings): the module paths PEFT's LoRA can adapt,
    for :func:`hwft.lora_targets.check`. bitsandbytes' 4- and 8-bit layers are Linears too."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    linear, others = [], []
    for path, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear | Conv1D):
            linear.append(path)
        elif isinstance(module, torch.nn.Embedding):
            others.append(path)
    return linear, others


def linears_computing_otherwise(model) -> list[str]:
    """Module paths of the model's own Linear subclasses that override ``forward`` (Llama 4's
    router returns its scores and its logits): Linears to PEFT's all-linear, but LoRA's wrapper
    adds its update to one output tensor, so they are left out of it."""
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and type(module).forward is not torch.nn.Linear.forward
        and type(module).__module__.startswith("transformers.")
    ]


def vision_linears(model, spec) -> list[str]:
    """The linear layers of the parts of a vision-language model that method.vision keeps frozen
    (by default its vision tower and projector, as LLaMA-Factory's freeze_vision_tower and
    freeze_multi_modal_projector): all-linear leaves them out."""
    family = vision.FAMILIES.get(getattr(getattr(model, "config", None), "model_type", "") or "")
    if family is None:
        return []
    frozen = vision.frozen_parts(spec)
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and vision.part_of(family, path) in frozen
    ]


def freeze_vision_parts(model, spec) -> int:
    """full and freeze tuning of a vision-language model: the parts method.vision keeps frozen
    lose their gradients; returns how many tensors that froze."""
    family = vision.FAMILIES.get(getattr(getattr(model, "config", None), "model_type", "") or "")
    if family is None:
        return 0
    frozen = vision.frozen_parts(spec)
    count = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and vision.part_of(family, name) in frozen:
            parameter.requires_grad_(False)
            count += 1
    return count


def linears_peft_leaves_out(model) -> list[str]:
    """What all-linear leaves out beyond the output layer: :func:`linears_computing_otherwise`,
    and the layers PEFT's own check refuses LoRA on for this model (the out_proj of Mamba's
    mixers, whose fused kernels bypass LoRA's wrapper), so that all-linear adapts the rest."""
    skipped = linears_computing_otherwise(model)
    try:  # PEFT's rule, read from PEFT rather than copied (a private helper: absent, nothing more is skipped)
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:
        return skipped
    probe = LoraConfig(target_modules="all-linear")
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path not in skipped:
            try:
                _check_lora_target_modules_mamba(probe, model, path.rsplit(".", 1)[-1])
            except ValueError:
                skipped.append(path)
    return skipped


def quantised_linear_count(model) -> int:
    """How many linear layers are bitsandbytes 4-bit or 8-bit modules."""
    try:
        from bitsandbytes.nn.modules import Linear4bit, Linear8bitLt
    except ImportError:
        return 0
    return sum(isinstance(m, Linear4bit | Linear8bitLt) for m in model.modules())


class Reference:
    """The frozen reference policy of DPO and GRPO.

    With an adapter (lora, qlora) it is the same model with the adapter disabled: no second copy
    in memory. For full tuning it is a frozen copy made before the first update (or one given).
    """

    def __init__(self, model, copy_of: torch.nn.Module | None = None):
        from peft import PeftModel

        self.model = model
        self.frozen = copy_of
        if copy_of is None and not isinstance(model, PeftModel):
            self.frozen = copy.deepcopy(model).eval()
        if self.frozen is not None:
            self.frozen.requires_grad_(False)

    @contextmanager
    def active(self):
        """Yields the module that computes the reference policy, with gradients off."""
        with torch.no_grad():
            if self.frozen is not None:
                yield self.frozen
            else:
                with self.model.disable_adapter():
                    yield self.model


def with_reference(setup, spec, make, what: str):
    """The objective ``make(reference)`` of a method with a reference policy (dpo, kto), whose
    ``spec.reference`` is auto or precomputed: with precomputed, or a continued adapter (its own
    reference: the starting policy), no reference is held and the objective's ``precompute``
    runs now; ``what`` names what was precomputed in the run's log."""
    recipe = setup.job.recipe
    precompute = spec.reference == "precomputed" or bool(recipe.model.adapter)
    objective = make(None if precompute else Reference(setup.model))
    if precompute:
        with setup.autocast():
            objective.precompute(setup.model, recipe.train.micro_batch_size)
        setup.job.log(f"{what} precomputed")
    return objective


def save_result(
    model, tokenizer, out_dir: Path, recipe: Recipe, state_dict: dict | None = None, extras: tuple = ()
) -> None:
    """adapter/ in PEFT's own format, or model/ as HF safetensors; the tokenizer beside it; and
    each of the method's extras (hwft.objective.Extra) in its own file, kept out of the model.
    ``state_dict``: the weights gathered from a sharded run (else the model's own)."""
    whole = state_dict if state_dict is not None else (model.state_dict() if extras else None)
    if whole is not None and extras:
        prefixes = tuple(e.prefix for e in extras)
        apart = {k: v.detach().float().cpu().numpy() for k, v in whole.items() if k.startswith(prefixes)}
        whole = {k: v for k, v in whole.items() if not k.startswith(prefixes)}
    if hasattr(model, "peft_config"):  # PEFT picks the adapter's weights out of what it is given
        model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    else:
        model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": whole} if whole is not None else {}))
    if extras:
        write_extras(out_dir, extras, lambda e: {k: v for k, v in apart.items() if k.startswith(e.prefix)})
    tokenizer.save_pretrained(out_dir)
