"""The CUDA and ROCm capability records, the fused AdamW of train.optimizer, and Liger's
kernels (issue 6). Records are built from what nvidia-smi prints on real parts; what needs a GPU
is marked ``cuda`` and runs wherever one is present."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_recipe

H100 = "NVIDIA H100 80GB HBM3, 81559, 550.54.15, 9.0"
A100 = "NVIDIA A100-SXM4-40GB, 40960, 535.104.05, 8.0"
T4 = "Tesla T4, 15360, 535.104.05, 7.5"


def test_nvidia_smi_rows_carry_the_compute_capability():
    from hwft_torch.devices import parse_nvidia_smi

    (row,) = parse_nvidia_smi(H100 + "\n")
    assert row == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_gb": 79.6,
        "driver": "550.54.15",
        "compute_capability": "9.0",
    }


def test_cuda_record_follows_the_device():
    from hwft_torch.devices import cuda_record, parse_nvidia_smi

    hopper = cuda_record(parse_nvidia_smi(H100), flash2=True, flash3=True)
    assert hopper.dtypes == ("fp32", "bf16", "fp16") and hopper.collective == "nccl"
    assert hopper.attention == ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
    assert "fused_adamw" in hopper.optimizers
    ampere = cuda_record(parse_nvidia_smi(A100), flash2=True, flash3=True)
    assert ampere.attention == ("eager", "sdpa", "flash_attention_2")  # flash-attn 3 is Hopper's
    # a mixed machine is held to its weakest device
    turing = cuda_record(parse_nvidia_smi(H100 + "\n" + T4), flash2=True, flash3=False)
    assert turing.dtypes == ("fp32", "fp16") and turing.attention == ("eager", "sdpa")
    assert (
        "7.5 has no bf16" in turing.notes["bf16"]
        and "needs compute capability 8.0" in turing.notes["flash_attention_2"]
    )


def test_a_turing_record_refuses_bf16_and_flash_attention_naming_what_it_has():
    from hwft.recipe import recipe_from_dict
    from hwft.select import capability_problems
    from hwft_torch.devices import cuda_record, parse_nvidia_smi

    record = cuda_record(parse_nvidia_smi(T4), flash2=True, flash3=False)
    recipe = recipe_from_dict(
        {"data": "x.jsonl", "train": {"precision": "bf16"}, "kernels": {"attention": "flash_attention_2"}}
    )
    problems = capability_problems(recipe, record)
    assert "train.precision 'bf16' (it has: fp32, fp16)" in problems
    assert "kernels.attention 'flash_attention_2' (it has: auto, eager, sdpa)" in problems


def test_a_liger_switch_without_liger_names_what_to_install():
    """kernels.fused_rms_norm on cuda is Liger's kernel: where liger-kernel is missing the refusal
    says so and how to install it; on the cpu, which has no kernel for the slot, it names the
    slots its kernels fill."""
    from hwft import kernels
    from hwft.plugins import get_host
    from hwft.recipe import recipe_from_dict

    host = get_host()
    recipe = recipe_from_dict({"data": "x.jsonl", "kernels": {"fused_rms_norm": True}})
    _, problems = kernels.choose(recipe, "cuda", "torch", host.kernels())
    if host.kernels().by_id["liger_rms_norm"].missing():
        assert problems == ["kernels.fused_rms_norm (liger_rms_norm needs liger_kernel: pip install liger-kernel)"]
    assert kernels.choose(recipe, "cpu", "torch", host.kernels())[1] == [
        "kernels.fused_rms_norm (it has: cross_entropy, projections)"
    ]


def test_rocm_record():
    from hwft_torch.devices import capability_rocm

    record = capability_rocm()
    assert record.collective == "rccl" and "bf16" in record.dtypes and "sdpa" in record.attention
    assert "bnb-nf4" in record.quantization or "qlora" in record.notes


@pytest.mark.parametrize("optimizer", ["adamw", "fused_adamw"])
def test_adamw_on_the_cpu_is_torchs_fused_kernel(optimizer):
    """adamw and fused_adamw on the CPU build torch's fused AdamW, whose updates are the
    for-loop AdamW's: three steps land on the same weights to float rounding."""
    import torch

    from hwft.recipe import recipe_from_dict
    from hwft_torch.engine import make_optimizer
    from hwft_torch.runtime import CPU

    recipe = recipe_from_dict({"data": "x.jsonl", "train": {"optimizer": optimizer, "lr": 0.01, "weight_decay": 0.1}})
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    start = ours.weight.detach().clone()
    fused = make_optimizer(ours, recipe, CPU)
    plain = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((ours, fused), (theirs, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert torch.allclose(ours.weight, theirs.weight, atol=1e-6)
    assert not torch.allclose(ours.weight, start, atol=1e-3)


def test_fused_adamw_is_refused_where_there_is_none(cli, tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path, tiny_llama, backend="mlx", train={"optimizer": "fused_adamw"})
    code, _, err = cli("train", recipe)
    assert code == 2 and "train.optimizer 'fused_adamw' (no fused AdamW here; use adamw)" in err


@pytest.mark.cuda
def test_liger_kernels_keep_the_logits(tiny_llama, tokenizer):
    """On an NVIDIA GPU with liger-kernel: liger_rms_norm, liger_rope and liger_swiglu applied
    through the kernel registry, same logits."""
    pytest.importorskip("liger_kernel")
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from hwft import kernels
    from hwft.plugins import get_host
    from hwft.recipe import recipe_from_dict

    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]], device="cuda")
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).cuda()
    want = plain(input_ids=ids).logits
    patched = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).cuda()
    recipe = recipe_from_dict({"data": "x.jsonl", "kernels": {"use": ["liger_rms_norm", "liger_rope", "liger_swiglu"]}})
    host = get_host()
    chosen, problems = kernels.choose(recipe, "cuda", "torch", host.kernels())
    assert problems == []
    job = SimpleNamespace(recipe=recipe, log=print)
    applied = kernels.apply(
        job, patched, chosen, kernels.prepare(job, chosen), host.families().lookup("torch", "llama"), "full"
    )
    assert applied.lines == ["liger rms_norm", "liger rope", "liger swiglu"]
    torch.testing.assert_close(patched(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_record_of_this_machine():
    from hwft_torch.devices import capability_cuda, probe_cuda

    avail = probe_cuda()
    assert avail.available and avail.devices[0]["compute_capability"]
    assert Path("/dev/nvidia0").exists() or avail.devices
    assert capability_cuda().collective == "nccl"


@pytest.mark.cuda
def test_liger_fused_linear_cross_entropy_equals_hwfts():
    """On an NVIDIA GPU with liger-kernel: Liger's fused linear cross-entropy gives hwft's chunked
    kernel's loss and gradients (label positions only, normalised by num_items)."""
    pytest.importorskip("liger_kernel")
    import torch

    from hwft_torch.liger import LigerCrossEntropy
    from hwft_torch.losses import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (300,), device="cuda")
    results = []
    for kernel in (linear_cross_entropy, LigerCrossEntropy(None).loss()):
        hidden.grad = weight.grad = None
        loss = kernel(hidden, weight, targets, 400)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for ours, liger in zip(*results, strict=True):
        torch.testing.assert_close(liger, ours, atol=1e-4, rtol=1e-4)


HOST_MEMORY_PROBE = """
import json, platform, resource
import torch
from hwft_torch.host_memory import keep_freed_host_memory

line = keep_freed_host_memory()

def touch_and_free():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(32 << 20, dtype=torch.float32)  # 128 MiB
    block.fill_(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults = [touch_and_free() for _ in range(16)]
print(json.dumps({"glibc": platform.system() == "Linux" and platform.libc_ver()[0] == "glibc", "line": line,
                  "faults": faults}))
"""


def test_freed_host_memory_is_reused_without_page_faults():
    """keep_freed_host_memory (glibc): a 128 MiB block allocated, touched and freed again and
    again, as a training step's activations are, settles on pages already touched instead of a
    fresh mapping faulted in page by page (32,768 faults) each time. Not at once: torch's
    aligned allocation asks for a little more than a freed block holds, and small allocations
    land between the blocks, so the first few walk up the heap's 512 MiB top pad on fresh pages
    (measured: 2 to 8 of them) before freed blocks serve every one. So: 16 allocations, the last
    4 without faults. In a process of its own, so that what earlier tests left on the worker's
    heap cannot decide it (in the worker, a test of the second allocation alone passed or
    failed by that)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HOST_MEMORY_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["glibc"]:
        assert report["line"] is None
        return
    assert report["line"] and "no trimming" in report["line"]
    assert report["faults"][0] > 30000  # the first touch faults every page in: the probe measures
    assert all(f < 1000 for f in report["faults"][-4:]), report["faults"]
