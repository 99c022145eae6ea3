"""``hwft bench report FILES``: one markdown table and PNG charts from results of any machines.

Results of different workloads (recipe hashes) measure different things; they are refused
together unless ``--force``, and then each row names its workload.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from hwft.bench.schema import SCHEMA, BenchResult
from hwft.bench.summary import comparison_lines, paired_summary
from hwft.errors import UserError


def load(files: list[str]) -> list[BenchResult]:
    results = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise UserError(f"{f}: no such result file")
        try:
            results.append(BenchResult.model_validate_json(path.read_text(encoding="utf-8")))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise UserError(f"{f}: not a {SCHEMA} result ({where}: {first['msg']})") from None
    if not results:
        raise UserError("no result files given")
    return results


def label(r: BenchResult) -> str:
    f = r.fingerprint
    count = f"{f.get('device_count', 1)}x " if f.get("device_count", 1) > 1 else ""
    arm = {"hwft": "hwft", "baseline-hf": "baseline"}.get(r.arm.kind, r.arm.kind)  # baseline-hf-liger as is
    return f"{count}{f.get('device')} / {r.arm.backend} / {arm} {r.arm.dtype}"


def table(results: list[BenchResult], with_workload: bool) -> str:
    head = [
        "machine / backend / arm",
        "tokens/s",
        "step median s",
        "step p90 s",
        "peak memory GiB",
        "MFU",
        "eval loss",
        "date",
    ]
    if with_workload:
        head.insert(1, "workload")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r.metrics
        mem = (
            f"{m.peak_memory_bytes / 2**30:.2f} {'RSS' if m.memory_kind == 'process-rss' else 'device'}"
            if m.peak_memory_bytes
            else "-"
        )
        cells = [
            label(r),
            f"{m.tokens_per_second:.1f}",
            f"{m.step_time_median_s:.2f}",
            f"{m.step_time_p90_s:.2f}",
            mem,
            f"{m.mfu:.1%}" if m.mfu is not None else "-",
            f"{m.eval_loss:.4f}" if m.eval_loss is not None else "-",
            r.created[:10],
        ]
        if with_workload:
            cells.insert(1, r.workload.hash)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The charts of a comparison: (file stem, what is measured, its unit).
CHARTS = (("tokens_per_second", "non-padding tokens/s"), ("peak_memory", "peak memory (GiB)"))


def figure(results: list[BenchResult], name: str):
    """One bar chart of ``name`` (a :data:`CHARTS` stem), one bar per result: hwft in blue, the
    baseline in grey (hwft bench report's PNG, hwft board's SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = dict(CHARTS)[name]
    values = [
        r.metrics.tokens_per_second if name == "tokens_per_second" else (r.metrics.peak_memory_bytes or 0) / 2**30
        for r in results
    ]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(results) + 1.2))
    colors = ["tab:blue" if r.arm.kind == "hwft" else "tab:gray" for r in results]
    ax.barh([label(r) for r in results], values, color=colors)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}" if name == "tokens_per_second" else f" {v:.2f}", va="center")
    ax.set_xlabel(unit)
    ax.invert_yaxis()
    ax.set_title(f"{unit} ({results[0].workload.recipe.rsplit('/', 1)[-1]})")
    fig.tight_layout()
    return fig


def charts(results: list[BenchResult], out: Path) -> list[Path]:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, _ in CHARTS:
        fig = figure(results, name)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(files: list[str], out: str | None, force: bool) -> int:
    results = load(files)
    hashes = sorted({r.workload.hash for r in results})
    if len(hashes) > 1 and not force:
        by_hash = {h: [f for f, r in zip(files, results, strict=True) if r.workload.hash == h] for h in hashes}
        listing = "; ".join(f"{h}: {', '.join(fs)}" for h, fs in by_hash.items())
        raise UserError(
            f"these results measure {len(hashes)} different workloads ({listing}); compare one "
            "workload at a time, or pass --force to put them in one table"
        )
    folder = Path(out) if out else Path(files[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    # the header names hwft's timed steps (a baseline's pass takes its own number of steps)
    first = next((r for r in results if r.arm.kind == "hwft"), results[0])
    text = [
        f"# hwft bench report ({len(results)} results)",
        "",
        f"Workload {', '.join(hashes)}: `{first.workload.recipe}`, {first.workload.steps} timed steps "
        f"after {first.workload.warmup} warmup, {first.arm.objective}/{first.arm.tuning}.",
        "",
        table(results, len(hashes) > 1),
        "",
    ]
    comparisons = [line for r in results for line in comparison_lines(r)]
    if comparisons:
        text += ["Against the transformers Trainer + peft baselines:", ""] + [f"- {c}" for c in comparisons] + [""]
    medians = paired_summary(results)
    if medians:
        text += (
            ["Over the paired runs (each hwft arm against the baseline run right after it):", ""]
            + [f"- {m}" for m in medians]
            + [""]
        )
    pngs = charts(results, folder)
    text += [f"![{p.stem}]({p.name})" for p in pngs]
    path = folder / "report.md"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))
    print(f"\nwrote {path}" + "".join(f", {p}" for p in pngs))
    return 0
