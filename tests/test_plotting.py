"""Weight-trajectory plots stay readable for many domains: distinct colours, a legend that fits the figure."""

from __future__ import annotations

import numpy as np
import pytest

from dataflex.plotting import domain_colors, plot_weight_trajectory


@pytest.mark.parametrize("count", [3, 8, 15, 40, 120])
def test_every_domain_gets_its_own_colour(count):
    colours = domain_colors(count)
    assert len(colours) == count and len(set(colours)) == count


def test_a_forty_domain_plot_keeps_its_legend_inside_the_figure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    save = plt.Figure.savefig

    def record(fig, path, **kw):  # the legend's extent, measured as drawn
        save(fig, path, **kw)
        renderer = fig.canvas.get_renderer()
        seen["legend"] = fig.axes[0].get_legend().get_window_extent(renderer)
        seen["figure"] = fig.bbox

    monkeypatch.setattr(plt.Figure, "savefig", record)
    weights = np.random.default_rng(0).dirichlet(np.ones(40), size=6)
    plot_weight_trajectory(
        range(0, 60, 10), weights, [f"domain_{i:02d}" for i in range(40)], tmp_path / "w.png", title="t"
    )
    assert (tmp_path / "w.png").stat().st_size > 0
    legend, figure = seen["legend"], seen["figure"]
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 and figure.y0 <= legend.y0 and legend.y1 <= figure.y1


def test_names_the_fonts_cannot_draw_stay_distinct_and_dollars_stay_dollars(tmp_path):
    """Domain names in a script the plot's fonts lack (CJK with matplotlib's bundled fonts) were drawn as rows of
    empty boxes, two such domains alike in the legend; two dollar signs made a name a formula."""
    import warnings

    from matplotlib.text import Text

    from dataflex.plotting import _drawable_characters, drawable_names

    names = ["日本語", "中文", "prose.en", "Café", "cost $5 or $6"]
    labels = drawable_names(names)
    assert len(set(labels)) == len(names)
    assert labels[2:4] == ["prose.en", "Café"]  # what the fonts have is left as it is
    drawable = _drawable_characters()
    assert all(ord(c) in drawable for label in labels for c in label)
    assert Text()._preprocess_math(labels[4]) == ("cost $5 or $6", False)  # drawn as written, not as mathtext
    weights = np.full((3, len(names)), 1 / len(names))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns for each glyph it has to draw as a box
        plot_weight_trajectory([0, 10, 20], weights, names, tmp_path / "w.png", title="odm 日本語")


def test_a_thousand_domains_keep_a_readable_figure_whose_legend_names_the_heaviest(tmp_path, monkeypatch):
    """Clusters as domains: a legend of 1000 names made an 11580-pixel-wide figure nobody could read."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from dataflex.plotting import LEGEND_MAX

    seen = {}
    save = plt.Figure.savefig

    def record(fig, path, **kw):
        save(fig, path, **kw)
        seen["names"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]

    monkeypatch.setattr(plt.Figure, "savefig", record)
    weights = np.random.default_rng(0).dirichlet(np.ones(1000), size=4)
    weights[2, 999] += 5.0  # one domain that peaks high at one step only
    weights /= weights.sum(1, keepdims=True)
    names = [f"cluster_{i}" for i in range(1000)]
    plot_weight_trajectory(range(4), weights, names, tmp_path / "w.png", title="t")
    assert Image.open(tmp_path / "w.png").size[0] < 1800
    named = seen["names"][:-1]
    heaviest = np.argsort(-weights.max(0), kind="stable")[:LEGEND_MAX]
    assert named == [names[i] for i in sorted(heaviest)] and "cluster_999" in named
    assert seen["names"][-1] == f"... {1000 - LEGEND_MAX} more domains (lower peak weights)"


def test_a_font_added_to_matplotlibs_family_list_draws_its_characters_unescaped():
    """The escape is for characters no font of the plot has: a user who lists a font that has them (a CJK font, here
    STIX for a letter DejaVu lacks) gets them drawn as they are."""
    import matplotlib

    from dataflex.plotting import drawable_names

    letter = "\u1d81"  # (LATIN SMALL LETTER D WITH PALATAL HOOK: in STIXGeneral, not in DejaVu Sans)
    assert drawable_names([f"d{letter}"]) == ["d\\u1d81"]
    with matplotlib.rc_context({"font.family": ["DejaVu Sans", "STIXGeneral"]}):
        assert drawable_names([f"d{letter}"]) == [f"d{letter}"]
