"""The board's charts, drawn by matplotlib (as loss.png and hwft bench report's are) as SVG.

The page asks for a chart again while a run trains, so the curves follow metrics.jsonl and
eval.jsonl as they grow.
"""

from __future__ import annotations

import io


def _svg(fig) -> str:
    """The figure as SVG, its text kept as text (the page's own font; searchable)."""
    import matplotlib
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg")
    plt.close(fig)
    return buffer.getvalue()


def curves(series: dict[str, dict], metric: str = "loss") -> str:
    """``metric`` of metrics.jsonl against the step, one line per run (overlaid), with each run's
    eval.jsonl held-out loss dashed in the same colour when the metric is the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    drawn = False
    for i, (name, rows) in enumerate(series.items()):
        color = f"C{i % 10}"
        points = [(r["step"], r[metric]) for r in rows["metrics"] if isinstance(r.get(metric), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, color=color, marker="." if len(steps) < 60 else None, label=name)
            drawn = True
        evals = [(r["step"], r["eval_loss"]) for r in rows["eval"] if isinstance(r.get("eval_loss"), int | float)]
        if evals and metric == "loss":
            steps, values = zip(*evals, strict=True)
            ax.plot(steps, values, color=color, linestyle="--", marker="o", label=f"{name} (eval)")
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _svg(fig)


def bench(results, name: str) -> str:
    """hwft bench report's bar chart of ``name`` (tokens_per_second, peak_memory) as SVG."""
    from hwft.bench.report import figure

    return _svg(figure(results, name))
