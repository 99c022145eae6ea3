"""A stand-in for ``torch_npu``'s fused operators, in plain torch, for tests on a CPU.

Each function follows the documented semantics and signature of the real operator (return
values included: ``npu_rms_norm`` returns ``(y, rstd)``, ``npu_fusion_attention`` a 7-tuple whose
first element is the output) and counts its calls, so a test can assert that the patched model
really went through it. ``wrong`` names an operator to get subtly wrong, to show that the tests
would catch a kernel that computes something else. This lives in tests only; shipped code
imports the real ``torch_npu``.
"""

from __future__ import annotations

import sys
import types
from collections import Counter

import torch


def install(monkeypatch, wrong: str | None = None) -> types.ModuleType:
    """Put a stand-in at ``torch_npu`` (and ``torch_npu.optim``) for one test."""
    module = make(wrong)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setitem(sys.modules, "torch_npu.optim", module.optim)
    return module


def make(wrong: str | None = None) -> types.ModuleType:
    calls: Counter = Counter()
    module = types.ModuleType("torch_npu")
    module.calls = calls
    module.sparse_modes = Counter()  #: how npu_fusion_attention was asked to mask

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        calls["npu_rms_norm"] += 1
        assert x.dtype == gamma.dtype, "npu_rms_norm needs gamma in the input's dtype"
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        if wrong == "npu_rms_norm":
            rstd = rstd * 1.01
        return (x.float() * rstd).to(x.dtype) * gamma, rstd

    def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
        calls["npu_rotary_mul"] += 1
        assert rotary_mode == "half"
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
        if wrong == "npu_rotary_mul":
            rotated = torch.cat((second, -first), dim=-1)
        return x * r1 + rotated * r2

    def npu_swiglu(x, dim=-1):
        calls["npu_swiglu"] += 1
        a, b = x.chunk(2, dim=dim)
        if wrong == "npu_swiglu":
            a, b = b, a
        return torch.nn.functional.silu(a) * b

    def npu_fusion_attention(
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=2147483647,
        next_tockens=2147483647,
        inner_precise=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
    ):
        calls["npu_fusion_attention"] += 1
        module.sparse_modes[sparse_mode] += 1
        assert input_layout == "BNSD" and query.shape[1] == head_num and keep_prob == 1.0
        assert atten_mask is not None and atten_mask.dtype == torch.bool
        groups = head_num // key.shape[1]  # GQA: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        sq, skv = query.shape[2], key.shape[2]
        if sparse_mode == 3:  # right-down causal from the compressed 2048 x 2048 mask
            assert atten_mask.shape == (2048, 2048)
            masked = torch.ones(sq, skv, dtype=torch.bool, device=query.device).triu(skv - sq + 1)
        else:
            assert sparse_mode == 0
            masked = atten_mask
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if wrong == "npu_fusion_attention":
            masked = torch.zeros_like(masked)  # forgets the mask
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(query.dtype), value)
        return out, None, None, None, 0, 0, 0

    for fn in (npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_fusion_attention):
        setattr(module, fn.__name__, fn)

    class NpuFusedAdamW(torch.optim.AdamW):
        """torch_npu.optim.NpuFusedAdamW: AdamW's update (the same arguments), fused on the chip."""

        def step(self, closure=None):
            calls["NpuFusedAdamW.step"] += 1
            if wrong == "NpuFusedAdamW":
                for group in self.param_groups:
                    group["lr"] *= 2
            return super().step(closure)

    module.optim = types.ModuleType("torch_npu.optim")
    module.optim.NpuFusedAdamW = NpuFusedAdamW
    return module
