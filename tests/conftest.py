"""Shared fixtures: tiny models built here, recipes written here, the CLI run in-process."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# A failure hwft did not foresee is one line for a user (hwft.entry.failure); in the suite its
# traceback is printed too, so that a failing test shows where.
os.environ["HWFT_TRACEBACKS"] = "1"

REPO = Path(__file__).resolve().parents[1]
PEER_DATA = REPO.parent / "shared" / "peer-data"

from hwft.testing.tiny import build_tiny_model  # noqa: E402  (the conformance suite's own)


def pytest_configure(config):
    """The conformance suite (tests/test_conformance.py) checks every available backend unless
    --hwft-backend names others (the xpu plugin: through `hwft plugins check xpu`, there)."""
    if config.getoption("hwft_backend", default=None):
        return
    from hwft.plugins import get_host, reset_host
    from hwft.select import rank

    names = rank(get_host())
    reset_host()
    config.option.hwft_backend = [",".join(names)]


#: Modules whose tests take longest (launched processes, compiles), run first: the two workers of
#: ci/test.sh take whole modules (--dist loadscope, which keeps a module's shared fixtures on one
#: worker), so the longest first leaves the short ones to even out the end. On a fresh clone
#: (CI) Inductor's cache is cold and test_compile is the second longest (213 s there, 50 s warm).
LONGEST_FIRST = (
    "test_parallel",
    "test_recipe_matrix",
    "test_plan",
    "test_sharded_loading",
    "test_compile",
    "test_board",
    "test_conformance",
    "test_families",
    "test_processes",
    "test_use",
    "test_resume",
    "test_bench",
    "test_methods",
    "test_mlx",
    "test_models",
    "test_faults",
)


def pytest_collection_modifyitems(config, items):
    """The longest modules first (LONGEST_FIRST); hardware-marked tests run only where that
    hardware is."""
    # The conformance suite's family matrix on the built-in backends: tests/test_families.py holds
    # cpu and mlx to more than it checks (each other's losses step by step, three cells per
    # family); the template plugin's run keeps it, as a vendor's does.
    matrix = "test_every_family_trains_and_gives_the_cpu_reference_s_logits["
    kept = [item for item in items if not item.nodeid.split("::")[-1].startswith(matrix)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable
    present = {"cuda": _has_cuda(), "rocm": _has_rocm(), "npu": _has_npu()}
    for item in items:
        for mark, here in present.items():
            if mark in item.keywords and not here:
                item.add_marker(pytest.mark.skip(reason=f"needs a {mark} device"))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.version.hip is None
    except ImportError:
        return False


def _has_rocm() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.version.hip is not None
    except ImportError:
        return False


def _has_npu() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_npu") is not None


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted once into the hwft cache)."""
    from hwft.models import materialise, resolve_model

    return materialise(resolve_model("smollm2-135m"), log=lambda m: None)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded SmolLM2's tokenizer (converted alone where the weights are not yet)."""
    from hwft.testing.tiny import embedded_tokenizer_dir

    return embedded_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    """The tiny models' tokenizer: SmolLM2's, cut to its first 4096 tokens (hwft.testing.tiny)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory, tokenizer_dir):
    """family -> a tiny vision-language model of it (hwft.testing.tiny.build_tiny_vision_model),
    built once per session on first use."""
    from hwft.testing.tiny import build_tiny_vision_model

    made: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in made:
            made[family] = build_tiny_vision_model(family, tmp_path_factory.mktemp(family), tokenizer_dir)
        return made[family]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_dir, seed=1)


from hwft.testing.cells import CHATS  # noqa: E402

SAMPLE_ROWS = copy.deepcopy(list(CHATS))  #: a test may change its rows; the method's cell keeps its own

#: A library's line in a log: logging's and DeepSpeed's formats, torch's own (W1201 12:00:00...),
#: Python warnings, progress bars. A run's log holds hwft's own lines only (hwft.library_noise).
FOREIGN_LINE = re.compile(
    r"\[(WARNING|INFO|DEBUG)\]|^[WI]\d{4} \d\d:|Warning: |warnings\.warn|it/s\]|"
    r"kernels-community|Setting accelerator|OMP_NUM_THREADS"
)


def foreign_lines(*outputs: str) -> list[str]:
    """The lines of a command's stdout and stderr that are not hwft's own."""
    return [line for text in outputs for line in text.splitlines() if FOREIGN_LINE.search(line)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(folder: Path, model: str | Path | dict, **sections) -> Path:
    """A small valid recipe in ``folder`` (data written beside it) with sections overridden."""
    data = write_jsonl(folder / "train.jsonl", SAMPLE_ROWS)
    recipe = {
        "model": model if isinstance(model, dict) else str(model),
        "data": {"train": [{"path": data.name}]},
        "method": {"objective": "sft", "tuning": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "train": {"lr": 1e-3, "max_steps": 3, "micro_batch_size": 3, "max_length": 64, "precision": "fp32", "seed": 7},
        "backend": "cpu",
        "output": {"dir": str(folder / "out")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture
def cli(capsys):
    """Run ``hwft`` in-process: returns (exit code, stdout, stderr)."""
    from hwft import cli as hwft_cli
    from hwft.plugins import reset_host

    def run(*args: str):
        reset_host()
        code = hwft_cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
