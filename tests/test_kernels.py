"""The kernel and model-family registries (hwft.kernels, hwft.families): what a recipe's
``kernels`` section chooses on each backend, the switches naming slots, refusals before any
weight loads, and an out-of-tree kernel (tests/kernel_plugin) that trains through the hooks
alone and computes what the model computes without it."""

from __future__ import annotations

import json

import pytest

from hwft.families import GENERIC, Families, Family
from hwft.kernels import choose
from hwft.plugins import get_host, reset_host
from hwft.recipe import recipe_from_dict
from tests.conftest import REPO, write_recipe


def chosen(backend: str, engine: str = "torch", **kernels):
    host = get_host()
    recipe = recipe_from_dict({"data": "x.jsonl", "kernels": kernels})
    picked, problems = choose(recipe, backend, engine, host.kernels())
    return picked.ids(), sorted(picked.named), problems


def test_what_each_backend_takes_by_default_and_the_switches_as_aliases():
    reset_host()
    # auto: the recommended kernels registered for the backend, installed
    assert chosen("cpu") == (["hwft_chunked_cross_entropy", "hwft_sibling_projections"], [], [])
    assert chosen("mlx", "mlx") == (["hwft_mlx_label_cross_entropy"], [], [])
    # the npu recommends none of torch-npu's operators; each switch names one
    assert chosen("npu") == (["hwft_chunked_cross_entropy", "hwft_sibling_projections"], [], [])
    ids, named, problems = chosen(
        "npu",
        fused_rms_norm=True,
        fused_rope=True,
        fused_swiglu=True,
        attention="npu_fusion_attention",
        fused_projections=False,
    )
    assert ids == ["npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "hwft_chunked_cross_entropy", "npu_fusion_attention"]
    assert named == ["npu_fusion_attention", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu"] and problems == []
    # false takes the slot's kernel out; [] applies none; a list applies those
    assert chosen("cpu", fused_cross_entropy=False)[0] == ["hwft_sibling_projections"]
    assert chosen("cpu", use=[])[0] == []
    assert chosen("cpu", use=["hwft_sibling_projections"])[:2] == (
        ["hwft_sibling_projections"],
        ["hwft_sibling_projections"],
    )
    # where two kernels fill a slot, the first installed wins: Liger's cross-entropy on a GPU
    # only with liger-kernel installed
    liger = get_host().kernels().by_id["liger_fused_linear_cross_entropy"]
    expected = "liger_fused_linear_cross_entropy" if not liger.missing() else "hwft_chunked_cross_entropy"
    assert chosen("cuda")[0] == [expected, "hwft_sibling_projections"]
    # a switch for a slot no kernel here fills names the slots the backend's kernels fill
    assert chosen("cpu", fused_rope=True)[2] == ["kernels.fused_rope (it has: cross_entropy, projections)"]


@pytest.mark.parametrize(
    "kernels, problem",
    [
        (
            {"use": ["hwft_chunked_cross_entropi"]},
            "kernels.use hwft_chunked_cross_entropi (no kernel has that id; did you mean 'hwft_chunked_cross_entropy'?",
        ),
        ({"use": ["npu_rms_norm"]}, "kernels.use npu_rms_norm (it runs on npu)"),
        (
            {"use": ["hwft_mlx_label_cross_entropy"]},
            "kernels.use hwft_mlx_label_cross_entropy (it runs on the mlx engine)",
        ),
        (
            {"use": ["hwft_chunked_cross_entropy", "hwft_chunked_cross_entropy"]},
            "kernels.use hwft_chunked_cross_entropy (kernel hwft_chunked_cross_entropy already fills its slot",
        ),
    ],
)
def test_a_kernel_the_backend_cannot_run_is_refused_naming_what_it_has(kernels, problem):
    problems = chosen("cpu", **kernels)[2]
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_liger_without_liger_kernel_is_refused_with_the_install_line():
    liger = get_host().kernels().by_id["liger_rms_norm"]
    if not liger.missing():
        pytest.skip("liger-kernel is installed here")
    assert chosen("cuda", use=["liger_rms_norm"])[2] == [
        "kernels.use liger_rms_norm (it needs liger_kernel: pip install liger-kernel)"
    ]


def test_the_cli_refuses_before_loading(tiny_llama, tmp_path, cli):
    recipe = write_recipe(tmp_path, tiny_llama, kernels={"use": ["liger_rms_norm"]})
    code, _, err = cli("train", recipe, "--dry-run")
    assert (
        code == 2
        and "backend 'cpu' cannot run this recipe: it cannot do kernels.use liger_rms_norm (it runs on cuda, rocm)"
        in err
        and "Traceback" not in err
    )


def test_families_are_one_table_per_engine_and_an_unknown_one_takes_the_generic_path():
    families = get_host().families()
    llama = families.lookup("torch", "llama")
    assert llama.known and llama.has("liger") and llama.gguf.arch == "LLAMA" and llama.gguf.permute_qk
    assert (
        families.lookup("torch", "qwen2").gguf.arch == "QWEN2" and not families.lookup("torch", "qwen2").gguf.permute_qk
    )
    unknown = families.lookup("torch", "helium")
    assert not unknown.known and unknown.model_type == "helium" and unknown.gguf is None
    assert unknown.paths == {"fused_projections", "packed_attention"}
    assert families.lookup("torch", "gemma2").attention == "eager"
    from hwft.testing.tiny import tiny_families

    # every tiny family, by the mlx-lm architecture it loads as (mistral: llama)
    assert set(families.with_path("mlx", "mlx_packing")) == set(tiny_families()) - {"mistral"}
    assert not families.lookup("mlx", "starcoder2").has("mlx_packing")
    assert Families({}).lookup("vendor", "x") == Family("x", "vendor", known=False)
    assert [f.model_type for f in families.of("mlx")][-1] == GENERIC


STARCODER2_FAMILY = """
    import pluggy
    from hwft.families import Family
    HWFT_PLUGIN_API = "2.0"
    hookimpl = pluggy.HookimplMarker("hwft")

    @hookimpl
    def hwft_register_model_families(register):
        register(Family("starcoder2", "torch", "StarCoder2", frozenset({"packed_attention"}),
                        tiny={"norm_type": "layer_norm"}))
        register(Family("starcoder2", "mlx", "StarCoder2", frozenset({"mlx_packing"}), serves=("starcoder2_v2",)))
"""


def test_a_new_family_is_one_record_per_engine(tmp_path, monkeypatch, tokenizer_dir):
    """A family comes with everything hwft asks of it in each engine's record: a plugin's torch
    record gives the tiny config the conformance suite's family matrix builds (hwft.testing.tiny),
    its MLX record the model types it also serves; MoE families and the GGUF import layout are
    read off the records too (Family.moe, GgufLayout.import_names)."""
    import json

    from hwft.testing.tiny import build_tiny_model, moe_families, tiny_families
    from tests.test_plugins import make_dist

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    make_dist(site, "hwft-starcoder2", "fake_starcoder2", STARCODER2_FAMILY)
    reset_host()
    try:
        assert tiny_families()["starcoder2"] == {"norm_type": "layer_norm"}
        assert moe_families() == ["deepseek_v3", "mixtral", "qwen3_moe"]
        folder = build_tiny_model("starcoder2", tmp_path / "starcoder2", tokenizer_dir)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "starcoder2" and config["num_hidden_layers"] == 2
        families = get_host().families()
        assert families.lookup("mlx", "starcoder2_v2").model_type == "starcoder2"
        assert families.lookup("mlx", "mistral").model_type == "llama"  # mlx-lm loads mistral as llama
        assert families.gguf_import("llama").import_names["output"] == "lm_head"
        assert families.gguf_import("qwen2") is None  # hwft's converter reads llama's GGUF alone
    finally:
        reset_host()


def test_an_unknown_family_is_refused_in_one_line_by_the_gguf_export():
    from hwft.errors import UserError
    from hwft.use.gguf_writer import layout_for

    layouts = {f.model_type: f.gguf for f in get_host().families().of("torch") if f.gguf}
    with pytest.raises(
        UserError,
        match=r"model_type 'helium' is not one hwft writes as GGUF \(deepseek_v3, gemma2, gemma3_text, "
        r"glm4, granite, llama, mistral, mixtral, nemotron, olmo2, phi3, qwen2, qwen3, qwen3_moe, "
        r"smollm3, stablelm, starcoder2\); export --to hf and convert with llama.cpp's convert_hf_to_gguf.py",
    ):
        layout_for({"model_type": "helium"}, layouts)


# --- An out-of-tree kernel through the hooks alone ----------------------------------------------


@pytest.fixture
def vendor_host():
    """The process-wide host with tests/kernel_plugin registered as an installed plugin would be."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "kernel_plugin"))
    import hwft_torch_rms_norm

    reset_host()
    host = get_host()
    host.pm.register(hwft_torch_rms_norm, name="torch-rms-norm")
    yield host
    reset_host()
    sys.path.remove(str(REPO / "tests" / "kernel_plugin"))


def run_cli(*args, capsys):
    from hwft import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_out_of_tree_kernel_trains_and_computes_what_the_model_does(
    vendor_host, tiny_llama, tiny_qwen2, tmp_path, capsys
):
    """torch_rms_norm (a vendor's, on cpu, for llama) by id and by the 1.0 switch: the run logs
    it, and the losses and gradient norms are the unpatched run's (fp32: the same sums in
    another order, within 1e-5); on qwen2, whose row lacks its path, it is refused in one line."""
    assert "rms_norm" in vendor_host.kernels().slots("cpu", "torch")  # the cpu's kernels now fill the slot
    runs = {}
    for name, kernels in (
        ("plain", {"use": ["hwft_chunked_cross_entropy"]}),
        ("by-id", {"use": ["torch_rms_norm", "hwft_chunked_cross_entropy"]}),
        ("switch", {"fused_rms_norm": True, "fused_projections": False}),
    ):
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_recipe(folder, tiny_llama, kernels=kernels, eval={"prompts": []})
        code, _, err = run_cli("train", recipe, capsys=capsys)
        assert code == 0, err
        runs[name] = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()], err
    assert "kernels: torch_rms_norm x5" in runs["by-id"][1] and "torch_rms_norm" in runs["switch"][1]
    assert "torch_rms_norm" not in runs["plain"][1]
    for name in ("by-id", "switch"):
        for a, b in zip(runs[name][0], runs["plain"][0], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    folder = tmp_path / "qwen2"
    folder.mkdir()
    code, _, err = run_cli(
        "train", write_recipe(folder, tiny_qwen2, kernels={"use": ["torch_rms_norm"]}), capsys=capsys
    )
    assert (
        code == 2
        and "kernels: torch_rms_norm cannot apply: model_type qwen2 has no torch_rms_norm path on the torch engine"
        in err
        and "Traceback" not in err
    )


def test_the_kernel_package_touches_nothing_of_hwft():
    for tree in ("hwft", "backends"):
        for path in (REPO / tree).rglob("*.py"):
            assert "torch_rms_norm" not in path.read_text(encoding="utf-8"), path
