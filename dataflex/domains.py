"""Domain labels: turning a column of names into integer ids with a fixed, documented order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["encode_domains", "label_texts"]


def _missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))  # float('nan'), np.nan, NaN of any float type
    except (TypeError, ValueError):
        return False


def label_texts(labels: Sequence[object], what: str = "domain labels") -> list[str]:
    """Labels as text, refusing what text would silently distort.

    A missing label (``None``, NaN, an empty or blank string) would become a domain called ``"None"``,
    ``"nan"`` or ``""``; two labels that differ but print alike (``1`` and ``"1"``) would merge into one
    domain, and two that differ only by surrounding whitespace (``"code"``, ``"code "``) would split one;
    all raise ``ValueError`` naming the positions or values.
    """
    labels = list(labels)
    missing = [i for i, x in enumerate(labels) if _missing(x)]
    if missing:
        raise ValueError(
            f"{what} are missing (None or NaN) at {len(missing)} of {len(labels)} examples, first at positions "
            f"{missing[:10]}; give every example a label, or drop the unlabelled ones before training"
        )
    texts = [str(x) for x in labels]
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise ValueError(
            f"{what} are empty or blank at {len(blank)} of {len(labels)} examples, first at positions {blank[:10]} "
            "(an empty cell, usually a missing label, would become a domain of its own); give every example a "
            "label, or drop the unlabelled ones before training"
        )
    # "code" and "code " would be two domains, and weights given for "code" would never reach the second.
    by_stripped: dict[str, set[str]] = {}
    for t in set(texts):
        by_stripped.setdefault(t.strip(), set()).add(t)
    padded = sorted(sorted(v) for v in by_stripped.values() if len(v) > 1)
    if padded:
        raise ValueError(
            f"{what} differ only by surrounding whitespace: {padded[:5]}; they would be separate domains — "
            "strip the labels before training"
        )
    originals: dict[str, object] = {}
    for x, text in zip(labels, texts):
        seen = originals.setdefault(text, x)
        if seen is not x and not bool(seen == x):
            raise ValueError(
                f"{what} {seen!r} ({type(seen).__name__}) and {x!r} ({type(x).__name__}) both read as {text!r} and "
                "would merge into one domain; use labels of one type"
            )
    return texts


def encode_domains(labels: Sequence[str], domain_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map per-example domain labels to ids.

    Without ``domain_names`` the domains are the sorted unique labels, so the order is the same on
    every rank and every run. With ``domain_names`` every label must be one of them and every name
    must occur at least once (a domain with no examples cannot be sampled, so it is an error).
    """
    labels = label_texts(labels)
    if len(labels) == 0:
        raise ValueError("the dataset has no examples: need at least one domain label")
    present = sorted(set(labels))
    if domain_names is None:
        names = present
    else:
        names = [str(x) for x in domain_names]
        if len(set(names)) != len(names):
            raise ValueError(f"domain_names has duplicates: {names}")
        unknown = sorted(set(present) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown} are not among domain_names {names}")
        empty = [n for n in names if n not in set(present)]
        if empty:
            raise ValueError(f"domain(s) {empty} have no examples; remove them from domain_names or add data")
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[x] for x in labels], dtype=np.int64), names
