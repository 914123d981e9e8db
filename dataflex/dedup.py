"""SemDeDup (Abbas et al. 2023, arXiv 2303.09540): drop semantic near-duplicates inside each cluster.

Embeddings are normalised and clustered (:func:`dataflex.clustering.kmeans`); within a cluster the
members are visited in a fixed order and a member is dropped when its cosine similarity to an
already *kept* member exceeds ``1 - eps``. Only pairs inside a cluster are compared, which is what
makes it cheap: the cost is the sum of squared cluster sizes instead of n squared.

Visiting order: ``"far"`` (the paper's choice) visits members farthest from the cluster centroid
first, so the least prototypical copy of a duplicate group is kept; ``"index"`` visits in dataset
order, so the first occurrence is kept (useful when earlier ids are the originals).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["normalise", "semdedup"]


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def semdedup(
    embeddings: np.ndarray,
    labels: np.ndarray,
    eps: float,
    *,
    order: Literal["far", "index"] = "far",
) -> np.ndarray:
    """Boolean keep-mask over examples: within each cluster, no two kept examples have cosine > 1 - eps."""
    if not 0 <= eps < 1:
        raise ValueError(f"eps must lie in [0, 1) (similarity threshold 1 - eps); got {eps}")
    if order not in ("far", "index"):
        raise ValueError(f"order={order!r}; valid values are 'far', 'index'")
    x = normalise(embeddings)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{labels.shape[0]} cluster labels for {x.shape[0]} embeddings")
    keep = np.ones(x.shape[0], dtype=bool)
    threshold = 1.0 - eps
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        if members.size < 2:
            continue
        if order == "far":
            centroid = x[members].mean(0)
            centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
            closeness = x[members] @ centroid
            members = members[np.lexsort((members, closeness))]  # least similar to the centroid first
        sims = x[members] @ x[members].T
        kept_local: list[int] = []
        for j in range(members.size):
            if kept_local and float(sims[j, kept_local].max()) > threshold:
                keep[members[j]] = False
            else:
                kept_local.append(j)
    return keep
