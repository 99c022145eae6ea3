"""The torch engine's part of ``hwft bench``: model dimensions for the FLOP model, the device's
peak FLOP/s, the held-out loss, and the baseline arm a user would otherwise run.

The baselines (``--baseline hf``, ``--baseline hf-liger``) are the tutorial path, with their
arguments fixed (:func:`baseline_arguments`, from the recipe's ``bench.baseline``): transformers
``Trainer`` + peft LoRA r=16, alpha=32 on all linear layers, SDPA attention, lr 1e-4, the recipe's
baseline micro-batch and gradient checkpointing, padding to the longest in the batch with
``DataCollatorForSeq2Seq``, fp32 or bf16, everything else at the libraries' defaults; ``hf-liger``
adds the Trainer's ``use_liger_kernel`` (Liger's Triton kernels: CUDA and ROCm). Each trains on
the very sequences the hwft arm trained on (hwft's tokenisation, truncated at max length), one
pass, in the Trainer's own shuffled order. A model.shape is built as the hwft arm builds it:
from its config on the device, seeded by train.seed, in bf16 for a bf16 arm whose config says
bf16 (as ``from_pretrained``'s ``dtype="auto"`` loads such a checkpoint), else fp32.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hwft_torch.host_memory import cpu_peak_rss
from hwft_torch.memory_plan import devices as memory_devices
from hwft_torch.memory_plan import shape as memory_shape  # hwft plan's measurements
from hwft_torch.objective import held_out_loss
from hwft_torch.unwrap import base_model

#: The baseline's model-defining arguments (hwft.bench.runner.BASELINE_MODEL checks the recipe
#: against them).
BASELINE_LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
#: The baselines hwft bench runs: the Trainer's extra arguments for each.
BASELINES = {"hf": {}, "hf-liger": {"use_liger_kernel": True}}


def baseline_arguments(spec, max_length: int, kind: str = "hf") -> dict:
    """The baseline's fixed arguments (``spec``: the recipe's bench.baseline), printed by
    ``hwft bench`` and stored in its result."""
    return {
        "trainer": "transformers.Trainer",
        "attn_implementation": "sdpa",
        "per_device_train_batch_size": spec.micro_batch_size,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "max_length": max_length,
        "lora": BASELINE_LORA,
        "learning_rate": 1e-4,
        "collator": "DataCollatorForSeq2Seq(padding='longest')",
        "num_train_epochs": 1,
        **BASELINES[kind],
    }


#: Dense (no sparsity) peak FLOP/s from vendors' spec sheets, by device-name fragment and dtype.
SPEC_SHEET = {
    ("H200", "bf16"): 989e12,
    ("H100 SXM", "bf16"): 989e12,
    ("H100 80GB HBM3", "bf16"): 989e12,
    ("H100 NVL", "bf16"): 835e12,
    ("H100 PCIe", "bf16"): 756e12,
    ("A100", "bf16"): 312e12,
    ("MI300X", "bf16"): 1307e12,
    ("H200", "fp32"): 67e12,
    ("H100", "fp32"): 67e12,
    ("A100", "fp32"): 19.5e12,
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

__all__ = [
    "BASELINES",
    "baseline_arguments",
    "baseline_arm",
    "device_of",
    "dtype_named",
    "held_out_loss",
    "memory_devices",
    "memory_shape",
    "model_dims",
    "peak_flops",
    "process_peak_rss",
]


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def dtype_named(name: str) -> torch.dtype:
    return DTYPES[name]


process_peak_rss = cpu_peak_rss


def model_dims(model) -> dict:
    """Parameter counts the FLOP model needs: the frozen or trained linear weights of the body
    (``linear``), adapter weights (``adapter``), the output layer (``head``: vocabulary x width),
    and the attention width (heads x head dim) times layers (``attention``)."""
    base = base_model(model)
    head = base.get_output_embeddings()
    linear = adapter = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:  # bitsandbytes' layers are Linears too
            continue
        size = module.in_features * module.out_features
        if ".lora_" in name:
            adapter += size
        else:
            linear += size
    config = base.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "linear": linear,
        "adapter": adapter,
        "head": head.in_features * head.out_features if head is not None else 0,
        "attention": heads * head_dim * config.num_hidden_layers,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def peak_flops(device: torch.device, dtype: torch.dtype, device_name: str = "") -> tuple[float, str]:
    """The device's peak matmul FLOP/s in ``dtype``: a spec-sheet figure where one is known for
    the device, else measured (the best of several square matmuls)."""
    dname = DTYPE_NAMES[dtype]
    for (fragment, kind), value in SPEC_SHEET.items():
        if kind == dname and fragment in device_name:
            return value, f"spec sheet ({fragment}, {dname}, dense)"
    # On a CPU with few threads a 1024 matmul already runs at the 2048 one's rate, for an eighth
    # of the work (docs/benchmarks.md).
    n = (1024 if torch.get_num_threads() <= 8 else 2048) if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            _ = a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best, f"measured ({n}x{n} {dname} matmul, best of 4)"


def baseline_model(model_path: Path, device: torch.device, bf16: bool, seed: int):
    """The model the baseline trains: the checkpoint as ``from_pretrained`` loads it, or a
    model.shape built on the device (see the module's doc)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hwft.models import has_random_weights

    if not has_random_weights(model_path):
        return AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, attn_implementation="sdpa")
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    says_bf16 = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "")).endswith("bfloat16")
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if bf16 and says_bf16 else torch.float32, attn_implementation="sdpa"
        )


