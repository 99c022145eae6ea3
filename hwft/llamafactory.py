"""LLaMA-Factory's training YAML, read as it is: ``hwft train lf.yaml`` trains it and
``hwft import lf.yaml > recipe.yaml`` prints the hwft recipe it becomes.

Every key of the file is one of three things:

- **translated** (:data:`TRANSLATED`): its meaning is carried into the recipe (``stage`` ->
  ``method.objective``, ``lora_rank`` -> ``method.lora.r``, ``dataset`` -> the entries of
  ``dataset_dir/dataset_info.json``, ...). Defaults are LLaMA-Factory's and transformers' where
  the file leaves a key out (``lora_alpha`` = 2 x ``lora_rank``, fp32 without ``bf16``/``fp16``,
  ``lr_scheduler_type`` linear, ``per_device_train_batch_size`` 8, ``num_train_epochs`` 3);
- **inert** (:data:`INERT`): it tunes LLaMA-Factory's own machinery and changes nothing for hwft
  (``preprocessing_num_workers``, ``ddp_timeout``, ...); all of them are named in one line;
- anything else is **refused by name**, with what hwft would accept; so are values hwft cannot
  honour (``pref_loss: kto_pair``, ``stage: ppo``, a template that is LLaMA-Factory's own
  prompt format rather than the model's chat template).

Paths are LLaMA-Factory's: ``dataset_dir`` (default ``data``) and a ``deepspeed`` config file
relative to the working directory (then to the YAML's folder); ``output_dir`` relative to the
working directory, as ``output.dir`` is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwft.errors import RecipeError, did_you_mean

#: Keys that only steer LLaMA-Factory's own processes, caches and plots.
INERT = frozenset(
    (
        "preprocessing_num_workers",
        "dataloader_num_workers",
        "ddp_timeout",
        "overwrite_cache",
        "plot_loss",
        "save_only_model",
        "per_device_eval_batch_size",
        "dataloader_pin_memory",
        "include_num_input_tokens_seen",
        "preprocessing_batch_size",
        "trust_remote_code_warned",
        "logging_first_step",
        "disable_tqdm",
        "ddp_find_unused_parameters",
        "flash_attn",
        "enable_liger_kernel",
        "use_unsloth",
        "upcast_layernorm",
    )
)

#: LLaMA-Factory's pref_loss where a file leaves it out. Which method a stage (and pref_loss)
#: means, and the keys each method reads, are in the methods' records (Method.llamafactory).
PREF_LOSS_DEFAULT = "sigmoid"

#: LLaMA-Factory templates that are the model's own chat template (hwft renders with the
#: tokenizer's) and the built-in ones hwft has by the same name.
OWN_TEMPLATES = frozenset(
    (
        "qwen",
        "qwen2_vl",
        "qwen3_vl",
        "qwen3_vl_nothink",
        "qwen3",
        "qwen3_nothink",
        "llama2",
        "llama3",
        "llama4",
        "mistral",
        "ministral",
        "gemma",
        "gemma2",
        "gemma3",
        "phi",
        "phi4",
        "deepseek",
        "deepseek3",
        "deepseekr1",
        "glm4",
        "yi",
        "cohere",
        "olmo",
        "granite3",
        "smollm",
        "smollm2",
        "hunyuan",
        "seed_oss",
    )
)
BUILTIN_TEMPLATES = {"chatml": "chatml"}

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "fused_adamw", "sgd": "sgd"}
TRACKERS = {"tensorboard", "wandb", "mlflow"}

#: Every key :func:`translate` reads for any method (for the refusal's did-you-mean); the
#: methods' own keys are in their records.
TRANSLATED = frozenset(
    (
        "model_name_or_path",
        "adapter_name_or_path",
        "trust_remote_code",
        "stage",
        "do_train",
        "finetuning_type",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "use_dora",
        "use_rslora",
        "loraplus_lr_ratio",
        "freeze_trainable_layers",
        "freeze_trainable_modules",
        "freeze_extra_modules",
        "quantization_bit",
        "quantization_method",
        "quantization_type",
        "double_quantization",
        "dataset",
        "eval_dataset",
        "dataset_dir",
        "cutoff_len",
        "max_samples",
        "val_size",
        "streaming",
        "buffer_size",
        "packing",
        "train_on_prompt",
        "mask_history",
        "template",
        "image_max_pixels",
        "image_min_pixels",
        "video_max_pixels",
        "video_min_pixels",
        "video_fps",
        "video_maxlen",
        "freeze_vision_tower",
        "freeze_multi_modal_projector",
        "freeze_language_model",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "lr_scheduler_type",
        "warmup_ratio",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "optim",
        "seed",
        "bf16",
        "fp16",
        "pure_bf16",
        "pref_loss",
        "pref_ftx",
        "deepspeed",
        "output_dir",
        "overwrite_output_dir",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "save_strategy",
        "eval_strategy",
        "eval_steps",
        "report_to",
        "run_name",
        "resume_from_checkpoint",
        "do_eval",
        "do_predict",
        "gradient_checkpointing",
        "disable_gradient_checkpointing",
    )
)


@dataclass
class Translation:
    """The recipe mapping a LLaMA-Factory file becomes, and what the translation noticed."""

    recipe: dict
    source: Path
    inert: list[str] = field(default_factory=list)  #: keys that change nothing for hwft
    notes: list[str] = field(default_factory=list)  #: how a key was read, where it is not 1:1

    def summary(self) -> str:
        """One line for the run's log."""
        objective = self.recipe["method"]["objective"]
        text = (
            f"read LLaMA-Factory recipe {self.source} (objective {objective}, tuning {self.recipe['method']['tuning']})"
        )
        if self.inert:
            text += f"; changes nothing in hwft: {', '.join(self.inert)}"
        return text

    def to_yaml(self) -> str:
        """The recipe as YAML, with the translation's notes as comments at the top."""
        import yaml

        lines = [f"# Translated by `hwft import` from the LLaMA-Factory recipe {self.source}."]
        if self.inert:
            lines.append(f"# Keys that change nothing in hwft: {', '.join(self.inert)}.")
        lines += [f"# {note}" for note in self.notes]
        return "\n".join(lines) + "\n" + yaml.safe_dump(self.recipe, sort_keys=False)


