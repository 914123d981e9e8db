"""Domain labels: turning a column of names into integer ids with a fixed, documented order."""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Callable, Hashable, Sequence

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
    ``"nan"`` or ``""``; a list or mapping (several tags per example) would make every combination a domain;
    two labels that differ but print alike (``1`` and ``"1"``; ``"café"`` composed and decomposed) would merge
    into one domain or make two of one name, two equal values that print differently (``1`` and ``1.0``) and
    two that differ only by surrounding whitespace (``"code"``, ``"code "``) would split one; all raise
    ``ValueError`` naming the positions or values. (:func:`encode_domains` also warns of labels that differ only
    in case: those may be meant.)
    """
    labels = list(labels)
    if set(map(type, labels)) <= {str}:
        # The common case, a text column: every check below is on its few distinct values (C-speed set building;
        # a per-example Python pass costs seconds at 10M examples).
        texts, distinct = labels, set(labels)
    else:
        texts = _texts_of_values(labels, what)
        distinct = set(texts)
    if any(not t.strip() for t in distinct):
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        raise ValueError(
            f"{what} are empty or blank at {len(blank)} of {len(labels)} examples, first at positions {blank[:10]} "
            "(an empty cell, usually a missing label, would become a domain of its own); give every example a "
            "label, or drop the unlabelled ones before training"
        )
    # "code" and "code " would be two domains, and weights given for "code" would never reach the second.
    padded = _variants(distinct, str.strip)
    if padded:
        raise ValueError(
            f"{what} differ only by surrounding whitespace: {padded[:5]}; they would be separate domains — "
            "strip the labels before training"
        )
    # The same visible name in two Unicode forms (composed "é" vs "e" + combining accent) would be two domains
    # that print identically in every table and log.
    forms = _variants(distinct, lambda t: unicodedata.normalize("NFC", t))
    if forms:
        raise ValueError(
            f"{what} differ only in Unicode normalisation: {[[ascii(t) for t in v] for v in forms[:5]]}; they print "
            "alike but would be separate domains — normalise them first (unicodedata.normalize('NFC', label))"
        )
    return texts


def _texts_of_values(labels: list[object], what: str) -> list[str]:
    """``str`` of every label, refusing containers, missing values and values whose text misleads."""
    nested = [i for i, x in enumerate(labels) if isinstance(x, (list, tuple, dict, set, frozenset, np.ndarray))]
    if nested:
        i = nested[0]
        raise ValueError(
            f"{what} must be one value per example (text, a number or a bool); {len(nested)} of {len(labels)} are "
            f"{type(labels[i]).__name__}s, first at position {i}: {labels[i]!r}. Several tags per example would "
            "make every combination a domain: choose one tag, or join them into one string if the combination "
            "is meant as the domain"
        )
    missing = [i for i, x in enumerate(labels) if _missing(x)]
    if missing:
        raise ValueError(
            f"{what} are missing (None or NaN) at {len(missing)} of {len(labels)} examples, first at positions "
            f"{missing[:10]}; give every example a label, or drop the unlabelled ones before training"
        )
    texts = [str(x) for x in labels]
    # 1 and 1.0 (or True) are one value to Python, so weights keyed by either would be ambiguous.
    texts_of_value: dict[object, set[str]] = {}
    for x, text in zip(labels, texts):
        texts_of_value.setdefault(x if isinstance(x, Hashable) else text, set()).add(text)
    split = sorted(sorted(v) for v in texts_of_value.values() if len(v) > 1)
    if split:
        raise ValueError(
            f"{what} hold equal values that print differently: {split[:5]} (e.g. 1 and 1.0 from columns of two "
            "types); they would be separate domains — use labels of one type"
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


def _variants(texts: set[str], key: Callable[[str], str]) -> list[list[str]]:
    """Groups of distinct texts that ``key`` maps to one value (sorted, for a stable message)."""
    groups: dict[str, list[str]] = {}
    for t in texts:
        groups.setdefault(key(t), []).append(t)
    return sorted(sorted(v) for v in groups.values() if len(v) > 1)


def _warn_of_case_variants(names: Sequence[str]) -> None:
    cased = _variants(set(names), str.casefold)
    if cased:
        warnings.warn(
            f"domain labels differ only in case: {cased[:5]}; each is a domain of its own. If they are meant as one, "
            "lower-case the labels before training",
            stacklevel=3,
        )


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
    _warn_of_case_variants(present)
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
