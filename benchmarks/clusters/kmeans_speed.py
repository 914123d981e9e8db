"""k-means speed: dataflex's faiss path vs scikit-learn's Lloyd KMeans on the same embeddings.

    python benchmarks/clusters/kmeans_speed.py               # 100k x 256, k = 256, 20 iterations (~5 min)
    python benchmarks/clusters/kmeans_speed.py --n 20000     # smaller

Embeddings are real: mean-pooled last hidden states (width 256) of a tiny byte-level GPT-2 over
``--n`` windows of textmix training text, extracted with the library's own path
(``dataflex.embeddings.hidden_state_embedder`` + ``dataflex.offline.score_pool``); that extraction is
timed and reported separately. Both k-means implementations start from the *same* initial centroids
(k random points, seeded) and run exactly ``--iters`` Lloyd iterations (scikit-learn with ``tol=0``),
so their inertias must agree to within 1 %. Reported: wall time of each, the ratio, and the GFLOP/s of
the distance computations (2 n k d per iteration). Writes ``kmeans_speed.md`` / ``kmeans_speed.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def windows(n: int, width: int) -> list[dict]:
    from dataflex.tiny import default_data_dir, load_jsonl_dir

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
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()

    from sklearn.cluster import KMeans

    from dataflex.clustering import kmeans
    from dataflex.embeddings import hidden_state_embedder
    from dataflex.offline import score_pool
    from dataflex.tiny import collate_causal, tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_embd=256, n_head=4, n_positions=args.window, seed=args.seed)
    texts = windows(args.n, args.window)
    t0 = time.perf_counter()
    x = score_pool(hidden_state_embedder(model), texts, collate_causal, batch_size=256, desc="embedding")
    embed_s = time.perf_counter() - t0
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    init = x[np.random.default_rng(args.seed).choice(n, size=args.k, replace=False)].copy()

    t0 = time.perf_counter()
    ours = kmeans(x, args.k, niter=args.iters, init_centroids=init)
    faiss_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sk = KMeans(n_clusters=args.k, init=init, n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd").fit(x)
    sklearn_s = time.perf_counter() - t0
    flop = 2.0 * n * args.k * d * args.iters
    rel = abs(ours.inertia - sk.inertia_) / sk.inertia_
    row = {
        "n": n, "d": d, "k": args.k, "iters": args.iters, "sklearn_iters_run": int(sk.n_iter_),
        "embedding_seconds": embed_s, "embedding_examples_per_s": n / embed_s,
        "faiss_seconds": faiss_s, "sklearn_seconds": sklearn_s, "speedup": sklearn_s / faiss_s,
        "faiss_gflops": flop / faiss_s / 1e9, "sklearn_gflops": flop / sklearn_s / 1e9,
        "faiss_inertia": ours.inertia, "sklearn_inertia": float(sk.inertia_), "inertia_rel_diff": rel,
    }  # fmt: skip
    machine = f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    command = "python benchmarks/clusters/kmeans_speed.py " + " ".join(sys.argv[1:])
    md = [
        f"Command: `{command}` on {machine}. One run; same initial centroids for both; distance GFLOP/s = "
        "2 n k d iters / seconds.",
        "",
        "| n x d | k | iters | dataflex (faiss) s | scikit-learn s | speed-up | GFLOP/s faiss / sklearn | "
        "inertia rel. diff | embedding extraction |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {n} x {d} | {args.k} | {args.iters} (sklearn ran {sk.n_iter_}) | {faiss_s:.1f} | {sklearn_s:.1f} | "
        f"{row['speedup']:.2f}x | {row['faiss_gflops']:.0f} / {row['sklearn_gflops']:.0f} | {rel:.2%} | "
        f"{embed_s:.0f} s ({row['embedding_examples_per_s']:.0f} windows/s) |",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kmeans_speed.md").write_text("\n".join(md) + "\n")
    (args.out / "kmeans_speed.json").write_text(json.dumps({"command": command, "machine": machine, **row}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