def looks_like(raw: dict) -> bool:
    """Whether a parsed YAML file is a LLaMA-Factory training recipe rather than an hwft one."""
    return ("stage" in raw or "model_name_or_path" in raw) and not {"model", "data", "method", "train"} & set(raw)


def _split(value: Any) -> list[str]:
    """A LLaMA-Factory list: comma-separated text or a YAML list."""
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _find(path: str, source: Path) -> Path | None:
    """A file or folder LLaMA-Factory resolves from the working directory; then the YAML's folder."""
    for candidate in (Path(path).expanduser(), source.parent / path):
        if candidate.exists():
            return candidate.resolve()
    return None


class File:
    """The LLaMA-Factory file as a method's translation reads it (hwft.methods.record.LlamaFactoryFile)."""

    def __init__(self, raw: dict, source: Path, translation: Translation):
        self.raw, self.source, self.translation = raw, source, translation

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def refuse(self, key: str, why: str) -> RecipeError:
        return RecipeError(f"{self.source}: {key}: {self.raw.get(key)!r} {why}")

    def error(self, text: str) -> RecipeError:
        return RecipeError(f"{self.source}: {text}")

    def note(self, text: str) -> None:
        self.translation.notes.append(text)


def stages(registry) -> dict[str, list]:
    """LLaMA-Factory's stages hwft trains, each with the methods (records) it may mean."""
    out: dict[str, list] = {}
    for m in registry:
        if m.llamafactory is not None:
            out.setdefault(m.llamafactory.stage, []).append(m)
    return out


def default_stage(registry) -> str | None:
    """The stage a file without one trains (LLaMA-Factory's default, sft)."""
    return next((m.llamafactory.stage for m in registry if m.llamafactory and m.llamafactory.default), None)


def method_keys(registry) -> frozenset[str]:
    """The LLaMA-Factory keys the registered methods read."""
    return frozenset(k for m in registry if m.llamafactory for k in (*m.llamafactory.keys, *m.llamafactory.only))