def baseline_arm(
    model_path: Path,
    tokenizer,
    train_rows: list,
    eval_rows: list,
    device: torch.device,
    bf16: bool,
    seed: int,
    arguments: dict,
) -> dict:
    """Train the tutorial baseline (``arguments``: :func:`baseline_arguments`) on ``train_rows``
    (hwft Rows) for one pass; the same result fields the hwft arm reports."""
    import dataclasses
    import os
    import tempfile
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    model = baseline_model(model_path, device, bf16, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, read by peft
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **arguments["lora"]))
    features = [
        {"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.labels, "_id": r.ids[0]}
        for r in train_rows
    ]
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest")
    batches: list[dict] = []

    def counting_collator(items):
        ids = [it.pop("_id") for it in items]
        out = collate(items)
        lengths = [int(n) for n in out["attention_mask"].sum(dim=1)]
        batches.append(
            {
                "tokens": sum(lengths),
                "computed": out["input_ids"].numel(),
                "trained": int((out["labels"][:, 1:] != -100).sum()),
                "attended": sum(n * (n + 1) // 2 for n in lengths),
                "examples": ids,
            }
        )
        return out

    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize(device)
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    with tempfile.TemporaryDirectory() as out:
        # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; the device's
        # own transformers may be older
        checkpointing = next(
            n
            for n in ("activation_checkpointing", "gradient_checkpointing")
            if n in {f.name for f in dataclasses.fields(TrainingArguments)}
        )
        if arguments["gradient_checkpointing"]:
            extra = {checkpointing: True, f"{checkpointing}_kwargs": {"use_reentrant": False}}
        else:
            extra = {}
        if arguments.get("use_liger_kernel"):
            extra["use_liger_kernel"] = True
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=arguments["per_device_train_batch_size"],
            **extra,
            learning_rate=arguments["learning_rate"],
            num_train_epochs=arguments["num_train_epochs"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            bf16=bf16,
            use_cpu=device.type == "cpu",
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=features,  # pyright: ignore[reportArgumentType] - a list of examples serves as a dataset
            data_collator=counting_collator,
            callbacks=[StepClock()],
        )
        trainer.remove_callback(PrinterCallback)  # hwft bench prints its own summary
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' own renames, called from inside it
            trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [
        {"step": i + 1, "seconds": t, "loss": losses[i] if i < len(losses) else None, **b}
        for i, (t, b) in enumerate(zip(times, batches, strict=False))
    ]
    trained = trainer.model
    eval_loss = held_out_loss(trained, eval_rows, tokenizer.pad_token_id, "sdpa", device) if eval_rows else None
    return {
        "steps": steps,
        "model": trained,
        "eval_loss": eval_loss,
        "dtype": "bf16" if bf16 else "fp32",
        "settings": {**arguments, "bf16": bf16, "seed": seed},
    }


#: The torch device type of each built-in backend; another backend on the torch engine names its
#: device type itself (xpu).
DEVICE_TYPES = {"cpu": "cpu", "cuda": "cuda", "rocm": "cuda", "npu": "npu"}


def memory_kind(backend: str) -> str:
    """What the arm's peak memory measures: the process's RSS on the CPU, device memory elsewhere."""
    return "process-rss" if DEVICE_TYPES.get(backend, backend) == "cpu" else "device"


def baseline_problem(kind: str, backend: str) -> str | None:
    """Why the ``kind`` baseline cannot run on ``backend`` (None: it can), before any arm runs."""
    if kind != "hf-liger":
        return None
    import importlib.util

    if DEVICE_TYPES.get(backend, backend) != "cuda":
        return f"--baseline hf-liger runs Liger's Triton kernels, on CUDA and ROCm only, not on {backend}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "--baseline hf-liger needs the liger-kernel package (pip install liger-kernel)"
    return None


def baseline_run(
    model_path: Path, tokenizer, train_rows: list, eval_rows: list, backend: str, bf16: bool, seed: int, arguments: dict
) -> dict:
    """The Trainer baseline arm on ``backend``'s device: :func:`baseline_arm`'s fields and its
    peak memory (device memory on CUDA and ROCm, the process's peak RSS elsewhere)."""
    device = torch.device(DEVICE_TYPES.get(backend, backend))
    out = baseline_arm(model_path, tokenizer, train_rows, eval_rows, device, bf16, seed, arguments)
    out["peak_memory"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else process_peak_rss()
    return out
