"""Plots of mixture weights over training, readable for any number of domains.

matplotlib's default cycle repeats after 10 colours, so with more domains two bands of a stacked plot share a
colour and the legend cannot tell them apart; a single legend column of 40 names runs off the figure. Colours
here are distinct for any count (tab10, tab20, then evenly spaced samples of a perceptually ordered map), and
the legend grows columns and the figure widens with the number of domains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["domain_colors", "plot_weight_trajectory"]

LEGEND_ROWS = 20  # names per legend column


def domain_colors(count: int) -> list:
    """``count`` distinct colours (RGBA tuples), in domain order."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](x) for x in np.linspace(0.03, 0.97, count)]


def plot_weight_trajectory(
    steps: Sequence[int],
    weights: np.ndarray,
    domains: Sequence[str],
    path: Path,
    *,
    title: str,
    xlabel: str = "optimizer step",
    dpi: int = 120,
) -> None:
    """Stacked sampling weights (``weights[t, k]`` at ``steps[t]``, held until the next step) saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = np.asarray(weights, dtype=np.float64)
    columns = max(1, math.ceil(len(domains) / LEGEND_ROWS))
    fig, ax = plt.subplots(figsize=(6.5 + 1.8 * columns, 4.5))
    ax.stackplot(steps, weights.T, labels=list(domains), colors=domain_colors(len(domains)), step="post")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sampling weight")
    ax.set_xlim(0, max(steps) if len(steps) and max(steps) > 0 else 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(
        loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8 if len(domains) <= LEGEND_ROWS else 7, ncol=columns
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
