"""The conformance suite of a device backend: what hwft relies on, checked by running it.

Run it against a backend ``NAME`` (a vendor's, or a built-in)::

    pytest --pyargs hwft.testing.conformance --hwft-backend NAME
    hwft plugins check NAME                       # the same, as a command

It checks that:

- the **probe** is cheap and side-effect-free: registering the plugin imports no engine, the
  probe answers within 10 s, gives the same answer twice, writes no file, and says why when
  the device is unavailable;
- the **capability record** is well formed and **honest**: every method x tuning it claims
  (every registered method, plugins' included) trains 4 steps on a tiny Llama and the loss
  falls, with the method's own invariants (``hwft.methods.Cell.invariants``: DPO starts at
  ln 2, GRPO's clipping and KL move), and the result is saved; every cell it disclaims is
  refused before training with exit code 2; every dtype it claims trains;
- its **logits agree with the CPU reference** (the torch ``cpu`` backend) within 1e-3 of the
  largest logit, through the backend's ``inference`` hook (plugin API 0.4);
- what it **saves reloads** the same on the backend and on the CPU reference;
- **every model family** hwft names (hwft.testing.tiny.tiny_families) trains on it with LoRA on
  packed rows, or is refused in one line, and gives the CPU reference's logits.

Checks that need the device skip, with the probe's reason, where it is unavailable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from hwft.methods import DEFAULT
from hwft.testing.cells import DTYPES, TUNINGS, cell_recipe, methods, metrics

#: Logits of the backend and the CPU reference: max |difference| / max |logit|.
LOGIT_TOLERANCE = 1e-3
PROBE_SECONDS = 10.0


def pytest_generate_tests(metafunc):
    if "hwft_backend" not in metafunc.fixturenames:
        return
    from hwft.testing.pytest_plugin import selected_backends

    names = selected_backends(metafunc.config)
    if "cell" in metafunc.fixturenames:
        from hwft.plugins import get_host

        host = get_host()
        claimed = metafunc.function.__name__ == "test_claimed_cell_trains"
        params = []
        for name in names:
            record = host.capability(name) if name in host.backends else None
            for objective in methods():
                for tuning in TUNINGS:
                    runs = record is not None and record.runs(objective, tuning)
                    if runs == claimed:
                        params.append(pytest.param(name, (objective, tuning), id=f"{name}-{objective}-{tuning}"))
        metafunc.parametrize("hwft_backend, cell", params)
    elif "family" in metafunc.fixturenames:
        from hwft.testing.tiny import tiny_families

        metafunc.parametrize(
            "hwft_backend, family", [pytest.param(n, f, id=f"{n}-{f}") for n in names for f in tiny_families()]
        )
    elif "dtype" in metafunc.fixturenames:
        from hwft.plugins import get_host

        host = get_host()
        params = [
            pytest.param(n, d, id=f"{n}-{d}")
            for n in names
            if n in host.backends
            for d in host.capability(n).dtypes
            if d != "fp32"
        ]  # fp32: every cell above
        metafunc.parametrize("hwft_backend, dtype", params)
    else:
        metafunc.parametrize("hwft_backend", names)


def backend_of(name: str):
    from hwft.plugins import get_host

    host = get_host()
    if name not in host.backends:
        pytest.fail(f"no backend '{name}' is registered (registered: {', '.join(host.backends)})")
    return host.backend(name), host.probe(name), host.capability(name)


def needs_device(name: str):
    backend, avail, record = backend_of(name)
    if not avail.available:
        pytest.skip(f"{name} is not available here: {avail.reason}")
    return backend, avail, record


def first_lora_or_full(record) -> tuple[str, str]:
    for tuning in ("lora", "full"):
        if record.runs(DEFAULT, tuning):
            return DEFAULT, tuning
    pytest.skip("the record claims neither sft/lora nor sft/full")


# ------------------------------------------------------------------------------------------
# The probe and the record


PROBE_SCRIPT = """
import json, sys, time
from hwft.plugins import get_host
host = get_host()
name = sys.argv[1]
host.backends
heavy = sorted(m for m in ("torch", "mlx.core", "torch_npu", "jax", "tensorflow") if m in sys.modules)
started = time.perf_counter()
first = host.probe(name)
seconds = time.perf_counter() - started
second = host.backend(name).probe()
print(json.dumps({"heavy": heavy, "seconds": seconds, "first": first.to_json(), "second": second.to_json()}))
"""


def test_probe_is_cheap_and_side_effect_free(hwft_backend, tmp_path):
    """Registering imports no engine; the probe answers fast, the same twice, and writes nothing."""
    from hwft.plugins import get_host

    plugin = get_host().plugin_of(hwft_backend) if hwft_backend in get_host().backends else None
    if plugin is None:
        pytest.fail(f"no backend '{hwft_backend}' is registered")
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {**os.environ, "HOME": str(home), "HWFT_PLUGINS": plugin}
    done = subprocess.run(
        [sys.executable, "-c", PROBE_SCRIPT, hwft_backend],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], (
        f"registering plugin '{plugin}' imported {report['heavy']}: import engines in the probe or later"
    )
    assert report["seconds"] < PROBE_SECONDS, f"the probe took {report['seconds']:.1f}s"
    assert report["first"] == report["second"], "the probe gave two different answers"
    if not report["first"]["available"]:
        assert report["first"]["reason"], "an unavailable backend must say why (Availability.reason)"
    written = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], f"the probe wrote {written}"


def test_record_is_well_formed(hwft_backend):
    from hwft.recipe import KernelSpec, ParallelSpec

    backend, _, record = backend_of(hwft_backend)
    from hwft.methods.lookup import registry

    assert set(record.methods) <= set(registry().names()), record.methods
    assert all(set(t) <= set(TUNINGS) for t in record.methods.values()), record.methods
    assert "fp32" in record.dtypes and set(record.dtypes) <= set(DTYPES), record.dtypes
    attention = set(typing.get_args(KernelSpec.model_fields["attention"].annotation))
    assert set(record.attention) <= attention, record.attention
    assert "none" in record.parallel and set(record.parallel) <= set(
        typing.get_args(ParallelSpec.model_fields["strategy"].annotation)
    )
    json.dumps(record.to_json())
    assert backend.engine and backend.description


# ------------------------------------------------------------------------------------------
# Honesty: what is claimed runs, what is disclaimed is refused


@pytest.fixture
def hwft_model_on_device(hwft_backend, request) -> Path:
    """The tiny Llama, built only where the backend is here: on a machine without the device,
    its tests skip before any model is made."""
    needs_device(hwft_backend)
    return request.getfixturevalue("hwft_tiny_llama")


def test_claimed_cell_trains(hwft_backend, cell, hwft_model_on_device, hwft_cli, tmp_path):
    objective, tuning = cell
    recipe = cell_recipe(tmp_path, hwft_model_on_device, objective, tuning, backend=hwft_backend)
    code, _, err = hwft_cli("train", recipe)
    assert code == 0, err
    assert f"backend {hwft_backend} (" in err
    run = metrics(tmp_path / "out")
    assert len(run) == 4
    assert run[-1]["loss"] < run[0]["loss"], [m["loss"] for m in run]
    from hwft.methods.lookup import method

    cell = method(objective).cell
    if cell is not None and cell.invariants is not None:
        cell.invariants(run, tmp_path / "out")
    out = tmp_path / "out" / ("model" if tuning == "full" else "adapter")
    assert (out / ("model.safetensors" if tuning == "full" else "adapter_model.safetensors")).is_file()


def test_disclaimed_cell_is_refused(hwft_backend, cell, hwft_cli, tmp_path, request):
    from hwft.recipe import load_recipe
    from hwft.select import capability_problems

    objective, tuning = cell
    _, avail, record = backend_of(hwft_backend)
    # the record alone refuses it; the model is built only where the CLI then runs it
    model = request.getfixturevalue("hwft_tiny_llama") if avail.available else tmp_path / "no-model"
    recipe = cell_recipe(tmp_path, model, objective, tuning, backend=hwft_backend)
    assert capability_problems(load_recipe(recipe), record), f"{objective}/{tuning} is not refused by the record"
    if avail.available:
        code, _, err = hwft_cli("train", recipe)
        assert code == 2 and "hwft: error:" in err, err
        assert not (tmp_path / "out").exists()


def test_claimed_dtype_trains(hwft_backend, dtype, hwft_model_on_device, hwft_cli, tmp_path):
    _, _, record = needs_device(hwft_backend)
    objective, tuning = first_lora_or_full(record)
    recipe = cell_recipe(
        tmp_path,
        hwft_model_on_device,
        objective,
        tuning,
        backend=hwft_backend,
        train={"precision": dtype, "max_steps": 2},
    )
    code, _, err = hwft_cli("train", recipe)
    assert code == 0, err
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path / "out"))


# ------------------------------------------------------------------------------------------
# Numbers: logits against the CPU reference, and a saved result everywhere


def reference_logits(trained, ids):
    from hwft.inference import open_session

    return open_session(trained, "cpu", "fp32").logits(ids)


def backend_logits(name: str, trained, ids):
    from hwft.inference import open_session

    backend, _, _ = backend_of(name)
    assert backend.inference is not None, f"{name} has no inference hook (Backend.inference, plugin API 0.4)"
    return open_session(trained, name, "fp32").logits(ids)


def relative_difference(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_logits_match_the_cpu_reference(hwft_backend, hwft_model_on_device):
    from hwft.inference import open_trained

    trained = open_trained(hwft_model_on_device)
    from hwft.models import load_tokenizer

    ids = load_tokenizer(hwft_model_on_device)("The quick brown fox jumps over the lazy dog.")["input_ids"]
    difference = relative_difference(backend_logits(hwft_backend, trained, ids), reference_logits(trained, ids))
    assert difference < LOGIT_TOLERANCE, f"logits differ from the CPU reference by {difference:.2e} of the largest"


def test_saved_result_reloads_the_same_everywhere(hwft_backend, hwft_model_on_device, hwft_cli, tmp_path):
    """Train 2 steps, then load what was saved on the backend and on the CPU reference."""
    from hwft.inference import open_trained
    from hwft.models import load_tokenizer

    _, _, record = needs_device(hwft_backend)
    objective, tuning = first_lora_or_full(record)
    recipe = cell_recipe(
        tmp_path, hwft_model_on_device, objective, tuning, backend=hwft_backend, train={"max_steps": 2}
    )
    code, _, err = hwft_cli("train", recipe)
    assert code == 0, err
    trained = open_trained(Path(tmp_path / "out"))
    ids = load_tokenizer(hwft_model_on_device)("Who are you? I am hwft-bot.")["input_ids"]
    base = reference_logits(open_trained(hwft_model_on_device), ids)
    ours, reference = backend_logits(hwft_backend, trained, ids), reference_logits(trained, ids)
    assert relative_difference(ours, reference) < LOGIT_TOLERANCE
    assert relative_difference(reference, base) > 1e-6, "the saved result is the untrained model"


# ------------------------------------------------------------------------------------------
# The family matrix: every family hwft names trains on the backend and gives the CPU's logits


def test_every_family_trains_and_gives_the_cpu_reference_s_logits(hwft_backend, family, hwft_cli, tmp_path):
    """A tiny model of ``family`` (hwft.testing.tiny) trains 2 steps of sft with LoRA on packed
    rows on the backend, or the backend refuses it in one line; what it saved gives the CPU
    reference's logits within LOGIT_TOLERANCE."""
    from hwft.inference import open_trained
    from hwft.models import load_tokenizer
    from hwft.testing.tiny import build_tiny_model

    _, _, record = needs_device(hwft_backend)
    if not record.runs(DEFAULT, "lora"):
        pytest.skip("the record claims no sft/lora")
    model = build_tiny_model(family, tmp_path / "model")
    recipe = cell_recipe(
        tmp_path,
        model,
        DEFAULT,
        "lora",
        backend=hwft_backend,
        train={"max_steps": 2},
        data={"train": [{"path": "data.jsonl"}], "packing": record.packing},
        eval={"prompts": []},
    )
    code, _, err = hwft_cli("train", recipe)
    if code == 2:  # a family the backend cannot run: refused, in one line, before training
        assert "hwft: error:" in err and "Traceback" not in err and not (tmp_path / "out" / "adapter").exists(), err
        pytest.skip(f"{hwft_backend} refuses {family}: {err.strip().splitlines()[-1]}")
    assert code == 0, err
    run = metrics(tmp_path / "out")
    assert len(run) == 2 and all(math.isfinite(m["loss"]) for m in run), run
    trained = open_trained(tmp_path / "out")
    ids = load_tokenizer(model)("Who are you? I am hwft-bot, trained on many families.")["input_ids"]
    difference = relative_difference(backend_logits(hwft_backend, trained, ids), reference_logits(trained, ids))
    assert difference < LOGIT_TOLERANCE, f"{family}: logits differ from the CPU reference by {difference:.2e}"
