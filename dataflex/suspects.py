"""The examples a noise detector finds most suspect, as a table a person reads before dropping anything.

A detector's AUROC says how well it ranks on a benchmark with a known mask; on one's own data there is no mask,
and the way to trust (or not) a cleaning step is to read what it would drop. :func:`suspects_table` lists the
``top`` examples by noise score (:func:`dataflex.detectors.noise_scores`, ``out_of_fold_scores``,
``prompt_support_scores``: higher = more suspect; ties by id; examples without a finite score, such as those
never visited, are not listed) with any text columns given, shortened to one line each, and — where the truth
is known (planted noise, AUM's threshold examples) — whether each listed example really is wrong and the
precision of the list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dataflex.ranking import rank_ids

__all__ = ["most_suspect", "suspects_table"]


def most_suspect(scores: Sequence[float] | np.ndarray, top: int) -> np.ndarray:
    """Ids of the ``top`` highest finite scores, most suspect first (ties by id); fewer when fewer are scored."""
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
        raise ValueError(f"top must be a whole number >= 1; got {top!r}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ranked = rank_ids(s, descending=True)
    return ranked[: min(int(top), int(np.isfinite(s).sum()))]


def _one_line(text: object, width: int) -> str:
    """``text`` on one line of at most ``width`` characters, safe inside a Markdown table cell."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def suspects_table(
    scores: Sequence[float] | np.ndarray,
    columns: Mapping[str, Sequence[object]],
    *,
    top: int = 20,
    known_wrong: Sequence[bool] | np.ndarray | None = None,
    width: int = 60,
) -> str:
    """Markdown: the ``top`` most suspect examples (rank, id, score, each of ``columns`` — e.g. ``{"task": ...,
    "prompt": ..., "response": ...}``, one value per example — and, with ``known_wrong``, whether each is)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    for name, values in {**columns, **({"known_wrong": known_wrong} if known_wrong is not None else {})}.items():
        if len(values) != s.size:
            raise ValueError(f"column {name!r} has {len(values)} values for {s.size} scored examples")
    ids = most_suspect(s, top)
    head = ["rank", "id", "score", *columns] + (["wrong"] if known_wrong is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, i in enumerate(ids, start=1):
        cells = [str(rank), str(int(i)), f"{s[i]:.4g}", *(_one_line(values[i], width) for values in columns.values())]
        if known_wrong is not None:
            cells.append("yes" if known_wrong[i] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    unscored = int((~np.isfinite(s)).sum())
    notes = [f"{len(ids)} most suspect of {s.size} examples"]
    if unscored:
        notes[0] += f" ({unscored} without a finite score)"
    if known_wrong is not None and len(ids):
        wrong = np.asarray(known_wrong, dtype=bool)
        notes.append(
            f"{int(wrong[ids].sum())} of these {len(ids)} are known wrong (precision {wrong[ids].mean():.2f}; "
            f"{wrong.mean():.2f} of all examples are)"
        )
    return "; ".join(notes) + ".\n\n" + "\n".join(lines) + "\n"
