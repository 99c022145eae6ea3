"""Which torch-npu goes with which torch and which CANN toolkit.

A torch-npu wheel is built against one torch release and one CANN release; mixing them is the
failure Ascend users report most (missing symbols, "ACL stream synchronize failed", a hang at
the first kernel). The table is Ascend's own ("Ascend Auxiliary Software" in the README of
github.com/Ascend/pytorch and its release notes): CANN version -> (torch, torch-npu) pairs.
"""

from __future__ import annotations

import re

#: CANN toolkit -> the (torch, torch-npu) releases built for it.
TABLE: dict[str, tuple[tuple[str, str], ...]] = {
    "8.5.0": (("2.9.0", "2.9.0"), ("2.8.0", "2.8.0.post2"), ("2.7.1", "2.7.1.post2"), ("2.6.0", "2.6.0.post5")),
    "8.2.RC1": (("2.6.0", "2.6.0"), ("2.5.1", "2.5.1.post1"), ("2.1.0", "2.1.0.post13")),
    "8.1.RC1": (("2.5.1", "2.5.1"), ("2.4.0", "2.4.0.post4"), ("2.3.1", "2.3.1.post6"), ("2.1.0", "2.1.0.post12")),
    "8.0.0": (("2.4.0", "2.4.0.post2"), ("2.3.1", "2.3.1.post4"), ("2.1.0", "2.1.0.post10")),
    "8.0.RC3": (("2.4.0", "2.4.0"), ("2.3.1", "2.3.1.post2"), ("2.1.0", "2.1.0.post8")),
    "8.0.RC2": (("2.3.1", "2.3.1"), ("2.2.0", "2.2.0.post2"), ("2.1.0", "2.1.0.post6")),
    "8.0.RC1": (("2.2.0", "2.2.0"), ("2.1.0", "2.1.0.post4")),
    "7.0.0": (("2.1.0", "2.1.0"), ("2.0.1", "2.0.1.post1")),
}


def release(version: str) -> str:
    """'2.5.1+cpu' or '2.5.1.post1' -> '2.5.1'."""
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group(0) if match else version


def cann_release(version: str) -> str:
    """A CANN version as the table names it: '8.0.RC1.alpha003' -> '8.0.RC1', '8.5.0.1' -> '8.5.0'."""
    parts = version.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 else version


def problem(torch_version: str, npu_version: str, cann_version: str | None) -> str | None:
    """Why this combination will not work, naming what would; None when it is fine or unknown.

    The torch release must equal the one torch-npu was built for (its version's first three
    numbers). The CANN toolkit is checked only for torch-npu releases in the table; an unknown
    torch-npu (newer than the table) is left to torch-npu's own checks.
    """
    if release(torch_version) != release(npu_version):
        return (
            f"torch-npu {npu_version} is built for torch {release(npu_version)}, but torch "
            f"{torch_version} is installed; install torch=={release(npu_version)} (or the "
            f"torch-npu built for torch {release(torch_version)})"
        )
    if cann_version is None:
        return None
    cann = cann_release(cann_version)
    known = {npu: c for c, pairs in TABLE.items() for _, npu in pairs}
    wanted = [c for c, pairs in TABLE.items() if any(npu == npu_version for _, npu in pairs)]
    if npu_version in known and cann not in wanted:
        fitting = [npu for _, npu in TABLE.get(cann, ())]
        hint = f"; for CANN {cann} install torch-npu {' or '.join(fitting)}" if fitting else ""
        return f"torch-npu {npu_version} needs CANN {' or '.join(wanted)}, but CANN {cann_version} is installed{hint}"
    return None
