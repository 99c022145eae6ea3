"""A run's log holds hwft's own lines (hwft.library_noise): DeepSpeed's and bitsandbytes' start-up
warnings, which their importers (transformers' save_pretrained, peft) trigger in runs that use
neither library, stay out of it; their other warnings still show."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from tests.conftest import write_recipe

#: What a library's line looks like in a log: logging's and DeepSpeed's formats, Python
#: warnings, progress bars.
FOREIGN = re.compile(r"\[(WARNING|INFO|DEBUG)\]|^\w*(Warning|Error):|warnings\.warn|it/s\]|kernels-community")


def test_a_full_fine_tune_logs_only_hwft_lines(tiny_llama, tmp_path):
    """Full tuning saves through transformers' save_pretrained, which imports DeepSpeed (whose
    import said "Setting accelerator to CPU" on stdout); peft imported bitsandbytes on the way."""
    path = write_recipe(tmp_path, tiny_llama, method={"objective": "sft", "tuning": "full"},
                        train={"max_steps": 1}, eval={"prompts": ["Hi"], "max_new_tokens": 2})
    done = subprocess.run([sys.executable, "-m", "hwft", "train", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    foreign = [line for line in (done.stdout + done.stderr).splitlines() if FOREIGN.search(line)]
    assert foreign == [], foreign
    assert done.stdout.splitlines()[-1].startswith("done: results in")


def test_the_startup_lines_are_dropped_and_other_warnings_kept(caplog):
    from hwft import library_noise

    library_noise.quiet()
    library_noise.quiet()  # twice is once
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(ops.filters) == 1
    ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                "`pip install kernels`", "No module named 'kernels'")
    ops.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_a_closed_pipe_ends_a_command_quietly():
    """`hwft env | head -1` where the reader is gone before hwft writes (here `true`, which reads
    nothing): hwft stops with 141, as a shell reports SIGPIPE, and prints no traceback."""
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -m hwft env | true; exit ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (141, ""), done.stderr
