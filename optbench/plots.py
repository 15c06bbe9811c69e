"""Figures from run records (matplotlib, Agg backend): learning curves and the memory breakdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from optbench.analysis import MEMORY_TARGET, by_optimizer, optimizer_order, summary_table  # noqa: E402
from optbench.optimizers import BASELINE  # noqa: E402
from optbench.timing import record_disturbance  # noqa: E402
from optbench.optimizers import color_of, title_of  # noqa: E402

PARTS = ("params", "grads", "optimizer_state", "activations", "backward_temporaries", "step_temporaries", "inputs")
PART_COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#dd8452", "#999999")


def _save(fig: Any, path: Path) -> Path:
    """Lay the figure out, write it as a PNG (110 dpi, as every report figure) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_optimizer(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The finished runs with a history (what a curve can show), grouped by optimizer."""
    return by_optimizer([r for r in records if r.get("history") and r["status"] in ("ok", "diverged")])


def _series(runs: list[dict[str, Any]], x_key: str, y_key: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.array([[row.get(x_key) for row in r["history"][:length]] for r in runs], dtype=float)
    ys = np.array([[row.get(y_key) for row in r["history"][:length]] for r in runs], dtype=float)
    return xs, (ys * 100 if y_key == "test_acc" else ys)


def learning_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Test accuracy and train loss per epoch and against training wall-time; seed bands (min-max).

    Runs whose timing was disturbed (`timing.record_disturbance`, as the tables mark them) are drawn again on the wall-time panels as red
    crosses, and a line under the title names them: their time axis does not stand."""
    groups = _by_optimizer(records)
    if not groups:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [("epoch", "test_acc", axes[0, 0]), ("epoch", "train_loss", axes[0, 1]),
              ("train_time_s", "test_acc", axes[1, 0]), ("train_time_s", "train_loss", axes[1, 1])]
    for opt, runs in groups.items():
        color = color_of(opt)
        finished = [r for r in runs if r["status"] == "ok"]
        diverged = [r for r in runs if r["status"] != "ok"]
        for x_key, y_key, ax in panels:
            if finished:  # mean of the finished seeds, with a min-max band when there are several
                length = min(len(r["history"]) for r in finished)
                xs, ys = _series(finished, x_key, y_key, length)
                label = f"{title_of(opt)} (n={len(finished)})" if len(finished) > 1 else title_of(opt)
                ax.plot(xs.mean(0), ys.mean(0), "-", color=color, marker="o", markersize=3, label=label)
                if len(finished) > 1:
                    ax.fill_between(xs.mean(0), ys.min(0), ys.max(0), color=color, alpha=0.2)
            for i, rec in enumerate(diverged):  # each diverged seed on its own, dashed, up to where it stopped
                xs, ys = _series([rec], x_key, y_key, len(rec["history"]))
                ax.plot(xs[0], ys[0], "--", color=color, marker="x", markersize=4,
                        label=f"{title_of(opt)} diverged" if i == 0 and not finished else None)
    disturbed = [r for runs in groups.values() for r in runs if record_disturbance(r)]
    for i, rec in enumerate(disturbed):  # the time panels only: epochs and accuracies stand regardless
        for x_key, y_key, ax in panels[2:]:
            xs, ys = _series([rec], x_key, y_key, len(rec["history"]))
            ax.plot(xs[0], ys[0], linestyle="none", marker="x", color="red", markersize=8,
                    label="timing disturbed" if i == 0 else None)
    for x_key, y_key, ax in panels:
        if x_key != "epoch" and disturbed:
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch" if x_key == "epoch" else "training wall-time (s)"
                      + (" - red x: timing disturbed" if disturbed and x_key != "epoch" else ""))
        ax.set_ylabel("test accuracy (%)" if y_key == "test_acc" else "train loss")
        ax.grid(alpha=0.3)
        if y_key == "train_loss":
            ax.set_yscale("log")
    axes[0, 0].legend()
    if disturbed:
        names = ", ".join(f"{title_of(r['optimizer'])} seed {r['config'].get('seed')}" for r in disturbed)
        import textwrap

        warning = textwrap.fill(f"timing disturbed (busy machine): {names}; their wall-times do not stand, "
                                "rerun with --rerun on an idle machine", width=110)
        fig.suptitle(f"{title}\n{warning}", color="darkred")
    else:
        fig.suptitle(title)
    return _save(fig, path)


