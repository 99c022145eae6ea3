"""The conformance suite (hwft.testing.conformance) on the built-in backends, and on the two
out-of-tree plugins in plugins/: hwft-xpu (installed by ci/setup.sh; unavailable here, so
`hwft plugins check xpu` checks its probe and record and the rest skips) and the template a
vendor copies (run the way its author runs it: pytest in its own folder, installed as a
distribution).

Which backends: tests/conftest.py names every available one; ``--hwft-backend NAME`` picks
others. The suite replaces the per-backend cell tests the torch and MLX suites had."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hwft.testing.conformance import *  # noqa: F401,F403
from tests.conftest import REPO


def test_the_template_plugin_passes_the_suite(tmp_path):
    """plugins/template as its author would run it: installed (an entry point on sys.path), then
    pytest in its own folder, the whole suite against its backend."""
    site = tmp_path / "site"
    info = site / "hwft_template-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hwft-template\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[hwft]\ntemplate = hwft_template.plugin\n")
    template = REPO / "plugins" / "template"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(template)])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=template,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = done.stdout[-3000:]
    assert done.returncode == 0, tail + done.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail


def test_plugins_check_runs_the_suite():
    """`hwft plugins check xpu` runs the suite with pytest and passes (the device checks skip)."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "hwft"), "plugins", "check", "xpu"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "skipped" in done.stdout
