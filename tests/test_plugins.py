"""The plugin host: entry-point discovery, allow/deny lists, failures, API versions, ranking.

Plugins here are real distributions: a module and a ``.dist-info`` folder with
``entry_points.txt`` on ``sys.path``, found by ``importlib.metadata`` as pip-installed ones are.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from hwft import HWFT_PLUGIN_API
from hwft.errors import SelectionError
from hwft.plugins import PluginHost, api_compatible, get_host, reset_host
from hwft.recipe import recipe_from_dict
from hwft.select import rank, select_backend

FAKE_BACKEND = """
import pluggy
from hwft.records import Availability, Backend, Capability
HWFT_PLUGIN_API = {api!r}
hookimpl = pluggy.HookimplMarker("hwft")

def _cap():
    return Capability(methods={{"sft": ("lora",)}}, dtypes=("fp32", "fp16"))

@hookimpl
def hwft_register_backends(register):
    register(Backend({name!r}, "torch", "a test device", {priority},
                     lambda: Availability({available}, "{reason}"), _cap, lambda job: None,
                     accelerator=True))
"""


def make_dist(site: Path, dist: str, module: str, source: str, version: str = "1.2.3") -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[hwft]\n{dist} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions; the host is rebuilt around it."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    reset_host()
    yield folder
    for name in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[name]
    reset_host()


def fake(site, name, priority=300, available=True, reason="", api=HWFT_PLUGIN_API, dist=None):
    dist = dist or f"hwft-{name}"
    make_dist(
        site,
        dist,
        f"fake_{name}",
        FAKE_BACKEND.format(api=api, name=name, priority=priority, available=available, reason=reason),
    )
    return dist


def test_builtin_torch_backend_comes_through_its_entry_point():
    reset_host()
    host = get_host()
    assert {"cpu", "cuda", "rocm", "npu", "mlx"} <= set(host.backends)
    assert host.plugin_of("mlx") == "mlx"
    assert host.plugin_of("cpu") == "torch"
    torch_plugin = next(p for p in host.plugins if p.name == "torch")
    assert torch_plugin.distribution == "hwft-torch" and torch_plugin.status == "loaded"
    # the same hooks a vendor's plugin implements: devices, the engine's methods, its export
    # formats, its kernels and its model-family table
    assert torch_plugin.hooks == [
        "hwft_register_backends",
        "hwft_register_exporters",
        "hwft_register_kernels",
        "hwft_register_method_implementations",
        "hwft_register_model_families",
    ]


def test_vendor_plugin_is_found_and_listed(site, cli):
    fake(site, "vdev")
    code, out, _ = cli("plugins", "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["schema"] == "hwft.plugins/1"
    entry = next(p for p in payload["plugins"] if p["name"] == "hwft-vdev")
    assert entry == {
        "name": "hwft-vdev",
        "module": "fake_vdev",
        "distribution": "hwft-vdev",
        "version": "1.2.3",
        "status": "loaded",
        "error": "",
        "hooks": ["hwft_register_backends"],
    }
    code, out, _ = cli("plugins")
    assert "hwft-vdev" in out and "hooks: hwft_register_backends" in out


def test_broken_plugin_is_reported_not_fatal(site, cli):
    make_dist(site, "hwft-broken", "fake_broken", "raise ImportError('needs libvendor.so')\n")
    fake(site, "vdev")
    host = get_host()
    broken = next(p for p in host.plugins if p.name == "hwft-broken")
    assert broken.status == "failed" and "needs libvendor.so" in broken.error
    assert "vdev" in host.backends and "cpu" in host.backends
    code, out, _ = cli("plugins")
    assert code == 0 and "failed" in out and "ImportError: needs libvendor.so" in out


def test_other_api_version_is_refused_naming_both(site):
    fake(site, "future", api="3.0")
    fake(site, "older", api="1.1")
    fake(site, "undeclared", api=None)
    host = get_host()
    for name, api in (("future", "3.0"), ("older", "1.1")):
        plugin = next(p for p in host.plugins if p.name == f"hwft-{name}")
        assert plugin.status == "refused", plugin
        assert f"plugin API {api}" in plugin.error and f"plugin API {HWFT_PLUGIN_API}" in plugin.error
    assert "how a 1.x plugin moves to 2.0" in plugin.error
    assert not {"future", "older", "undeclared"} & set(host.backends)
    assert api_compatible("2.0", "2.1") and not api_compatible("2.2", "2.1")
    assert not api_compatible("1.1", "2.0") and not api_compatible("0.4", "2.0") and not api_compatible("garbage")


def test_unknown_hook_is_refused(site):
    make_dist(
        site,
        "hwft-typo",
        "fake_typo",
        """
        import pluggy
        HWFT_PLUGIN_API = "2.0"
        hookimpl = pluggy.HookimplMarker("hwft")
        @hookimpl
        def hwft_register_backendz(register):
            pass
    """,
    )
    typo = next(p for p in get_host().plugins if p.name == "hwft-typo")
    assert typo.status == "refused" and "hwft_register_backendz" in typo.error


def test_allow_and_deny_lists(site, monkeypatch):
    fake(site, "vdev")
    monkeypatch.setenv("HWFT_PLUGINS", "hwft-vdev")
    host = get_host()
    assert set(host.backends) == {"vdev"}
    assert next(p for p in host.plugins if p.name == "torch").status == "disabled"
    reset_host()
    monkeypatch.delenv("HWFT_PLUGINS")
    monkeypatch.setenv("HWFT_DISABLE_PLUGINS", "torch, ascend, mlx, xpu, hwft-vdev")
    assert get_host().backends == {}


def test_two_plugins_claiming_one_name_is_an_error(site):
    fake(site, "cpu", dist="hwft-othercpu")
    with pytest.raises(SelectionError, match="backend 'cpu' is registered twice"):
        get_host().backends  # noqa: B018


def test_auto_ranks_by_priority_not_registration_order(site):
    # Names sort so that a registration-order rule would pick 'aaa'; priority must win.
    fake(site, "aaa", priority=100)
    fake(site, "zzz", priority=300)
    fake(site, "gone", priority=900, available=False, reason="no such device")
    host = get_host()
    assert rank(host) == ["zzz", "aaa", "cpu", "mlx"]  # 300, then 100 and 100 by name, then 50
    recipe = recipe_from_dict({"data": "x.jsonl", "train": {"precision": "fp16"}})
    assert select_backend(recipe, host).backend.name == "zzz"
    # Equal priorities: the alphabetically first name, whatever order plugins loaded in.
    entry_points = list(__import__("importlib").metadata.entry_points(group="hwft"))
    for order in (entry_points, entry_points[::-1]):
        h = PluginHost(entry_points=order)
        assert rank(h) == sorted(rank(h), key=lambda n: (-_prio(h, n), n))


def _prio(host, name):
    avail = host.probe(name)
    return avail.priority if avail.priority is not None else host.backend(name).priority


def test_auto_passes_over_a_backend_that_cannot_run_the_recipe(site):
    fake(site, "vdev", priority=300)  # runs sft/lora only
    host = get_host()
    full = recipe_from_dict({"data": "x.jsonl", "method": {"tuning": "full"}})
    assert select_backend(full, host).backend.name == "cpu"
    lora = recipe_from_dict({"data": "x.jsonl"})
    assert select_backend(lora, host).backend.name == "vdev"


def test_refusal_names_the_backend_that_could(site, tmp_path, cli):
    fake(site, "vdev", available=False, reason="vdev driver not loaded")
    recipe = recipe_from_dict({"data": "x.jsonl", "backend": "cpu", "train": {"precision": "fp16"}})
    with pytest.raises(SelectionError) as err:
        select_backend(recipe, get_host())
    assert "vdev (not available here: vdev driver not loaded)" in str(err.value)


def test_env_json_schema(site, cli):
    fake(site, "vdev", available=False, reason="vdev driver not loaded")
    code, out, _ = cli("env", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["schema"] == "hwft.env/1" and report["auto"] == "cpu"
    assert report["plugin_api"] == HWFT_PLUGIN_API
    by_name = {b["name"]: b for b in report["backends"]}
    assert {"cpu", "cuda", "rocm", "vdev"} <= set(by_name)
    vdev = by_name["vdev"]
    assert (vdev["available"], vdev["reason"], vdev["plugin"]) == (False, "vdev driver not loaded", "hwft-vdev")
    cpu = by_name["cpu"]
    assert cpu["available"] and cpu["engine"] == "torch" and cpu["priority"] == 100
    assert set(cpu["capability"]) == {
        "methods",
        "dtypes",
        "quantization",
        "attention",
        "optimizers",
        "compile",
        "collective",
        "parallel",
        "packing",
        "media",
        "media_families",
        "media_data_kinds",
        "media_packing",
        "notes",
        "tunings",
    }
    assert cpu["capability"]["media"] == ["image", "video"]  # hwft.vision's image and video rows
    every = ["full", "lora", "qlora"]
    assert cpu["capability"]["methods"] == {
        m: every for m in ("sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo")
    }
    assert cpu["capability"]["quantization"] == ["bnb-nf4", "bnb-fp4", "bnb-int8"]
    assert cpu["capability"]["packing"] is True
    assert cpu["capability"]["collective"] == "gloo"
    assert "torch" in cpu["details"]
    assert report["not_installed"] == {}  # every fixed name has its plugin
    mlx = by_name["mlx"]  # the MLX CPU build: available, below the torch cpu (priority 50)
    assert (mlx["engine"], mlx["plugin"], mlx["available"], mlx["priority"]) == ("mlx", "mlx", True, 50)
    assert mlx["capability"]["methods"] == {
        m: every for m in ("sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo")
    }
    assert mlx["capability"]["quantization"] == ["mlx-q4", "mlx-q8"] and mlx["capability"]["packing"] is True
    assert report["ranking"][:2] == ["cpu", "mlx"]
    code, out, _ = cli("env")
    assert "vdev" in out and "unavailable: vdev driver not loaded" in out and "backend: auto -> cpu" in out
    # each row's name and value stay apart, however long the name ("no fused_rms_norm")
    rows = [line for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    notes = [line for line in rows if line.startswith("  no ")]
    assert notes and all(re.match(r"  no \S+ {2,}\S", line) for line in notes), notes


def test_data_format_hook(site, tmp_path):
    make_dist(
        site,
        "hwft-qa",
        "fake_qa",
        """
        import pluggy
        from hwft.data.formats import DataFormat
        HWFT_PLUGIN_API = "2.0"
        hookimpl = pluggy.HookimplMarker("hwft")
        def parse(row, columns):
            return [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]
        @hookimpl
        def hwft_register_data_formats(register):
            register(DataFormat("qa", "chat", parse, detect=lambda row, mapping: set(row) == {"q", "a"},
                                description="q/a pairs"))
    """,
    )
    from hwft.data.loading import load_examples

    formats = get_host().data_formats()
    assert {"alpaca", "messages", "qa"} <= set(formats)
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "hi?", "a": "hello"}\n')
    (example,) = load_examples(path, "auto", formats)
    assert example.messages[1] == {"role": "assistant", "content": "hello"}
