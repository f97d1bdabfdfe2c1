"""Small PNG plots embedded as markdown, which the Dagster UI renders inline."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _to_md(fig, title: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def line_plot_md(points: Sequence[tuple[float, float]], xlabel: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    if points:
        x, y = zip(*points, strict=True)
        ax.plot(x, y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _to_md(fig, ylabel)


def histogram_md(values: np.ndarray, xlabel: str, bins: int = 50) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=bins)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("posts")
    return _to_md(fig, xlabel)
