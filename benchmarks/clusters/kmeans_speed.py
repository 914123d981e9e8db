"""k-means speed: dataflex's faiss path vs scikit-learn's Lloyd KMeans on the same embeddings.

    python -m benchmarks.clusters.kmeans_speed               # 100k x 256, k = 256, 20 iterations (~6 min)
    python -m benchmarks.clusters.kmeans_speed --n 20000     # smaller

Embeddings are real: mean-pooled last hidden states (width 256) of a tiny byte-level GPT-2 over
``--n`` windows of textmix training text, extracted with the library's own path
(``dataflex.embeddings.hidden_state_embedder`` + ``dataflex.offline.score_pool``); that extraction is
timed and reported separately. Three comparisons, each ``--repeats`` times in alternating order
(median wall time, ratio = scikit-learn / dataflex), every run exactly ``--iters`` Lloyd iterations
(scikit-learn with ``tol=0``) over *all* points:

* ``lloyd``: both start from the same k random points, so only the iterations are compared and the
  inertias must agree to well within 1 %;
* ``k-means++``: each library seeds with its own k-means++ (``dataflex.clustering.kmeans`` default,
  ``KMeans(init="k-means++", n_init=1)``), i.e. the end-to-end cost a user pays;
* ``defaults``: plain ``faiss.Kmeans`` with faiss's defaults (random seeding, trains on a sample of
  256 points per centroid) vs ``KMeans`` with its defaults, for comparison with the raw-faiss figure.

GFLOP/s counts the distance computations of the iterations only (2 n k d per iteration). Writes
``kmeans_speed.md`` / ``kmeans_speed.json`` beside this file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.report import write_results

HERE = Path(__file__).resolve().parent


def windows(n: int, width: int) -> list[dict]:
    from dataflex.testbeds.tiny import default_data_dir, load_jsonl_dir

    out: list[dict] = []
    for record in load_jsonl_dir(default_data_dir() / "textmix" / "train"):
        data = record["text"].encode("utf-8")
        for start in range(0, len(data) - width + 1, width):
            out.append({"input_ids": list(data[start : start + width])})
            if len(out) == n:
                return out
    raise ValueError(f"textmix holds only {len(out)} windows of {width} bytes; lower --n or --window")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--window", type=int, default=64, help="bytes per embedded text window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side per comparison")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()

    import faiss
    from sklearn.cluster import KMeans

    from dataflex.clustering import kmeans
    from dataflex.embeddings import hidden_state_embedder
    from dataflex.offline import score_pool
    from dataflex.testbeds.tiny import collate_causal, tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_embd=256, n_head=4, n_positions=args.window, seed=args.seed)
    texts = windows(args.n, args.window)
    t0 = time.perf_counter()
    x = score_pool(hidden_state_embedder(model), texts, collate_causal, batch_size=256, desc="embedding")
    embed_s = time.perf_counter() - t0
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k, iters = args.k, args.iters
    init = x[np.random.default_rng(args.seed).choice(n, size=k, replace=False)].copy()

    def plain_faiss() -> float:
        km = faiss.Kmeans(d, k, niter=iters, seed=args.seed)
        km.train(x)
        return float(km.index.search(x, 1)[0].sum())

    def sk(init_arg, tol: float = 0.0) -> float:
        model = KMeans(n_clusters=k, init=init_arg, n_init=1, max_iter=iters, tol=tol, random_state=args.seed)
        return float(model.fit(x).inertia_)

    comparisons = {
        "lloyd": (lambda: kmeans(x, k, niter=iters, init_centroids=init).inertia, lambda: sk(init)),
        "k-means++": (lambda: kmeans(x, k, niter=iters, seed=args.seed).inertia, lambda: sk("k-means++")),
        "defaults": (plain_faiss, lambda: sk("k-means++", tol=1e-4)),
    }
    flop = 2.0 * n * k * d * iters
    rows = {}
    for name, (ours, theirs) in tqdm(comparisons.items(), desc="k-means comparisons"):
        times: dict[str, list[float]] = {"dataflex": [], "sklearn": []}
        inertia = {}
        for r in range(args.repeats):
            order = [("dataflex", ours), ("sklearn", theirs)][:: 1 if r % 2 == 0 else -1]
            for who, fn in order:
                t0 = time.perf_counter()
                inertia[who] = fn()
                times[who].append(time.perf_counter() - t0)
        ours_s, theirs_s = float(np.median(times["dataflex"])), float(np.median(times["sklearn"]))
        rows[name] = {
            "dataflex_seconds": times["dataflex"],
            "sklearn_seconds": times["sklearn"],
            "speedup": theirs_s / ours_s,
            "dataflex_gflops": flop / ours_s / 1e9,
            "sklearn_gflops": flop / theirs_s / 1e9,
            "dataflex_inertia": inertia["dataflex"],
            "sklearn_inertia": inertia["sklearn"],
            "inertia_rel_diff": abs(inertia["dataflex"] - inertia["sklearn"]) / inertia["sklearn"],
        }
    labels = {
        "lloyd": "Lloyd only, same initial centroids",
        "k-means++": "k-means++ seeding + Lloyd (each library's own seeding)",
        "defaults": f"plain `faiss.Kmeans` defaults (trains on {min(n, 256 * k):,} points) vs `KMeans` defaults",
    }
    md = [
        f"{n} x {d} float32 embeddings, k = {k}, {iters} iterations; "
        f"median of {args.repeats} alternating runs; GFLOP/s = 2 n k d iters / seconds. Embedding extraction "
        f"(library path, separate): {embed_s:.0f} s ({n / embed_s:.0f} windows/s).",
        "",
        "| comparison | dataflex / faiss s | scikit-learn s | speed-up | GFLOP/s dataflex / sklearn "
        "| inertia rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ours_s, theirs_s = np.median(row["dataflex_seconds"]), np.median(row["sklearn_seconds"])
        md.append(
            f"| {labels[name]} | {ours_s:.2f} | {theirs_s:.2f} "
            f"| {row['speedup']:.2f}x | {row['dataflex_gflops']:.0f} / {row['sklearn_gflops']:.0f} "
            f"| {row['inertia_rel_diff']:.2%} |"
        )
    result = {
        "n": n,
        "d": d,
        "k": k,
        "iters": iters,
        "embedding_seconds": embed_s,
        "comparisons": rows,
    }
    print(write_results(args.out, md, result, stem="kmeans_speed"))


if __name__ == "__main__":
    main()
