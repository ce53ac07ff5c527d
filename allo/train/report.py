"""End-of-run report: the table of held-out metrics after each stage, and PNG training curves."""

from __future__ import annotations

import json
import os

from allo._atomic import atomic_path

from .data import write_text

COLUMNS = [("eval_answer_accuracy", "answer acc"), ("eval_rewards/accuracies", "reward acc"),
           ("eval_rewards/margins", "reward margin"), ("eval_rewards/chosen", "reward chosen"),
           ("eval_rewards/rejected", "reward rejected"), ("eval_loss", "DPO loss")]
CURVES = [("loss", "loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy"),
          ("forget/log_ratio", "forget: mean log-ratio on weighted tokens"), ("grad_norm", "grad norm")]


def format_table(results: dict) -> str:
    """Markdown table, one row per evaluated stage (sft = the starting model): every line has as many
    cells as the header, whatever the results hold (a stage without metrics: "-" in each column)."""
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in results.values())]

    def line(cells):
        return "| " + " | ".join(cells) + " |"

    lines = [line(["stage"] + [h for _, h in cols]), line(["---"] * (1 + len(cols)))]
    for stage, r in results.items():
        lines.append(line([stage] + [f"{r[k]:.4f}" if k in r else "-" for k, _ in cols]))
    return "\n".join(lines)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(output_dir: str, stages=("warmup", "forget", "improve")) -> str | None:
    """training_curves.png: one column per trained stage, one row per metric it logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {s: read_metrics(os.path.join(output_dir, s, "metrics.jsonl")) for s in stages}
    logs = {s: rows for s, rows in logs.items() if rows}
    if not logs:
        return None
    rows = [(k, lbl) for k, lbl in CURVES if any(k in r for rs in logs.values() for r in rs)]
    fig, axes = plt.subplots(len(rows), len(logs), figsize=(4 * len(logs), 2.6 * len(rows)), squeeze=False)
    for j, (stage, log) in enumerate(logs.items()):
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            pts = [(r["step"], r[key]) for r in log if key in r]
            if not pts:  # this stage does not log this metric
                ax.axis("off")
                continue
            ax.plot(*zip(*pts), marker=".")
            ax.set_title(f"{stage}: {label}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
    return _save_figure(fig, os.path.join(output_dir, "training_curves.png"))


def _save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` atomically (a crash never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_eval(output_dir: str, results: dict) -> str | None:
    """eval_metrics.png: answer accuracy and reward accuracy after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, h) for k, h in COLUMNS[:3] if any(k in r for r in results.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, (k, h) in zip(axes[0], keys):
        names = [s for s in results if k in results[s]]
        ax.bar(names, [results[s][k] for s in names], color="tab:blue")
        ax.set_title(h, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, os.path.join(output_dir, "eval_metrics.png"))


def write_report(output_dir: str, results: dict, note: str | None = None) -> str:
    """report.md: the table (or, with no results, ``note``: why there are none), and the plots; what
    it wrote is printed (plots that were not made, for want of metrics, are not named)."""
    table = format_table(results) if results else f"({note or 'no results'})"
    curves = plot_curves(output_dir)
    bars = plot_eval(output_dir, results)
    text = "# allo-train results (held-out)\n\n" + table + "\n"
    write_text(os.path.join(output_dir, "report.md"), text)
    print("\n" + table)
    plots = [p for p in (curves, bars) if p]
    print(f"\nreport: {os.path.join(output_dir, 'report.md')}; plots: {', '.join(plots) or 'none'}", flush=True)
    return table
