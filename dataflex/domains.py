"""Domain labels: turning a column of names into integer ids with a fixed, documented order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["encode_domains"]


def encode_domains(labels: Sequence[str], domain_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map per-example domain labels to ids.

    Without ``domain_names`` the domains are the sorted unique labels, so the order is the same on
    every rank and every run. With ``domain_names`` every label must be one of them and every name
    must occur at least once (a domain with no examples cannot be sampled, so it is an error).
    """
    labels = [str(x) for x in labels]
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
