"""Near-duplicate stress test: random vs cluster-balanced vs SemDeDup sampling at equal steps.

    python -m benchmarks.clusters.dedup            # 3 seeds, ~15 min on 2 cores
    python -m benchmarks.clusters.dedup --quick    # 1 seed, a few steps: pipeline smoke test

Pool: up to ``--per-task`` training examples of each of the 12 instruction tasks, plus, for three
short tasks (``--dup-tasks``), ``--sources`` examples each copied ``--copies`` times with small
perturbations (letter case flips, doubled or dropped spaces) -- so about half of the pool is planted
near-duplicates, concentrated in three tasks, as in scraped data. The pool is fixed (seed 1234).

Two encoders, each normalised and clustered with spherical faiss k-means (``--k`` clusters): ``model``
= mean-pooled last hidden states of the textmix-pretrained base (the library path:
``hidden_state_embedder`` + ``score_pool``), and ``ngram`` = a user-supplied encoder (hashed character
3-5-grams, randomly projected to 256 dims). SemDeDup's recall/precision against the planted duplicates
is reported for a sweep of eps; training uses, per encoder, the largest eps whose precision is >= 0.95
-- chosen *with* the planted labels, an oracle a real user does not have, so read the training result
as "SemDeDup at a good eps".

Arms, each ``--steps`` steps of full finetuning from the base on a stock Trainer:
``random`` (uniform over the pool, ``FixedSubset`` of everything), ``cluster_balanced``
(``DataFlexCallback(Uniform(), domains=model-embedding clusters, stratified=True)``),
``semdedup_model`` / ``semdedup_ngram`` (``FixedSubset`` of the ids kept with that encoder).
Reported: mean validation/test loss over the 12 tasks, over the 3 duplicated tasks and
over the 9 others, and the share of training samples that were planted copies. Writes ``dedup.md``,
``dedup.json`` beside this file.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from benchmarks.common import (
    add_common_args,
    claim_runs,
    load_jsonl_file,
    make_base,
    pretrained_base,
    read_result,
    trainer_args,
    write_result,
)
from benchmarks.report import median_range, write_results
from dataflex import DataFlexCallback, DataFlexSelectCallback
from dataflex.clustering import cluster_names, kmeans
from dataflex.dedup import normalise, semdedup
from dataflex.embeddings import hidden_state_embedder
from dataflex.hf import last_complete_checkpoint
from dataflex.offline import score_pool
from dataflex.policies import Uniform
from dataflex.selectors import FixedSubset
from dataflex.testbeds.tiny import collate_causal, default_data_dir, instruct_dataset, load_jsonl_dir, task_losses

HERE = Path(__file__).resolve().parent

ARMS = ["random", "cluster_balanced", "semdedup_model", "semdedup_ngram"]
EPS_SWEEP = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]


def perturb(text: str, rng: np.random.Generator) -> str:
    """Two small edits: flip the case of a letter, and double or drop one space."""
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    if letters:
        i = int(rng.choice(letters))
        chars[i] = chars[i].swapcase()
    spaces = [m.start() for m in re.finditer(" ", "".join(chars))]
    if spaces:
        j = int(rng.choice(spaces))
        chars[j] = "  " if rng.random() < 0.5 else ""
    return "".join(chars)


def build_pool(data: Path, per_task: int, dup_tasks: list[str], sources: int, copies: int):
    rng = np.random.default_rng(1234)
    records = load_jsonl_dir(data / "instruct" / "train", max_per_file=per_task)
    group = [-1] * len(records)  # duplicate group id (-1: not part of a planted group)
    planted = [False] * len(records)
    for task in dup_tasks:
        members = [i for i, r in enumerate(records) if r["task"] == task][:sources]
        for src in members:
            group[src] = src
            for _ in range(copies):
                r = records[src]
                records.append({**r, "instruction": perturb(r["instruction"], rng)})
                group.append(src)
                planted.append(True)
    return records, np.array(group), np.array(planted)


def dedup_quality(keep: np.ndarray, group: np.ndarray, planted: np.ndarray) -> dict[str, float]:
    """A removal is correct while its planted group still keeps at least one member; all else is a mistake."""
    removed = ~keep
    correct = 0
    for g in np.unique(group[group >= 0]):
        members = group == g
        correct += min(int(removed[members].sum()), int(members.sum()) - 1)
    return {
        "removed": int(removed.sum()),
        "recall": correct / max(1, int(planted.sum())),  # of the removable copies, how many went
        "precision": correct / max(1, int(removed.sum())),  # of the removals, how many were redundant copies
        "groups_fully_removed": int(sum(not keep[group == g].any() for g in np.unique(group[group >= 0]))),
    }


def ngram_embeddings(records: list[dict], dim: int = 256, seed: int = 0) -> np.ndarray:
    """A user-supplied encoder: hashed character 3-5-grams of the instruction, randomly projected to ``dim``."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.random_projection import SparseRandomProjection

    counts = HashingVectorizer(
        analyzer="char_wb", ngram_range=(3, 5), n_features=2**18, alternate_sign=False, norm="l2"
    ).transform([r["instruction"] for r in records])
    projection = SparseRandomProjection(dim, dense_output=True, random_state=seed)
    return np.asarray(projection.fit_transform(counts), dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=150, max_len=192, runs="outputs/dedup_work", default_data=default_data_dir())
    p.add_argument("--per-task", type=int, default=150)
    p.add_argument("--dup-tasks", nargs="+", default=["jeopardy", "siqa", "commonsense_qa"])
    p.add_argument("--sources", type=int, default=30)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--eval-per-task", type=int, default=100)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.pretrain_steps, args.per_task, args.eval_per_task = [0], 10, 60, 20, 10
        args.sources, args.copies, args.k = 5, 4, 6
        args.work, args.runs = Path("outputs/quick_base"), Path("outputs/dedup_quick")
        args.out = args.runs
    claim_runs(args)
    records, group, planted = build_pool(args.data, args.per_task, args.dup_tasks, args.sources, args.copies)
    pool = instruct_dataset(records, args.max_len)
    tasks = sorted(set(pool["task"]))
    evals = {
        split: {
            t: instruct_dataset(
                load_jsonl_file(args.data / "instruct" / split / f"{t}.jsonl", args.eval_per_task), args.max_len
            )
            for t in tasks
        }
        for split in ("validation", "test")
    }
    base = pretrained_base(
        args.data, args.work, max_len=args.max_len, steps=args.pretrain_steps, batch_size=args.batch_size, lr=2e-3
    )
    model = make_base()
    model.load_state_dict(base)
    encoders = {
        "model": normalise(
            score_pool(
                hidden_state_embedder(model),
                pool,
                collate_causal,
                batch_size=64,
                cache=args.runs / "embeddings.npz",
                desc="embedding pool",
            )
        ),
        "ngram": normalise(ngram_embeddings(records)),
    }
    clusters = {name: kmeans(emb, args.k, seed=0, spherical=True) for name, emb in encoders.items()}
    sweep, eps, kept = {}, {}, {}
    for name, emb in encoders.items():
        sweep[name] = {e: dedup_quality(semdedup(emb, clusters[name].labels, e), group, planted) for e in EPS_SWEEP}
        good = [e for e in EPS_SWEEP if sweep[name][e]["precision"] >= 0.95 and sweep[name][e]["removed"] > 0]
        eps[name] = max(good) if good else min(EPS_SWEEP)
        kept[name] = np.flatnonzero(semdedup(emb, clusters[name].labels, eps[name]))
        print(f"{name} encoder, eps={eps[name]}: {sweep[name][eps[name]]}")
    runs = []
    for seed in args.seeds:
        for arm in ARMS:
            out = args.runs / f"{arm}_seed{seed}"
            result_file = out / "result.json"
            if not result_file.is_file():
                if arm == "cluster_balanced":  # clusters of the model's own embeddings
                    names = cluster_names(clusters["model"].labels)
                    cb = DataFlexCallback(
                        Uniform(), domains=names, domain_column=None, update_every=10**9, stratified=True
                    )
                else:
                    ids = kept[arm.split("_")[1]] if arm.startswith("semdedup") else np.arange(len(pool))
                    cb = DataFlexSelectCallback(FixedSubset(ids), update_every=10**9)
                torch.manual_seed(seed)
                model = make_base()
                model.load_state_dict(base)
                trainer = Trainer(
                    model=model,
                    args=trainer_args(out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed),
                    train_dataset=pool,
                    data_collator=collate_causal,
                    callbacks=[cb],
                )
                cb.attach(trainer)
                trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))
                total = args.steps * args.batch_size
                n = cb.sampler.num_samples
                seen = np.concatenate([cb.sampler.epoch_order(e) for e in range(-(-total // n))])[:total]
                result = {
                    "arm": arm,
                    "seed": seed,
                    "planted_share": float(planted[seen].mean()),
                    "validation": task_losses(model, evals["validation"]),
                    "test": task_losses(model, evals["test"]),
                }
                out.mkdir(parents=True, exist_ok=True)
                write_result(result_file, result)
                print(f"seed {seed} {arm}: planted share {result['planted_share']:.2f}", flush=True)
            runs.append(read_result(result_file))
    report(args, runs, sweep, eps, len(pool), int(planted.sum()), {k: len(v) for k, v in kept.items()})


def report(args, runs, sweep, eps, n_pool, n_planted, n_kept) -> None:
    dup = set(args.dup_tasks)
    lines = [
        f"Pool {n_pool} examples, {n_planted} planted near-copies ({', '.join(args.dup_tasks)}); "
        f"k={args.k} spherical clusters; {args.steps} steps x {args.batch_size}; seeds {args.seeds}.",
        "",
        "SemDeDup against the planted duplicates (recall = planted copies removed / planted copies; precision = "
        "removals that belonged to a planted group):",
        "",
        "| encoder | eps | removed | recall | precision | groups removed entirely |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {e} | {q['removed']} | {q['recall']:.3f} | {q['precision']:.3f} | {q['groups_fully_removed']} |"
        for name, table in sweep.items()
        for e, q in table.items()
    ]
    chosen = "; ".join(f"{name}: eps={eps[name]}, {n_kept[name]} kept" for name in eps)
    lines += [
        "",
        f"Training used ({chosen}). Mean loss on response bytes, median [min, max] over seeds:",
        "",
        "| arm | val, all 12 tasks | test, all 12 tasks | test, 3 duplicated tasks | test, 9 other tasks | "
        "share of samples that were planted copies |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        val = [float(np.mean(list(r["validation"].values()))) for r in mine]
        test = [float(np.mean(list(r["test"].values()))) for r in mine]
        dup_t = [float(np.mean([v for t, v in r["test"].items() if t in dup])) for r in mine]
        other = [float(np.mean([v for t, v in r["test"].items() if t not in dup])) for r in mine]
        share = [r["planted_share"] for r in mine]
        summary[arm] = {"val": val, "test": test, "test_dup": dup_t, "test_other": other, "planted_share": share}
        lines.append(
            f"| {arm} | {median_range(val)} | {median_range(test)} | {median_range(dup_t)} | "
            f"{median_range(other)} | {median_range(share, '{:.2f}')} |"
        )
    for split in ("validation", "test"):
        tasks = sorted(runs[0][split])
        lines += [
            "",
            f"Per-task {split} loss (median over seeds; * = a task with planted duplicates):",
            "",
            "| arm | " + " | ".join(t + ("*" if t in dup else "") for t in tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for arm in ARMS:
            mine = [r for r in runs if r["arm"] == arm]
            cells = [f"{np.median([r[split][t] for r in mine]):.3f}" for t in tasks]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    data = {
        "sweep": {n: {str(e): q for e, q in t.items()} for n, t in sweep.items()},
        "eps": eps,
        "summary": summary,
        "runs": runs,
    }
    print(write_results(args.out, lines, data, stem="dedup"))


if __name__ == "__main__":
    main()
