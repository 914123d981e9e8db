"""Which examples to train on next: pure selection rules over per-example scores.

Every rule takes scores for a candidate pool (NaN = not scored yet) and a budget ``fraction`` and
returns the chosen example ids, sorted. Ties are broken by id so the result is deterministic.

* :func:`select_by_loss` — loss focus: the hardest, the easiest or the middle of the pool by loss.
* :func:`select_reducible` — RHO-LOSS (Mindermann et al., arXiv 2206.07137): the largest
  ``loss - irreducible_loss``, where the irreducible loss comes from a model trained on a holdout split.
* :func:`select_top` — the highest scores (e.g. LESS/TracIn influence, arXiv 2402.04333 / 2002.08484).
* :func:`select_random` — the same budget uniformly at random: the baseline every benchmark reports.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dataflex.ranking import rank_ids

__all__ = ["budget", "select_by_loss", "select_random", "select_reducible", "select_top"]


def budget(n: int, fraction: float) -> int:
    """Number of examples a ``fraction`` of ``n`` keeps (at least one)."""
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    if n <= 0:
        raise ValueError(f"the candidate pool is empty (n={n})")
    return max(1, int(round(n * fraction)))


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of examples with the highest finite scores."""
    s = np.asarray(scores, dtype=np.float64)
    k = budget(s.shape[0], fraction)
    return np.sort(rank_ids(s, descending=True)[:k])


def select_by_loss(losses: np.ndarray, fraction: float, mode: Literal["hard", "medium", "easy"] = "hard") -> np.ndarray:
    """Loss focus: ``hard`` = highest losses, ``easy`` = lowest, ``medium`` = centred on the median.

    Unscored examples (NaN) are never chosen while enough scored ones exist.
    """
    s = np.asarray(losses, dtype=np.float64)
    k = budget(s.shape[0], fraction)
    if mode == "hard":
        return np.sort(rank_ids(s, descending=True)[:k])
    if mode == "easy":
        return np.sort(rank_ids(s, descending=False)[:k])
    if mode == "medium":
        order = rank_ids(s, descending=False)
        finite = int(np.isfinite(s).sum())
        start = max(0, min(finite - k, (finite - k) // 2)) if finite >= k else 0
        return np.sort(order[start : start + k])
    raise ValueError(f"mode={mode!r}; valid values are 'hard', 'medium', 'easy'")


def select_reducible(losses: np.ndarray, irreducible: np.ndarray, fraction: float) -> np.ndarray:
    """RHO-LOSS: highest reducible loss ``loss - irreducible`` (learnable, worth learning, not yet learnt)."""
    losses = np.asarray(losses, dtype=np.float64)
    irreducible = np.asarray(irreducible, dtype=np.float64)
    if losses.shape != irreducible.shape:
        raise ValueError(f"losses {losses.shape} and irreducible losses {irreducible.shape} differ in shape")
    return select_top(losses - irreducible, fraction)


def select_random(n: int, fraction: float, seed: int) -> np.ndarray:
    """A uniformly random subset of the same budget (seeded)."""
    k = budget(n, fraction)
    return np.sort(np.random.default_rng(np.random.SeedSequence([seed, n, k])).choice(n, size=k, replace=False))
