"""A run's log holds hwft's own lines (hwft.library_noise): DeepSpeed's and bitsandbytes' start-up
warnings, which their importers (transformers' save_pretrained, peft) trigger in runs that use
neither library, stay out of it; their other warnings still show. Real runs are held to it
where they run as a user types them: every `hwft train --nproc 2` of tests/test_parallel.py
(LoRA and full models, ddp, fsdp2 and DeepSpeed) passes tests.conftest.foreign_lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings


def test_the_startup_lines_are_dropped_and_other_warnings_kept(caplog, monkeypatch):
    from hwft import library_noise

    library_noise.quiet()
    library_noise.quiet()  # twice is once
    ops, ds = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("DeepSpeed")
    assert len(ops.filters) == 1 and len(ds.filters) == 1
    ops.warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels`",
        "No module named 'kernels'",
    )
    ops.warning("something else went wrong")
    monkeypatch.setattr(ds, "propagate", True)  # DeepSpeed's own handler prints on stdout; caplog listens here
    ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    ds.warning("a real DeepSpeed warning")
    said = [r.getMessage() for r in caplog.records]
    assert "something else went wrong" in said and "a real DeepSpeed warning" in said
    assert not any("kernels-community" in m or "Setting accelerator" in m for m in said), said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        library_noise.quiet()
        # as the libraries warn, from their own frames (no stacklevel)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)  # noqa: B028
        warnings.warn("something else is deprecated", FutureWarning)  # noqa: B028
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_a_closed_pipe_ends_a_command_quietly():
    """`hwft env | head -1` where the reader is gone before hwft writes: hwft stops with 141, as
    a shell reports SIGPIPE, and prints no traceback."""
    read, write = os.pipe()
    os.close(read)  # no reader: every write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hwft", "env"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "HWFT_PARENT_PID"},
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, ""), done.stderr
