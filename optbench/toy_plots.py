"""Figures for `optbench toy`: the paths over the function's contours, and the loss per step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import LogLocator  # noqa: E402

from optbench.optimizers import color_of  # noqa: E402
from optbench.toy import APPENDIX, REFERENCE, ToyResult, ToyRun  # noqa: E402

# One look per optimizer, the same in both figures. The reference is grey and dashed: it is not benchmarked.
REFERENCE_STYLE = {"color": "0.35", "marker": "v", "linestyle": "--"}
# The appendix's hand-written Adam lies on torch's AdamW path: dotted and black, so both stay visible.
APPENDIX_STYLE = {"color": "black", "marker": "+", "linestyle": ":"}
MARKERS = ("o", "^", "s", "D", "P", "X", "*", "h", "<", ">")


def _style(run: ToyRun, index: int) -> dict[str, str]:
    """The optimizer's registry colour; a marker by position; the reference grey and dashed."""
    if run.key == REFERENCE:
        return REFERENCE_STYLE
    if run.key == APPENDIX:
        return APPENDIX_STYLE
    return {"color": color_of(run.key), "marker": MARKERS[index % len(MARKERS)], "linestyle": "-"}
MARKERS_PER_PATH = 15


def _label(run: ToyRun) -> str:
    text = f"{run.title}, lr {run.hparams['lr']:g}"
    if run.averaged:
        text += " (averaged x)"
    if run.diverged_at is not None:
        text += f", diverged at step {run.diverged_at}"
    return text


def _grid_values(result: ToyResult, size: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (x0, x1), (y0, y1) = result.view
    xs, ys = np.linspace(x0, x1, size), np.linspace(y0, y1, size)
    gx, gy = np.meshgrid(xs, ys)
    points = torch.from_numpy(np.stack([gx, gy], axis=-1))
    with torch.no_grad():
        return gx, gy, result.objective.value(points).numpy()


def plot_paths(result: ToyResult, path: Path) -> Path:
    gx, gy, values = _grid_values(result)
    positive = values[values > 0]
    low, high = positive.min(), values.max()
    levels = np.logspace(np.log10(low), np.log10(high), 30)
    fig, ax = plt.subplots(figsize=(9, 7.5), dpi=110)
    filled = ax.contourf(gx, gy, np.clip(values, low, None), levels=levels, norm=LogNorm(), cmap="Blues_r",
                         alpha=0.55)
    ax.contour(gx, gy, values, levels=levels[::2], norm=LogNorm(), colors="0.55", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="f(x, y), log-spaced levels", ticks=LogLocator(), shrink=0.85)
    for index, run in enumerate(result.runs):
        style = _style(run, index)
        points = run.points
        every = max(1, (len(points) - 1) // MARKERS_PER_PATH)
        # Slightly transparent: paths that share a valley stay visible under one another.
        ax.plot(points[:, 0], points[:, 1], color=style["color"], linestyle=style["linestyle"], linewidth=1.4,
                marker=style["marker"], markersize=4, markevery=every, label=_label(run), zorder=3, alpha=0.85)
        ax.plot(*points[-1], marker=style["marker"], color=style["color"], markersize=11,
                markeredgecolor="black", zorder=5)
    ax.plot(*result.start, marker="o", color="white", markeredgecolor="black", markersize=10, zorder=6,
            linestyle="none", label=f"start {tuple(round(v, 4) for v in result.start)}")
    minimum = result.objective.minimum
    ax.plot(*minimum, marker="*", color="gold", markeredgecolor="black", markersize=20, zorder=6,
            linestyle="none", label=f"minimum {minimum}")
    (x0, x1), (y0, y1) = result.view
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")  # true geometry: the quadratic's valley really is at 45 degrees
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{result.objective.title}: f = {result.objective.formula}\n"
                 f"{result.steps} steps, constant lr, seed {result.seed}; small markers every "
                 f"~{max(1, result.steps // MARKERS_PER_PATH)} steps, large marker = final point", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(result: ToyResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for index, run in enumerate(result.runs):
        style = _style(run, index)
        # A log axis cannot show 0 or inf: leave a gap there instead of a plunge or a spike.
        losses = np.where(np.isfinite(run.losses) & (run.losses > 0), run.losses, np.nan)
        ax.plot(np.arange(len(losses)), losses, color=style["color"], linestyle=style["linestyle"], linewidth=1.3,
                label=_label(run))
    ax.axhline(result.loss_threshold, color="black", linestyle=":", linewidth=1,
               label=f"threshold {result.loss_threshold:g}")
    ax.set_yscale("log")
    # A diverged run would stretch the axis to 1e300 and flatten everyone else: it leaves through the top.
    kept = [r.losses for r in result.runs if r.diverged_at is None] or [r.losses for r in result.runs]
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in kept])
    if finite.size:
        ax.set_ylim(min(finite.min(), result.loss_threshold) / 10, 10 * finite.max())
    ax.set_xlabel("step")
    ax.set_ylabel("f(x, y) at the optimizer's point (log scale)")
    ax.set_title(f"{result.objective.title}: loss per step from {tuple(round(v, 4) for v in result.start)}, "
                 f"seed {result.seed}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_toy_plots(result: ToyResult, out_dir: Path | str) -> list[Path]:
    """Write toy_FUNCTION_paths.png and toy_FUNCTION_loss.png into out_dir (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result.objective.name
    return [plot_paths(result, out_dir / f"toy_{name}_paths.png"),
            plot_losses(result, out_dir / f"toy_{name}_loss.png")]