def choose_method(file: File, registry):
    """(the method a file's stage and pref_loss mean, its pref_loss or None)."""
    named = stages(registry)
    stage = file.get("stage", default_stage(registry))
    if stage not in named:
        raise file.refuse("stage", f"is not a LLaMA-Factory stage hwft trains (it trains: {', '.join(named)})")
    candidates = named[stage]
    losses = {loss: m for m in candidates for loss in m.llamafactory.pref_loss}
    if not losses:
        if "pref_loss" in file.raw:
            users = sorted({m.llamafactory.stage for ms in named.values() for m in ms if m.llamafactory.pref_loss})
            raise file.refuse("pref_loss", f"applies to stage {', '.join(users)}, not {stage}")
        return candidates[0], None
    loss = file.get("pref_loss", PREF_LOSS_DEFAULT)
    if loss not in losses:
        raise file.refuse(
            "pref_loss",
            f"has no hwft counterpart (accepted: {', '.join(losses)}; kto_pair: use "
            "stage: kto, which trains on single desirable/undesirable answers)",
        )
    return losses[loss], loss


#: A key of a LLaMA-Factory file with no default of its own: carried only where the file has it.
ABSENT = object()


@dataclass(frozen=True)
class Key:
    """One LLaMA-Factory key carried into one recipe key of a section."""

    lf: str  #: LLaMA-Factory's name
    ours: str  #: the key in the hwft section
    convert: Callable[[Any], Any] = lambda v: v  #: its value as hwft's
    #: LLaMA-Factory's (or transformers') default where the file leaves it out; ABSENT: carried
    #: only where the file has it
    default: Any = ABSENT
    #: LLaMA-Factory value -> hwft's, where only some are honoured (others are refused by name)
    choices: Mapping[str, str] | None = None
    falsy: bool = True  #: carry a value that is false (0, "", False) too

    def carry(self, file: File, section: dict) -> None:
        value = file.get(self.lf, self.default)
        if value is ABSENT or (not self.falsy and not value):
            return
        if self.choices is not None:
            if value not in self.choices:
                raise file.refuse(self.lf, f"is not one hwft runs ({', '.join(self.choices)})")
            value = self.choices[value]
        section[self.ours] = self.convert(value)


def carry(file: File, keys: tuple[Key, ...], section: dict | None = None) -> dict:
    """``section`` with each of ``keys`` carried from the file, in the table's order."""
    section = {} if section is None else section
    for key in keys:
        key.carry(file, section)
    return section


LORA_KEYS = (Key("lora_dropout", "dropout", float, 0.0),)
LORA_SWITCHES = (
    Key("use_dora", "dora", bool, False),
    Key("use_rslora", "rslora", bool, False),
    Key("loraplus_lr_ratio", "loraplus_lr_ratio", float, falsy=False),
)
QLORA_KEYS = (
    Key("quantization_type", "quant_type", str, "nf4"),
    Key("double_quantization", "double_quant", bool, True),
)
FREEZE_KEYS = (Key("freeze_trainable_layers", "trainable_layers", int, 2),)
DATA_FLAGS = (
    Key("streaming", "streaming", bool),
    Key("packing", "packing", bool),
    Key("train_on_prompt", "train_on_prompt", bool),
    Key("mask_history", "mask_history", bool),
    Key("buffer_size", "shuffle_buffer", int, falsy=False),
    Key("image_max_pixels", "image_max_pixels", int),
    Key("image_min_pixels", "image_min_pixels", int),
    Key("video_max_pixels", "video_max_pixels", int),
    Key("video_min_pixels", "video_min_pixels", int),
    Key("video_fps", "video_fps", float),
    Key("video_maxlen", "video_maxlen", int),
)
#: train: LLaMA-Factory's and transformers' defaults where the file leaves a key out.
TRAIN_KEYS = (
    Key("learning_rate", "lr", float, 5e-5),
    Key("num_train_epochs", "epochs", float, 3.0),
    Key("per_device_train_batch_size", "micro_batch_size", int, 8),
    Key("gradient_accumulation_steps", "gradient_accumulation_steps", int, 1),
    Key("cutoff_len", "max_length", int, 2048),
    Key("lr_scheduler_type", "scheduler", default="linear", choices=SCHEDULERS),
    Key("optim", "optimizer", default="adamw_torch", choices=OPTIMIZERS),
)
TRAIN_TAIL = (
    Key("seed", "seed", int, 42),
    Key("weight_decay", "weight_decay", float, 0.0),
    Key("max_grad_norm", "max_grad_norm", float, 1.0),
    Key("logging_steps", "log_every", int, 500),
)
OUTPUT_KEYS = (Key("output_dir", "dir", str, "saves"), Key("overwrite_output_dir", "overwrite", bool, False))
#: Keys refused whatever their stage, with what to do instead.
REFUSED = {
    "do_eval": "- run `hwft eval` on the result instead of do_eval",
    "do_predict": "- run `hwft eval` on the result instead of do_predict",
    "pref_ftx": "- hwft's preference methods add no SFT term; use pref_loss: orpo (NLL plus a preference term) or "
    "remove pref_ftx",
    "resume_from_checkpoint": "- hwft resumes from its own checkpoints: run `hwft train lf.yaml --resume` (the "
    "newest in output_dir/checkpoints)",
}