def memory_chart(records: list[dict[str, Any]], path: Path, title: str, table=None) -> Path | None:
    """Stacked bars of each optimizer's measured step peak, split into what MemTracker attributed.

    Sophia gets two bars: its plain step and its Hessian step (which sets its peak). Where a CUDA
    allocator peak was measured over the whole training, it is drawn as a black tick on the bar. Each
    optimizer's peak saving against AdamW (the comparison table's, from the records' peaks) is written
    beside its bar, and a dashed line marks the course's target: 30% below AdamW's peak.
    """
    table = summary_table(records) if table is None else table  # the report passes the one it built
    savings = dict(zip(table.optimizer, table.peak_saving)) if "peak_saving" in table else {}
    base_peak = next(iter(table.loc[table.optimizer == BASELINE, "peak_mean"]), None) if len(table) else None
    bars: list[tuple[str, dict[str, float], float | None]] = []
    saving_at: dict[int, float] = {}  # bar index -> the optimizer's peak saving, on the bar that sets its peak
    for opt, runs in _by_optimizer(records).items():
        rec = runs[0]
        breakdown = rec.get("memory_breakdown") or {}
        cuda_peak = rec.get("peak_memory_bytes") if "cuda" in str(rec.get("peak_memory_source")) else None
        steps = [(k, s) for k, s in (("plain_step", ""), ("hessian_step", " (Hessian step)"))
                 if isinstance(breakdown.get(k), dict)]
        for step_key, suffix in steps:
            bars.append((title_of(opt) + suffix, breakdown[step_key], cuda_peak))
        if steps and opt != BASELINE and savings.get(opt) is not None and not np.isnan(savings[opt]):
            tallest = max(range(len(bars) - len(steps), len(bars)), key=lambda i: bars[i][1].get("peak_bytes", 0))
            saving_at[tallest] = savings[opt]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * len(bars)))
    y = np.arange(len(bars))
    left = np.zeros(len(bars))
    for part, color in zip(PARTS, PART_COLORS):
        widths = np.array([b[1].get(part, 0) / 2**20 for b in bars])
        if widths.any():
            label = "step() temporaries (Sophia: Hessian-vector product)" if part == "step_temporaries" \
                else part.replace("_", " ")
            ax.barh(y, widths, left=left, color=color, label=label)
            left += widths
    for i, (_, _, cuda_peak) in enumerate(bars):
        if cuda_peak:
            ax.plot([cuda_peak / 2**20] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2,
                    label="CUDA allocator peak" if i == 0 else None)
    for i, saving in saving_at.items():
        ax.annotate(f"{-100 * saving:.1f}% more peak than AdamW" if saving < 0 else f"saves {100 * saving:.1f}% of AdamW's peak",
                    (left[i], i), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8,
                    color="darkgreen" if saving >= MEMORY_TARGET else "black")
    target = None
    if base_peak is not None and not np.isnan(base_peak):
        target = (1 - MEMORY_TARGET) * base_peak / 2**20
        ax.axvline(target, color="darkred", linestyle="--", linewidth=1.2,
                   label=f"course target: {100 * MEMORY_TARGET:.0f}% below AdamW's peak ({target:,.0f} MiB)")
    ax.set_xlim(0, max(left.max(), target or 0) * 1.3)  # room for the saving labels
    ax.set_yticks(y, [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("MiB (tensor memory at the step's peak, torch MemTracker); % = peak saving vs AdamW")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


# --- tuning ----------------------------------------------------------------------------------------


def tuning_curves(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path | None:
    """Best validation accuracy so far vs trials spent, per optimizer, in the order the trials were
    drawn (line with markers); the band is the central 80% over random re-orderings of the same trials
    (optbench.tune_analysis.tuning_curve), the dashed line their median."""
    shown = {opt: c for opt, c in curves.items() if c["trials"]}
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for opt in optimizer_order(list(shown)):
        c, color = shown[opt], color_of(opt)
        x = np.array(c["trials"])
        ax.plot(x, 100 * np.array(c["observed"]), "-o", color=color, markersize=4, label=title_of(opt))
        ax.plot(x, 100 * np.array(c["median"]), "--", color=color, linewidth=1)
        ax.fill_between(x, 100 * np.array(c["low"]), 100 * np.array(c["high"]), color=color, alpha=0.15)
    ax.set_xlabel("trials spent (slot 1 = the defaults)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_xticks(range(1, max(len(c["trials"]) for c in shown.values()) + 1))
    ax.grid(alpha=0.3)
    ax.legend(title="band: 80% over random trial orders", fontsize=8, title_fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def lr_sensitivity(lines: dict[str, dict[Any, list[tuple[float, float]]]], chosen: dict[str, dict[str, float]],
                   path: Path, title: str) -> Path | None:
    """Validation accuracy vs learning rate (log axis), one panel per optimizer, one line per weight
    decay (grid search); with Sobol every point has its own weight decay, shown as the point's colour.
    The chosen setting is ringed."""
    shown = {opt: v for opt, v in lines.items() if v}
    if not shown:
        return None
    names = optimizer_order(list(shown))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, opt in zip(axes[0], names):
        by_wd = shown[opt]
        if all(len(points) >= 2 for points in by_wd.values()) or len(by_wd) <= 4:
            cmap = plt.get_cmap("viridis", max(2, len(by_wd)))
            for i, (wd, points) in enumerate(by_wd.items()):
                xs, ys = zip(*points)
                ax.plot(xs, 100 * np.array(ys), "-o", color=cmap(i), markersize=4,
                        label=f"wd {wd:.3g}" if wd is not None else "wd -")
            ax.legend(fontsize=7)
        else:
            pts = [(lr, acc, wd) for wd, points in by_wd.items() for lr, acc in points]
            sc = ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis",
                            norm=matplotlib.colors.LogNorm())
            fig.colorbar(sc, ax=ax, label="weight decay")
        best = chosen.get(opt)
        if best and "lr" in best:
            acc = next((acc for lr, acc in by_wd.get(best.get("weight_decay"), []) if lr == best["lr"]), None)
            if acc is not None:
                ax.scatter([best["lr"]], [100 * acc], s=140, facecolors="none", edgecolors="black", label=None)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title_of(opt))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def diagnostics_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One panel per optimizer diagnostic in the records' history (epoch means of log-point values):
    every optimizer's mean over seeds, log scale where values span decades (grad norm, update RMS)."""
    groups = _by_optimizer(records)
    keys: list[str] = []
    for runs in groups.values():
        for rec in runs:
            for row in rec["history"]:
                for key in (row.get("diagnostics") or {}):
                    if key != "log_points" and key not in keys:
                        keys.append(key)
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for opt, runs in groups.items():
            series = [[(row["epoch"], (row.get("diagnostics") or {}).get(key)) for row in r["history"]] for r in runs]
            points: dict[int, list[float]] = {}
            for run in series:
                for epoch, value in run:
                    if isinstance(value, (int, float)) and np.isfinite(value):
                        points.setdefault(epoch, []).append(value)
            if points:
                epochs = sorted(points)
                ax.plot(epochs, [np.mean(points[e]) for e in epochs], "-o", markersize=3, color=color_of(opt),
                        label=title_of(opt))
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key in ("grad_norm", "update_rms"):
            ax.set_yscale("log")
        if key == "sophia_win_rate":  # the authors' healthy band
            ax.axhspan(0.1, 0.5, color="green", alpha=0.1)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{title}: optimizer diagnostics (epoch means of log points)")
    return _save(fig, path)
