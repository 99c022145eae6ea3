"""Is an Ascend NPU here, and with which software? Cheap, and without side effects until asked.

Nothing is imported at hwft import. The probe first reads installed versions (torch, torch-npu)
and the CANN toolkit's version file, and refuses a known-bad combination with what would work
(:mod:`hwft_ascend.compat`) before importing ``torch_npu`` at all; only then does it import
``torch_npu`` (which registers ``torch.npu``) to count devices and ask about bf16 (the 910A
has none; 910B does). ``ASCEND_RT_VISIBLE_DEVICES`` selects devices, as CUDA_VISIBLE_DEVICES
does on NVIDIA.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from functools import cache
from pathlib import Path

from hwft.records import Availability
from hwft_ascend import compat
from hwft_torch.devices import dist_version, engine_details, missing_engine

DEFAULT_TOOLKIT = "/usr/local/Ascend/ascend-toolkit/latest"


def toolkit_home() -> Path:
    """The CANN toolkit folder, as set_env.sh exports it."""
    return Path(os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH") or DEFAULT_TOOLKIT)


def cann_version(home: Path | None = None) -> str | None:
    """The toolkit's version from ``<home>/<arch>-linux/ascend_toolkit_install.info``."""
    home = home or toolkit_home()
    info = home / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
    try:
        for line in info.read_text(encoding="utf-8").splitlines():
            if line.startswith("version="):
                return line.split("=", 1)[1].strip()
    except OSError:
        return None
    return None


@cache
def probe_npu() -> Availability:
    missing = missing_engine()
    if missing:
        return Availability(False, missing)
    if importlib.util.find_spec("torch_npu") is None:
        return Availability(
            False,
            "torch_npu is not installed (pip install torch-npu built for your torch and CANN; "
            "hwft_ascend/compat.py lists the combinations)",
        )
    torch_version = dist_version("torch") or "?"
    npu_version = dist_version("torch-npu") or dist_version("torch_npu") or "?"
    cann = cann_version()
    problem = compat.problem(torch_version, npu_version, cann)
    if problem:
        return Availability(False, problem)
    try:
        import torch
        import torch_npu  # noqa: F401  # pyright: ignore[reportMissingImports] - registers torch.npu
    except Exception as exc:  # noqa: BLE001 - any import failure is the reason
        return Availability(
            False,
            f"import torch_npu failed ({type(exc).__name__}: {exc}); is the CANN environment set? "
            f"(source {toolkit_home().parent}/set_env.sh)",
        )
    npu = torch.npu  # pyright: ignore[reportAttributeAccessIssue] - torch_npu adds torch.npu
    if not npu.is_available():
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return Availability(
            False,
            "no Ascend NPU visible (see npu-smi info"
            + (f"; ASCEND_RT_VISIBLE_DEVICES={visible}" if visible is not None else "")
            + ")",
        )
    devices = tuple({"index": i, "name": npu.get_device_name(i)} for i in range(npu.device_count()))
    return Availability(
        True,
        devices=devices,
        details={
            **engine_details(),
            "torch_npu": npu_version,
            "cann": cann or "unknown",
            "bf16": bool(npu.is_bf16_supported()),
            "ASCEND_RT_VISIBLE_DEVICES": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
        },
    )