def translate(raw: dict, source: Path) -> Translation:
    """The hwft recipe mapping of a LLaMA-Factory training YAML, section by section; a
    RecipeError names the first key (or value) hwft cannot honour."""
    from hwft.methods.lookup import registry as method_registry

    t = Translation({}, source, inert=sorted(k for k in raw if k in INERT))
    file = File(raw, source, t)
    registry = method_registry()
    chosen, loss = choose_method(file, registry)
    check_keys(file, registry, chosen)
    section = chosen.llamafactory.section(file, loss) if chosen.llamafactory.section else {}
    model = model_section(file)
    t.recipe = {"model": model, "data": data_section(file), "method": method_section(file, chosen.name, section)}
    if (template := template_key(file)) is not None:
        t.recipe["template"] = template
    t.recipe["train"] = train_section(file, chosen, section)
    if parallel := parallel_section(file):
        t.recipe["parallel"] = parallel
    t.recipe["output"] = output_section(file)
    return t


def check_keys(file: File, registry, chosen) -> None:
    """Every key is one hwft translates, or one that changes nothing for it; the file trains;
    no key refused outright, nor one only another stage reads."""
    raw, where = file.raw, file.source
    known = TRANSLATED | method_keys(registry)
    unknown = sorted(k for k in raw if k not in known and k not in INERT)
    if unknown:
        key = unknown[0]
        raise RecipeError(
            f"{where}: LLaMA-Factory key '{key}' is not one hwft can honour"
            f"{did_you_mean(key, sorted(known | INERT))}; remove it (docs/recipes.md "
            "lists the keys hwft translates and those that change nothing)"
        )
    if not file.get("model_name_or_path"):
        raise file.error(
            "model_name_or_path is required (a local model folder, or a hub id already in the local Hugging Face cache)"
        )
    if file.get("do_train", True) is not True:
        raise file.refuse("do_train", "- hwft import translates training recipes (evaluate with hwft eval)")
    for key, why in REFUSED.items():
        if file.get(key):
            raise file.refuse(key, why)
    for m in registry:
        others = [k for k in (m.llamafactory.only if m.llamafactory and m is not chosen else ()) if k in raw]
        if others:
            raise file.refuse(others[0], f"is read by stage {m.llamafactory.stage}, not {chosen.llamafactory.stage}")


