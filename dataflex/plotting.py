"""Plots of mixture weights over training, readable for any number of domains.

matplotlib's default cycle repeats after 10 colours, so with more domains two bands of a stacked plot share a
colour and the legend cannot tell them apart; a single legend column of 40 names runs off the figure. Colours
here are distinct for any count (tab10, tab20, then evenly spaced samples of a perceptually ordered map), and
the legend grows columns and the figure widens with the number of domains, up to 60 names (beyond, it names the 60
domains that reached the largest weights and counts the rest). Names are drawn with the characters
the plot's fonts have: a character none of them has (CJK with matplotlib's bundled fonts) would be an empty box, so
two such domains would look the same in the legend; it is written as its code point instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["domain_colors", "drawable_names", "plot_weight_trajectory"]

LEGEND_ROWS = 20  # names per legend column
LEGEND_MAX = 60  # names in a legend at most (three columns); the domains with the largest peak weights


def domain_colors(count: int) -> list:
    """``count`` distinct colours (RGBA tuples), in domain order."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](x) for x in np.linspace(0.03, 0.97, count)]


def _drawable_characters() -> frozenset[int]:
    """The code points some font of matplotlib's current family list has a glyph for (the fonts it falls back
    through, generic names such as ``sans-serif`` expanded to their configured lists)."""
    from matplotlib import font_manager, rcParams

    names: list[str] = []
    for family in rcParams["font.family"]:
        names += rcParams.get(f"font.{family}", [family]) if family in font_manager.font_family_aliases else [family]
    return _characters_of(tuple(names))


@functools.lru_cache(maxsize=8)
def _characters_of(names: tuple[str, ...]) -> frozenset[int]:
    """The code points the installed fonts of ``names`` have (read once per family list: a sweep plot asks per
    label)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    drawable: set[int] = set()
    for name in names:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        except ValueError:  # (not installed)
            continue
        drawable |= set(FT2Font(path).get_charmap())
    return frozenset(drawable)


def drawable_names(names: Sequence[str]) -> list[str]:
    """``names`` as a plot can draw them: each character no font of the plot has becomes its code point
    (``日本語`` -> ``\\u65e5\\u672c\\u8a9e`` with matplotlib's bundled fonts), so distinct names stay distinct;
    a dollar sign is escaped, so it is drawn as itself rather than opening a formula."""
    drawable = _drawable_characters()
    if not drawable:  # (no font file found to ask: leave the names to matplotlib's own fallback)
        drawable = {ord(c) for name in names for c in str(name)}

    def spell(character: str) -> str:
        if character == "$":  # two of them would start mathtext ("cost $5 or $6" drawn as a formula)
            return "\\$"
        if ord(character) in drawable or character.isspace():
            return character
        return f"\\u{ord(character):04x}" if ord(character) <= 0xFFFF else f"\\U{ord(character):08x}"

    return ["".join(spell(c) for c in str(name)) for name in names]


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
    # Past LEGEND_MAX domains (clusters as domains) a legend of every name is unreadable and widened the figure
    # to thousands of pixels: every band is drawn, the legend names the domains that reached the largest weight.
    shown = np.arange(len(domains))
    if len(domains) > LEGEND_MAX:
        shown = np.sort(np.argsort(-weights.max(0), kind="stable")[:LEGEND_MAX])
    entries = len(shown) + (len(shown) < len(domains))
    columns = max(1, math.ceil(entries / LEGEND_ROWS))
    fig, ax = plt.subplots(figsize=(6.5 + 1.8 * columns, 4.5))
    bands = ax.stackplot(steps, weights.T, colors=domain_colors(len(domains)), step="post")
    labels = drawable_names(domains)
    handles, names = [bands[i] for i in shown], [labels[i] for i in shown]
    if len(shown) < len(domains):
        from matplotlib.patches import Patch

        handles.append(Patch(color="none"))
        names.append(f"... {len(domains) - len(shown)} more domains (lower peak weights)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sampling weight")
    ax.set_xlim(0, max(steps) if len(steps) and max(steps) > 0 else 1)
    ax.set_ylim(0, 1)
    ax.set_title(drawable_names([title])[0])
    ax.legend(
        handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8 if entries <= LEGEND_ROWS else 7,
        ncol=columns,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
