"""The Ascend NPU backend: registration, the version checks users trip over, and the fused
operators, checked here against a plain-torch stand-in of torch_npu (tests/npu_standin.py)."""

from __future__ import annotations

import importlib.machinery
import json
import platform
import sys
import types

import pytest
import torch

from hwft import kernels as registry
from hwft.data.batching import make_rows
from hwft.data.chat import ChatRenderer
from hwft.data.kinds.chat import ChatExample
from hwft.data.kinds.sequences import tokenize_examples
from hwft.plugins import get_host
from hwft.recipe import recipe_from_dict
from hwft_ascend import compat, probe
from tests import npu_standin
from tests.conftest import SAMPLE_ROWS, write_recipe

# --- Registration and refusals ----------------------------------------------------------------


def test_npu_is_registered_and_says_why_it_is_unavailable(tiny_llama, tmp_path, cli):
    code, out, _ = cli("env", "--json")
    npu = next(b for b in json.loads(out)["backends"] if b["name"] == "npu")
    assert npu["plugin"] == "ascend" and not npu["available"]
    assert npu["reason"].startswith("torch_npu is not installed")
    assert npu["capability"]["collective"] == "hccl" and "qlora" not in sum(npu["capability"]["methods"].values(), [])
    # Forcing it fails with that reason, exit 2, before any model loads.
    code, _, err = cli("train", write_recipe(tmp_path, tiny_llama, backend="npu"), "--dry-run")
    assert code == 2 and "backend 'npu' is not available here: torch_npu is not installed" in err
    # Fused kernels on a backend without them name the one that has them.
    recipe = write_recipe(tmp_path, tiny_llama, backend="auto", kernels={"fused_rms_norm": True})
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and "cpu cannot do kernels.fused_rms_norm" in err


# --- Versions: torch, torch-npu and CANN must match --------------------------------------------


def test_compatibility_table():
    assert compat.problem("2.5.1", "2.5.1.post1", "8.2.RC1") is None
    assert compat.problem("2.1.0+cpu", "2.1.0.post10", "8.0.0") is None
    assert compat.problem("2.6.0", "2.5.1.post1", None) == (
        "torch-npu 2.5.1.post1 is built for torch 2.5.1, but torch 2.6.0 is installed; install "
        "torch==2.5.1 (or the torch-npu built for torch 2.6.0)"
    )
    assert compat.problem("2.5.1", "2.5.1.post1", "8.0.RC1.alpha003") == (
        "torch-npu 2.5.1.post1 needs CANN 8.2.RC1, but CANN 8.0.RC1.alpha003 is installed; for "
        "CANN 8.0.RC1 install torch-npu 2.2.0 or 2.1.0.post4"
    )
    assert compat.problem("2.13.0", "2.13.0", "9.0.0") is None  # newer than the table: not judged


@pytest.fixture
def fake_npu_stack(tmp_path, monkeypatch):
    """torch_npu 'installed' (the stand-in) with versions and a CANN toolkit of the test's choosing."""
    fake = npu_standin.make()
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    info = tmp_path / "toolkit" / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
    info.parent.mkdir(parents=True)
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path / "toolkit"))
    monkeypatch.setattr(
        torch,
        "npu",
        types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: 2,
            get_device_name=lambda i: "Ascend910B2",
            is_bf16_supported=lambda: True,
        ),
        raising=False,
    )

    def stack(torch_version: str, npu_version: str, cann: str):
        info.write_text(f"package_name=Ascend-cann-toolkit\nversion={cann}\n")
        versions = {"torch": torch_version, "torch-npu": npu_version}
        monkeypatch.setattr(probe, "dist_version", lambda name: versions.get(name, "1.0"))
        probe.probe_npu.cache_clear()
        return probe.probe_npu()

    yield stack
    probe.probe_npu.cache_clear()


def test_probe_refuses_a_mismatch_and_reports_a_good_stack(fake_npu_stack):
    bad = fake_npu_stack("2.5.1", "2.5.1.post1", "8.0.RC1")
    assert not bad.available and "torch-npu 2.5.1.post1 needs CANN 8.2.RC1" in bad.reason
    good = fake_npu_stack("2.5.1", "2.5.1.post1", "8.2.RC1")
    assert good.available and [d["name"] for d in good.devices] == ["Ascend910B2", "Ascend910B2"]
    assert good.details["cann"] == "8.2.RC1" and good.details["bf16"] is True


# --- Fused operators: the patched model computes what the unpatched one does ------------------

ALL_KERNELS = {"fused_rms_norm": True, "fused_rope": True, "fused_swiglu": True, "attention": "npu_fusion_attention"}


def _batch(tokenizer, layout: str) -> dict:
    from hwft_torch.objective import to_tensors

    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    examples = [ChatExample(r["messages"], source=str(i)) for i, r in enumerate(SAMPLE_ROWS)]
    data, _ = tokenize_examples(examples, renderer, 512)
    if layout == "single":  # one unpadded row: the kernel's compressed causal mask
        rows = make_rows(data[:1], 512, packing=False)
    else:
        rows = make_rows(data, 160, packing=layout == "packed")[:3]
    return to_tensors(rows, tokenizer.pad_token_id, "sdpa", torch.device("cpu"))


