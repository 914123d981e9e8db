"""Example ids ranked by a per-example score: the one ordering rule selection, curricula and scoring share.

Ties are broken by id and non-finite scores (NaN: not scored) go last in either direction, so a
ranking is deterministic and the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["rank_ids"]


def rank_ids(scores: Sequence[float] | np.ndarray, descending: bool = False) -> np.ndarray:
    """Ids ordered by score, lowest first (highest first with ``descending``); NaN last, ties by id."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    key = np.where(np.isfinite(s), -s if descending else s, np.inf)
    return np.lexsort((np.arange(s.size), key))
