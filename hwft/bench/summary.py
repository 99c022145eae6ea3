"""Bench results as text: the table of arms, each comparison with its verdict, and the median of
paired ratios (what ``hwft bench`` prints and ``hwft bench report`` writes)."""

from __future__ import annotations

import statistics

from hwft.bench.schema import BenchResult, Comparison


def mfu_text(m) -> str:
    """MFU against the peak, and against the measured matmul rate where the peak is a spec sheet's."""
    if m.mfu is None:
        return "-"
    if m.mfu_of_measured is not None and m.measured_peak_flops != m.peak_flops:
        return f"{m.mfu:.1%} ({m.mfu_of_measured:.1%} of measured)"
    return f"{m.mfu:.1%}"


def summary_table(results: list[BenchResult]) -> str:
    lines = [
        "| arm | backend | dtype | tokens/s | step median s | step p90 s | peak memory GiB | MFU | last loss "
        "| eval loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics
        mem = (
            f"{m.peak_memory_bytes / 2**30:.2f} ({'RSS' if m.memory_kind == 'process-rss' else 'device'})"
            if m.peak_memory_bytes
            else "-"
        )
        lines.append(
            f"| {r.arm.kind} | {r.arm.backend} | {r.arm.dtype} | {m.tokens_per_second:.1f} | "
            f"{m.step_time_median_s:.2f} | {m.step_time_p90_s:.2f} | {mem} | "
            f"{mfu_text(m)} | "
            f"{f'{m.loss_last_step:.4f}' if m.loss_last_step is not None else '-'} | "
            f"{f'{m.eval_loss:.4f}' if m.eval_loss is not None else '-'} |"
        )
    return "\n".join(lines)


def comparison_lines(result: BenchResult) -> list[str]:
    out = []
    for c in result.comparisons:
        verdict = (
            "counts"
            if c.counts
            else "does NOT count: "
            + ("; ".join(c.differences) if c.differences else "the arms trained different tokens")
        )
        mem = f", peak memory x{c.peak_memory_ratio:.2f}" if c.peak_memory_ratio else ""
        ev = ""
        if c.eval_loss_relative_difference is not None:
            ev = (
                f", eval loss {c.eval_loss_hwft:.4f} vs {c.eval_loss_baseline:.4f} "
                f"({c.eval_loss_relative_difference:+.2%})"
            )
        out.append(
            f"hwft/{result.arm.backend} vs {c.baseline_kind} {c.baseline_dtype}: "
            f"tokens/s x{c.tokens_per_second_ratio:.2f}"
            f"{mem}{ev} (same tokens: {'yes' if c.same_tokens else 'no'}; ratio {verdict})"
        )
    return out


def paired_summary(results: list[BenchResult]) -> list[str]:
    """One line per (workload, backend, baseline dtype) with two or more counted comparisons:
    the median of the paired ratios and their range.

    Each comparison pairs an hwft arm with the baseline arm run right after it, so a machine
    whose speed drifts between runs (a shared host) moves both sides of a pair alike; the
    median over pairs is the figure to quote.
    """
    groups: dict[tuple, list[Comparison]] = {}
    for r in results:
        for c in r.comparisons:
            if c.counts:
                groups.setdefault((r.workload.hash, r.arm.backend, c.baseline_kind, c.baseline_dtype), []).append(c)
    out = []
    for (digest, backend, kind, dtype), pairs in groups.items():
        if len(pairs) < 2:
            continue
        speed = sorted(c.tokens_per_second_ratio for c in pairs)
        line = (
            f"hwft/{backend} vs {kind} {dtype}, workload {digest}, median of {len(pairs)} paired runs: "
            f"tokens/s x{statistics.median(speed):.2f} (range x{speed[0]:.2f} to x{speed[-1]:.2f})"
        )
        memory = [c.peak_memory_ratio for c in pairs if c.peak_memory_ratio]
        if memory:
            line += f", peak memory x{statistics.median(memory):.2f} (at most x{max(memory):.2f})"
        evals = [c.eval_loss_relative_difference for c in pairs if c.eval_loss_relative_difference is not None]
        if evals:
            line += f", eval loss {statistics.median(evals):+.2%}"
        out.append(line)
    return out