def _forward_backward(model, batch):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, labels=batch["labels"], use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _run(model_dir, batch, standin=None, kernel_flags=None):
    from transformers import AutoModelForCausalLM

    if standin is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        return _forward_backward(model, batch)
    # the npu backend's kernels as a run chooses and applies them (hwft.kernels), before and after loading
    recipe = recipe_from_dict({"data": "x.jsonl", "kernels": {**kernel_flags, "use": []}})
    host = get_host()
    chosen, problems = registry.choose(recipe, "npu", "torch", host.kernels())
    assert problems == []
    job = types.SimpleNamespace(recipe=recipe, log=print)
    made = registry.prepare(job, chosen)
    attention = "npu_fusion_attention" if kernel_flags.get("attention") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    family = host.families().lookup("torch", model.config.model_type)
    applied = registry.apply(job, model, chosen, made, family, "full")
    try:
        return (*_forward_backward(model, batch), applied.lines)
    finally:
        applied.undo()


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, tokenizer_dir):
    from hwft.testing.tiny import build_tiny_model

    return build_tiny_model("mistral", tmp_path_factory.mktemp("tiny-mistral"), tokenizer_dir, seed=2)


def families_with_npu_ops() -> list[str]:
    """The torch families whose record has the npu_ops path (hwft_torch.families)."""
    from hwft.plugins import get_host

    return get_host().families().with_path("torch", "npu_ops")


@pytest.mark.parametrize("family", families_with_npu_ops())
@pytest.mark.parametrize("layout", ["padded", "packed", "single"])
def test_fused_kernels_match_the_unpatched_model(family, layout, tokenizer, monkeypatch, request):
    assert set(families_with_npu_ops()) == {"llama", "qwen2", "mistral"}
    model_dir = request.getfixturevalue(f"tiny_{family}")
    batch = _batch(tokenizer, layout)
    ref_logits, ref_grads = _run(model_dir, batch)
    standin = npu_standin.make()
    monkeypatch.setitem(sys.modules, "torch_npu", standin)
    logits, grads, applied = _run(model_dir, batch, standin, ALL_KERNELS)
    assert applied == [
        "npu_rms_norm x5",
        f"npu_rotary_mul in modeling_{family}",
        "npu_swiglu x2",
        "npu_fusion_attention",
    ]
    # each stand-in really ran: 2 layers x (2 norms + MLP + attention + q and k rotations), final norm
    assert standin.calls == {"npu_rms_norm": 5, "npu_swiglu": 2, "npu_rotary_mul": 4, "npu_fusion_attention": 2}
    # no padding: the compressed causal mask (sparse_mode 3); padded or packed: the full mask
    assert standin.sparse_modes == ({3: 2} if layout == "single" else {0: 2})
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "op, flags",
    [
        ("npu_rms_norm", {"fused_rms_norm": True}),
        ("npu_rotary_mul", {"fused_rope": True}),
        ("npu_swiglu", {"fused_swiglu": True}),
        ("npu_fusion_attention", {"attention": "npu_fusion_attention"}),
    ],
)
def test_a_wrong_kernel_is_caught(op, flags, tiny_llama, tokenizer, monkeypatch):
    """The comparison above has teeth: a stand-in that computes something else fails it."""
    batch = _batch(tokenizer, "packed")
    ref_logits, _ = _run(tiny_llama, batch)
    standin = npu_standin.make(wrong=op)
    monkeypatch.setitem(sys.modules, "torch_npu", standin)
    logits, _, _ = _run(tiny_llama, batch, standin, flags)
    assert standin.calls[op] > 0
    assert (logits - ref_logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("wrong", [None, "NpuFusedAdamW"])
def test_fused_adamw_on_npu_is_npu_fused_adamw(wrong, monkeypatch):
    """train.optimizer fused_adamw on the npu runtime builds torch_npu.optim.NpuFusedAdamW, whose
    updates are AdamW's: three steps land on the same weights as torch's AdamW (and a wrong
    stand-in does not)."""
    from hwft_ascend.plugin import NPU
    from hwft_torch.engine import make_optimizer

    standin = npu_standin.install(monkeypatch, wrong)
    recipe = recipe_from_dict(
        {"data": "x.jsonl", "train": {"optimizer": "fused_adamw", "lr": 0.01, "weight_decay": 0.1}}
    )
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    fused = make_optimizer(ours, recipe, NPU)
    plain = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1)
    assert type(fused).__name__ == "NpuFusedAdamW"
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, optimizer in ((ours, fused), (theirs, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    assert standin.calls["NpuFusedAdamW.step"] == 3
    same = torch.allclose(ours.weight, theirs.weight, atol=1e-6)
    assert same is (wrong is None)
    # adamw (not fused) stays torch's own on the npu
    recipe.train.optimizer = "adamw"
    assert type(make_optimizer(ours, recipe, NPU)) is torch.optim.AdamW


@pytest.mark.npu
def test_npu_lora_with_fused_kernels(tiny_llama, tmp_path, cli):
    """On a real Ascend NPU: the CLI trains with every fused operator, loss close to the CPU's."""
    cpu = write_recipe(tmp_path, tiny_llama, train={"max_steps": 2}, output={"dir": str(tmp_path / "cpu")})
    assert cli("train", cpu, "--quiet")[0] == 0
    npu = write_recipe(tmp_path, tiny_llama, backend="npu", kernels=ALL_KERNELS, train={"max_steps": 2})
    code, _, err = cli("train", npu)
    assert code == 0 and "kernels: npu_rms_norm" in err, err
    first = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line)["loss"] for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert first[0] == pytest.approx(reference[0], abs=2e-2)
