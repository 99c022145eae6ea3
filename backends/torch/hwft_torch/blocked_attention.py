"""Causal attention of one packed example in query blocks of plain matmuls, for bf16 on the CPU.

On a CPU with bf16 units (AVX512-BF16, AMX) a bf16 matmul runs several times faster than fp32,
but torch's CPU flash-attention kernel gains almost nothing from bf16 (the figures:
docs/benchmarks.md, "The measurements behind the code"). This computes the same attention with torch's batched
matmuls instead.

The maths, per key/value head and its ``g`` query heads (grouped-query attention: query head
``h`` reads key/value head ``h // g``, SDPA's ``enable_gqa``), with scale ``c`` (1/sqrt(d) unless
the model says otherwise)::

    S = c Q K^T,   P = softmax(S + M) row by row,   O = P V
    M[i, j] = -inf where j > i (causal), else 0

and its gradients, with dO given::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),   dQ = c dS K,   dK = dS^T (c Q)

The queries go in blocks of ``BLOCK`` rows. Block ``[i0, i1)`` needs only the keys ``[0, i1)``
(the causal mask zeroes the rest), so the upper triangle beyond the block diagonal is never
computed, and each block's S stays small enough to stay in cache. The ``g`` query heads of one
key/value head are stacked into one matmul against their shared K and V, so K and V are never
copied per query head.

Precision is that of bf16 attention elsewhere: S is rounded to bf16 before the softmax (as
transformers' eager attention does in bf16), the softmax itself computes in fp32, P is kept in
bf16 for the P V product (as the flash kernel does) and for the backward, and dK and dV sum the
blocks' contributions in fp32. In float64 it agrees with SDPA to about 1e-15; in bf16 it is as
close to float64 as the flash kernel (tests/test_packing.py).

P is kept for the backward: about ``heads * L^2`` bytes per example and layer (half of the L x L
matrix, bf16). Above :data:`MAX_KEPT` elements the caller keeps torch's kernel, whose memory
grows with L only.

In bf16 it is faster than torch's flash kernel at every length measured; in fp32 the flash
kernel stays, since the blocked attention there is faster only from 256 tokens, by less, and not
at every block size (``ci/bench/cpu_kernels.py`` times both; the figures are in docs/benchmarks.md).
"""

from __future__ import annotations

import torch

#: Query rows per block (per query head): of 32, 64, 128 and 256, the fastest on long examples
#: (ci/bench/cpu_kernels.py; docs/benchmarks.md).
BLOCK = 128
#: The largest ``heads * L * L`` an example may keep for its backward (its P: that many bytes).
MAX_KEPT = 1 << 26

_UPPER: dict[int, torch.Tensor] = {}


def serves(dtype: torch.dtype, device: torch.device, heads: int, length: int, dropout: float) -> bool:
    """Whether an example of ``length`` tokens computing in ``dtype`` takes this attention:
    bf16 on the CPU, no attention dropout, P within :data:`MAX_KEPT`."""
    return dtype == torch.bfloat16 and device.type == "cpu" and not dropout and heads * length * length <= MAX_KEPT


def causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None, block: int = BLOCK
) -> torch.Tensor:
    """Causal attention of one example: query (1, H, L, D), key and value (1, KV, L, D) with H a
    multiple of KV -> (1, H, L, D), as ``scaled_dot_product_attention(..., is_causal=True,
    enable_gqa=True)`` gives it; ``block`` query rows at a time."""
    return _BlockedCausal.apply(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale, block)


def _upper(n: int) -> torch.Tensor:
    """The strictly upper triangle of an n x n block: the keys after each query."""
    if n not in _UPPER:
        _UPPER[n] = torch.ones(n, n, dtype=torch.bool).triu_(1)
    return _UPPER[n]


def _blocks(length: int, rows: int):
    for start in range(0, length, rows):
        yield start, min(start + rows, length)


class _BlockedCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale, rows):
        _, heads, length, dim = query.shape
        groups = key.shape[1]
        g = heads // groups
        q = query.reshape(groups, g, length, dim)
        k, v = key.reshape(groups, length, dim), value.reshape(groups, length, dim)
        out = query.new_empty(groups, g, length, dim)
        kept = []
        with torch.autocast("cpu", enabled=False):
            for start, end in _blocks(length, rows):
                n = end - start
                qb = (q[:, :, start:end] * scale).reshape(groups, g * n, dim)
                s = torch.bmm(qb, k[:, :end].transpose(1, 2))  # (KV, g n, end)
                s.view(groups, g, n, end)[..., start:].masked_fill_(_upper(n), float("-inf"))
                p = torch.softmax(s, dim=-1)
                out[:, :, start:end] = torch.bmm(p, v[:, :end]).view(groups, g, n, dim)
                kept += [qb, p]
        ctx.save_for_backward(key, value, *kept)
        ctx.scale, ctx.rows = scale, rows
        return out.view(1, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out):
        key, value, *kept = ctx.saved_tensors
        _, heads, length, dim = grad_out.shape
        groups = key.shape[1]
        g = heads // groups
        k, v = key.reshape(groups, length, dim), value.reshape(groups, length, dim)
        do = grad_out.reshape(groups, g, length, dim)
        accumulate = torch.promote_types(grad_out.dtype, torch.float32)
        dq = grad_out.new_empty(groups, g, length, dim)
        dk = torch.zeros(groups, length, dim, dtype=accumulate)
        dv = torch.zeros(groups, length, dim, dtype=accumulate)
        with torch.autocast("cpu", enabled=False):
            for (start, end), qb, p in zip(_blocks(length, ctx.rows), kept[0::2], kept[1::2], strict=True):
                n = end - start
                dob = do[:, :, start:end].reshape(groups, g * n, dim)
                dv[:, :end] += torch.bmm(p.transpose(1, 2), dob)
                # softmax's own backward kernel, not re-exported by torch's stubs
                backward = torch._softmax_backward_data  # pyright: ignore[reportPrivateImportUsage]
                ds = backward(torch.bmm(dob, v[:, :end].transpose(1, 2)), p, -1, p.dtype)
                dq[:, :, start:end] = torch.bmm(ds, k[:, :end]).view(groups, g, n, dim).mul_(ctx.scale)
                dk[:, :end] += torch.bmm(ds.transpose(1, 2), qb)
        return (
            dq.view(1, heads, length, dim),
            dk.to(key.dtype).view(key.shape),
            dv.to(value.dtype).view(value.shape),
            None,
            None,
        )