def method_section(file: File, objective: str, section: dict) -> dict:
    """method: the objective, the tuning (finetuning_type, quantization_bit) and its settings,
    and the method's own section (its record's translation)."""
    get = file.get
    method: dict = {"objective": objective}
    finetuning = get("finetuning_type", "lora")
    if finetuning not in ("lora", "full", "freeze"):
        raise file.refuse("finetuning_type", "is not one of lora, full, freeze")
    bits = get("quantization_bit")
    method["tuning"] = finetuning
    if bits is not None:
        if finetuning != "lora" or int(bits) not in (4, 8):
            raise file.refuse("quantization_bit", "- hwft quantises the base to 4 or 8 bits under LoRA (QLoRA) only")
        if get("quantization_method", "bnb") != "bnb":
            raise file.refuse("quantization_method", "- hwft quantises with bitsandbytes (bnb)")
        method["tuning"] = "qlora"
        method["qlora"] = carry(file, QLORA_KEYS, {"bits": int(bits)})
    if finetuning == "lora":
        rank = int(get("lora_rank", 8))
        target = _split(get("lora_target", "all"))
        lora = carry(file, LORA_KEYS, {"r": rank, "alpha": float(get("lora_alpha") or 2 * rank)})
        lora["target_modules"] = "all-linear" if target == ["all"] else target
        method["lora"] = carry(file, LORA_SWITCHES, lora)
    if finetuning == "freeze":
        modules = _split(get("freeze_trainable_modules", "all"))
        method["freeze"] = carry(file, FREEZE_KEYS, {})
        method["freeze"].update(
            trainable_modules="all" if modules == ["all"] else modules,
            extra_modules=_split(get("freeze_extra_modules", "")),
        )
    vision = {
        ours: bool(get(theirs))
        for theirs, ours in (
            ("freeze_vision_tower", "freeze_tower"),
            ("freeze_multi_modal_projector", "freeze_projector"),
            ("freeze_language_model", "freeze_language_model"),
        )
        if get(theirs) is not None
    }
    if vision:
        method["vision"] = vision
    if section:
        method[objective] = section
    return method


def model_section(file: File) -> dict:
    """model: the folder (or hub id), trust_remote_code, and one adapter to continue."""
    name = str(file.get("model_name_or_path"))
    local = Path(name).expanduser()
    model = {
        "name": str(local.resolve()) if local.exists() else name,
        "trust_remote_code": bool(file.get("trust_remote_code", False)),
    }
    if file.get("adapter_name_or_path"):
        adapters = _split(file.get("adapter_name_or_path"))
        if len(adapters) > 1:
            raise file.refuse("adapter_name_or_path", "- hwft continues one adapter (merge the others first)")
        model["adapter"] = str(Path(adapters[0]).expanduser().resolve())
    return model


def data_section(file: File) -> dict:
    """data: the datasets named in dataset_dir's dataset_info.json, held-out ones, the flags."""
    get, source = file.get, file.source
    folder = _find(str(get("dataset_dir", "data")), source)
    if folder is None or not (folder / "dataset_info.json").is_file():
        raise file.error(
            f"dataset_dir {get('dataset_dir', 'data')!r} has no dataset_info.json (looked in the working "
            f"directory, then beside {source.name}); set dataset_dir to the folder that holds it"
        )
    names = _split(get("dataset", ""))
    if not names:
        raise file.error(f"dataset names no dataset (entries of {folder / 'dataset_info.json'})")
    limit = get("max_samples")

    def entries(chosen: list[str]) -> list[dict]:
        return [{"name": n, **({"max_samples": int(limit)} if limit else {})} for n in chosen]

    data: dict = {"registry": str(folder / "dataset_info.json"), "train": entries(names)}
    if get("eval_dataset"):
        data["eval"] = entries(_split(get("eval_dataset")))
    if get("val_size"):
        data["val_size"] = float(get("val_size")) if float(get("val_size")) < 1 else int(get("val_size"))
    return carry(file, DATA_FLAGS, data)


def template_key(file: File) -> str | None:
    """template: a built-in hwft has by the same name; a model's own template is the tokenizer's."""
    template = file.get("template")
    if template is None:
        return None
    if template in OWN_TEMPLATES:
        file.note(f"template {template}: the model's own chat template (the tokenizer's).")
        return None
    if template not in BUILTIN_TEMPLATES:
        raise file.refuse(
            "template",
            "is LLaMA-Factory's own prompt format, not a model's chat template; hwft "
            "renders conversations with the tokenizer's chat template: remove template (or set "
            f"it to one of {', '.join(sorted(OWN_TEMPLATES | set(BUILTIN_TEMPLATES)))}), or give "
            "the hwft recipe template: a .jinja file",
        )
    return BUILTIN_TEMPLATES[template]


