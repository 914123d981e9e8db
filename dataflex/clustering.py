"""k-means with faiss: seeded, CPU by default, the GPU build when it is installed and a GPU is present.

faiss runs Lloyd iterations with BLAS distance computations — on CPU as fast as scikit-learn's Lloyd per
iteration, while its k-means++ seeding is far cheaper, about 4x end to end at 100k x 256, k = 256
(``benchmarks/clusters/kmeans_speed.py``). Two faiss defaults are changed on
purpose: it would *subsample* to 256 points per centroid (we train on every point unless told
otherwise, so results do not depend on a hidden sample), and it prints nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["KMeansResult", "cluster_names", "gpu_available", "kmeans"]


@dataclass
class KMeansResult:
    labels: np.ndarray  # (n,) int64 cluster of each point
    centroids: np.ndarray  # (k, d) float32
    inertia: float  # sum of squared distances of points to their centroid
    seconds: float
    on_gpu: bool


def gpu_available() -> bool:
    """True when the faiss GPU build is installed and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    spherical: bool = False,
    gpu: bool | None = None,
    max_points_per_centroid: int | None = None,
    init: str = "k-means++",
    init_centroids: np.ndarray | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters (faiss Lloyd k-means, random init from ``seed``).

    ``gpu=None`` uses the GPU when :func:`gpu_available`; ``True`` requires it. ``spherical`` keeps unit
    centroids (cosine k-means, as SemDeDup uses on normalised embeddings). ``init``: ``"k-means++"``
    (D^2-weighted seeding, Arthur & Vassilvitskii 2007; fewer bad local minima) or ``"random"`` points;
    ``init_centroids`` (k, d) starts from given centroids instead (e.g. the previous clustering when
    re-clustering during training, or to compare implementations from one starting point).
    """
    import faiss

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (n, d) array; got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()
        raise ValueError(f"x has non-finite values in rows {bad}...; embed those examples again or drop them")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n={n}]; got {k}")
    inits = {"k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS, "random": faiss.ClusteringInitMethod_RANDOM}
    if init not in inits:
        raise ValueError(f"init={init!r}; valid values are {', '.join(inits)}")
    use_gpu = gpu_available() if gpu is None else bool(gpu)
    if use_gpu and not gpu_available():
        raise RuntimeError("gpu=True but no GPU is visible to faiss (install faiss-gpu and check CUDA)")
    per_centroid = max_points_per_centroid or -(-n // k) + 1  # default: never subsample
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        verbose=False,
        gpu=use_gpu,
        init_method=inits[init],
        max_points_per_centroid=per_centroid,
    )
    start = time.perf_counter()
    if init_centroids is not None:
        init_centroids = np.ascontiguousarray(np.asarray(init_centroids, dtype=np.float32))
        if init_centroids.shape != (k, d):
            raise ValueError(f"init_centroids must have shape ({k}, {d}); got {init_centroids.shape}")
    km.train(x, init_centroids=init_centroids)
    dist, labels = km.index.search(x, 1)
    seconds = time.perf_counter() - start
    return KMeansResult(labels[:, 0].astype(np.int64), km.centroids.copy(), float(dist.sum()), seconds, use_gpu)


def cluster_names(labels: np.ndarray) -> list[str]:
    """String labels (``c007``) so clusters can be used as domains by the mixing samplers and callback."""
    labels = np.asarray(labels)
    width = len(str(int(labels.max()))) if labels.size else 1
    return [f"c{int(c):0{width}d}" for c in labels]
