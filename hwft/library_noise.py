"""Lines of libraries that say nothing to an hwft user, kept out of a run's log.

hwft imports DeepSpeed and bitsandbytes only where a recipe needs them, but its dependencies
import them anyway: ``import peft`` imports bitsandbytes whenever it is installed, and
transformers' ``save_pretrained`` imports DeepSpeed (to ask about ZeRO-3). On import each says
something that is noise to an hwft user, so the lines below are dropped, by logger and by the
start of the message; every other warning of those libraries still shows. Likewise the
deprecation warnings torch gives DeepSpeed for the collectives it calls (a library's own
business, printed once per rank and call site).
"""

from __future__ import annotations

import logging
import os
import warnings

#: logger name -> starts of the messages dropped, each with where it comes from.
STARTUP_LINES = {
    # deepspeed/accelerator/real_accelerator.py, on import wherever no GPU is found
    "DeepSpeed": ("Setting accelerator to CPU", "Setting ds_accelerator to"),
    # bitsandbytes/backends/cpu/ops.py, on import on CPUs with AVX512-BF16: it wants to download
    # a kernel from the Hugging Face hub, which hwft never does
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


#: (category, message pattern) of Python warnings dropped, each with where it comes from.
WARNINGS = (
    # torch/distributed/c10d_logger.py, when DeepSpeed's ZeRO calls all_gather_into_tensor and
    # reduce_scatter_tensor
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
)


class StartupLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet() -> None:
    """Drop the STARTUP_LINES and WARNINGS from now on (the loggers exist before their libraries import:
    a library that configures its logger later keeps the filter), and libraries' progress bars
    (tqdm reads TQDM_DISABLE when it is imported; hwft draws its own progress)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name, starts in STARTUP_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, StartupLines) for f in logger.filters):
            logger.addFilter(StartupLines(starts))
    for category, pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