def train_section(file: File, chosen, section: dict) -> dict:
    """train: the table's keys, the precision, the schedule's length and warm-up, checkpoints
    and evaluation, and what the method changes there (Method.llamafactory.train)."""
    get = file.get
    train = carry(file, TRAIN_KEYS)
    train["precision"] = "bf16" if get("bf16") or get("pure_bf16") else "fp16" if get("fp16") else "fp32"
    carry(file, TRAIN_TAIL, train)
    if get("max_steps") and int(get("max_steps")) > 0:
        train["max_steps"] = int(get("max_steps"))
    if get("warmup_ratio"):
        train["warmup_ratio"] = float(get("warmup_ratio"))
    elif get("warmup_steps"):
        train["warmup_steps"] = int(get("warmup_steps"))
    if chosen.llamafactory.train:
        chosen.llamafactory.train(train, section)
    if get("save_strategy", "steps") == "steps":
        train["save_every"] = int(get("save_steps", 500))
        if get("save_total_limit"):
            train["keep_checkpoints"] = int(get("save_total_limit"))
    elif get("save_strategy") != "no":
        raise file.refuse("save_strategy", "- hwft checkpoints every save_steps (steps) or not at all (no)")
    if get("eval_strategy", "no") == "steps":
        train["eval_every"] = int(get("eval_steps") or get("logging_steps", 500))
    elif get("eval_strategy", "no") != "no":
        raise file.refuse("eval_strategy", "- hwft evaluates every eval_steps (steps) or not at all (no)")
    return train


def parallel_section(file: File) -> dict:
    """parallel: activation checkpointing, and the strategy a deepspeed config file means."""
    parallel: dict = {}
    if file.get("gradient_checkpointing") or file.get("disable_gradient_checkpointing") is False:
        parallel["activation_checkpointing"] = True
    if file.get("deepspeed"):
        parallel.update(_deepspeed(str(file.get("deepspeed")), file.source, file.translation))
    return parallel


def output_section(file: File) -> dict:
    """output: the folder, overwrite, the trackers and the run's name."""
    output = carry(file, OUTPUT_KEYS)
    trackers = [r for r in _split(file.get("report_to", "none")) if r not in ("none", "all")]
    if [r for r in trackers if r not in TRACKERS]:
        raise file.refuse("report_to", f"- hwft reports to {', '.join(sorted(TRACKERS))} (or a plugin's logger)")
    if trackers:
        output["report_to"] = trackers
    if file.get("run_name"):
        output["project"] = str(file.get("run_name"))
    return output


def _deepspeed(path: str, source: Path, t: Translation) -> dict:
    """parallel settings of LLaMA-Factory's ``deepspeed:`` file: the file itself where it is
    found, else the stage and offloading its name says (``ds_z3_offload_config.json``)."""
    found = _find(path, source)
    if found is not None:
        try:
            config = json.loads(found.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{source}: deepspeed: {path} is not a readable DeepSpeed JSON config ({exc})") from None
        stage = int(config.get("zero_optimization", {}).get("stage", 0))
        if stage == 0:
            t.notes.append(f"deepspeed {path}: ZeRO stage 0 is plain data parallelism: parallel.strategy ddp.")
            return {"strategy": "ddp"}
        return {"strategy": "deepspeed", "zero_stage": stage, "deepspeed_config": str(found)}
    name = Path(path).name
    for stage in (0, 2, 3):
        if name.startswith(f"ds_z{stage}"):
            offload = "offload" in name
            t.notes.append(
                f"deepspeed {path}: not found here; read from its name as ZeRO stage {stage}"
                f"{' with CPU offload' if offload else ''} (LLaMA-Factory's examples/deepspeed file)."
            )
            if stage == 0:
                return {"strategy": "ddp"}
            return {
                "strategy": "deepspeed",
                "zero_stage": stage,
                "offload_optimizer": offload,
                "offload_params": offload and stage == 3,
            }
    raise RecipeError(
        f"{source}: deepspeed: {path} is neither a file here nor one of LLaMA-Factory's "
        "ds_z{0,2,3}[_offload]_config.json; give the DeepSpeed JSON's path"
    )
