"""Small PNG plots embedded as markdown, which the Dagster UI renders inline."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from e6score_dagster.report import not_kept_sentence  # noqa: E402


def _to_md(fig, title: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def histogram_md(values: np.ndarray, xlabel: str, bins: int = 50) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=bins)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("posts")
    return _to_md(fig, xlabel)


def calibration_md(pit: np.ndarray, bins: int = 20) -> str:
    """PIT histogram: flat when the predictive distribution is calibrated."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(pit, bins=bins, range=(0, 1), density=True)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel("predictive CDF at the observed count (held-out)")
    ax.set_ylabel("density")
    return _to_md(fig, "calibration")


def scatter_md(observed: np.ndarray, predicted: np.ndarray, max_points: int = 5000) -> str:
    """Predicted vs observed favourites on log axes, a random subsample."""
    rng = np.random.default_rng(0)
    idx = rng.choice(observed.size, size=min(max_points, observed.size), replace=False)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(predicted[idx] + 1, observed[idx] + 1, s=2, alpha=0.3)
    top = max(float(observed.max(initial=1)), float(predicted.max(initial=1))) + 1
    ax.plot([1, top], [1, top], "k--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("expected favourites + 1")
    ax.set_ylabel("observed favourites + 1")
    return _to_md(fig, "predicted vs observed")


def stage_curves_md(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    best_steps: Mapping[str, int],
    kept: Mapping[str, bool],
    ylabel: str = "validation NLL",
) -> str:
    """One plot, a line per fitted stage, each stage's chosen stopping step marked; below it a
    sentence for every stage that was not kept."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    last_steps = [pts[-1][0] for pts in curves.values() if pts]
    for name, points in curves.items():
        if not points:
            continue
        x, y = zip(*points, strict=True)
        label = name if kept.get(name, True) else f"{name} (not kept)"
        (line,) = ax.plot(x, y, label=label, ls="-" if kept.get(name, True) else "--")
        if name in best_steps:
            best = best_steps[name]
            at = min(points, key=lambda p: abs(p[0] - best))
            ax.plot([at[0]], [at[1]], "o", color=line.get_color(), ms=7, mfc="none", mew=2)
    if last_steps and max(last_steps) > 20 * max(min(last_steps), 1):
        # Stages of very different lengths: a log step axis keeps the short ones visible.
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("step within the stage (log scale); circle: chosen stopping step")
    else:
        ax.set_xlabel("step within the stage; circle: chosen stopping step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    md = _to_md(fig, "stage curves")
    notes = [
        not_kept_sentence(name, best_steps.get(name)) for name in curves if not kept.get(name, True)
    ]
    return "\n\n".join([md, *notes])
