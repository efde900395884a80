"""One-figure training/eval report: per-depth MTP agreement bars (teacher-forced) and the training curves.

Reads the metrics.csv that Lightning's CSVLogger writes (one row per logging call, blank cells for
metrics not logged in that call) and draws a two-panel PNG with matplotlib's Agg backend (no
display needed):

    from salm_mtp.report import plot_report
    plot_report("out/report.png", [0.71, 0.42], "logs/version_0/metrics.csv", "tiny demo")

A missing file or missing columns never raise: the curve panel then says "no training curves found".
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

CURVES = ("loss", "main_loss", "mtp_loss", "val_loss")
"""Metric columns drawn on the curve panel, when present (a Lightning `<name>_step` column stands in
for `<name>` when only that exists)."""


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Parse a CSVLogger metrics.csv into {metric: [(step, value), ...]} in file order.

    The `step` and `epoch` columns are not metrics; blank cells (metrics not logged in that row)
    and rows without a step are skipped. Values parse as float, steps as int.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return out
        if "step" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'step' column (columns: {reader.fieldnames}); expected a Lightning CSVLogger metrics.csv")
        names = [n for n in reader.fieldnames if n not in ("step", "epoch")]
        for n in names:
            out[n] = []
        for row in reader:
            step = (row.get("step") or "").strip()
            if not step:
                continue
            for n in names:
                cell = (row.get(n) or "").strip()
                if cell:
                    out[n].append((int(float(step)), float(cell)))
    return out


def _curves(metrics_csv: str | None, names: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """The curves found for `names`; empty when the file or the columns are missing."""
    if not metrics_csv or not os.path.isfile(metrics_csv):
        return {}
    try:
        metrics = read_metrics_csv(metrics_csv)
    except (ValueError, csv.Error):
        return {}
    found = {}
    for name in names:
        points = metrics.get(name) or metrics.get(f"{name}_step")
        if points:
            found[name] = points
    return found


def plot_report(
    out_png: str | os.PathLike,
    acceptance: Sequence[float],
    metrics_csv: str | None,
    title: str,
    curves: Sequence[str] = CURVES,
) -> None:
    """Write a PNG with (left) per-depth MTP agreement bars and (right) loss curves vs step.

    Args:
        out_png: output path; parent folders are created.
        acceptance: one fraction per MTP depth: the teacher-forced agreement of evaluate's metrics.json
            (``mtp_teacher_forced_agreement``, computed by metrics.mtp_acceptance); nan shows "n/a".
        metrics_csv: CSVLogger metrics.csv, or None.
        title: figure title.
        curves: metric columns to draw on the curve panel, those present are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    fig.suptitle(title)

    if len(acceptance) == 0:
        ax_acc.text(0.5, 0.5, "no MTP head", ha="center", va="center", transform=ax_acc.transAxes)
    else:
        depths = list(range(1, len(acceptance) + 1))
        heights = [0.0 if math.isnan(a) else a for a in acceptance]
        bars = ax_acc.bar(depths, heights, color="tab:blue")
        for bar, a in zip(bars, acceptance):
            label = "n/a" if math.isnan(a) else f"{a:.3f}"
            ax_acc.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, label, ha="center", va="bottom")
        ax_acc.set_xticks(depths)
        ax_acc.set_ylim(0.0, 1.1)
    ax_acc.set_xlabel("MTP depth k")
    ax_acc.set_ylabel("agreement (draft == main greedy)")
    ax_acc.set_title("per-depth MTP agreement (teacher-forced)")

    found = _curves(metrics_csv, curves)
    if not found:
        ax_loss.text(0.5, 0.5, "no training curves found", ha="center", va="center", transform=ax_loss.transAxes)
    else:
        for name, points in found.items():
            steps, values = zip(*points)
            ax_loss.plot(steps, values, marker="o" if len(points) < 20 else None, label=name)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
    ax_loss.set_title("training curves")

    out_dir = os.path.dirname(os.fspath(out_png))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
