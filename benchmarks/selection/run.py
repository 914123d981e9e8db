"""Targeted instruction tuning: which 5 % of the 12-task instruction pool helps a target task most?

    python -m benchmarks.selection.run                 # 3 seeds, targets gsm8k and arc_easy (~1 h on 2 cores)
    python -m benchmarks.selection.run --quick         # 1 seed, short runs: a smoke test of the pipeline
    python -m benchmarks.selection.run --data ../shared/data

Protocol (LESS, arXiv 2402.04333, scaled down to a byte-level model on 2 CPU cores):

1. *Base model*: a byte-level GPT-2 pretrained on the textmix corpus (uniform mixture); cached.
2. *Warm-up* (once, ``--selection-seed``): LoRA on a random 5 % of the pool for ``--warm-steps``; it
   supplies the Adam state for LESS and the "current model" losses for loss focus and RHO-LOSS.
   Scoring the 24,675-example pool takes ~25 min of 2 CPU cores per warm-up, so the scored selections
   are made once and the seeds vary the finetuning (LoRA init, example order) and the random subset;
   the spread over seeds is therefore training noise, not selection noise.
3. *Selection* (per target) of 5 % of the pool, seeing only the target's ``validation/`` file:
   - ``random``: uniform 5 % (the baseline);
   - ``less``: cosine between each pool example's Adam-preconditioned LoRA gradient and the mean plain
     gradient of the target's validation examples (projected to ``--dim``, batched per-example
     gradients); top 5 %;
   - ``tracin``: the same with raw gradients (TracIn at one checkpoint, arXiv 2002.08484);
   - ``rho``: RHO-LOSS (arXiv 2206.07137) made targeted: irreducible losses from the warm model further
     trained on the target's validation examples; top 5 % by warm loss minus irreducible loss;
   - ``loss_hard``: the 5 % with the highest warm-model loss (untargeted loss focus).
4. *Finetune*: a fresh LoRA on the base for ``--steps`` steps on the chosen examples (same budget for
   every method), then the loss on response tokens of every task's ``test/`` split (mean over examples)
   and, for ARC, letter accuracy (argmax over the offered letters).
5. *References* at the same step budget: ``full_pool`` (all 24,675 examples) and ``target_only`` (the
   target task's own training examples from the pool).

Every stage is cached under ``--work`` and resumes after a crash. Writes ``results.json``,
``results.md`` and ``target_loss.png`` beside this file (or to ``--out``). Nothing is tuned on test/.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    add_common_args,
    claim_runs,
    load_jsonl_file,
    make_base,
    pretrained_base,
    read_result,
    write_result,
)
from benchmarks.report import median_range, write_results
from dataflex.domains import encode_domains
from dataflex.grads import lora_linears
from dataflex.influence import GradientFeaturizer
from dataflex.offline import score_pool, target_direction, token_mean_losses, write_subset
from dataflex.policies import Natural
from dataflex.proxies.irreducible import pool_losses
from dataflex.proxies.loop import train_mixture
from dataflex.selection import budget, select_by_loss, select_random, select_reducible, select_top
from dataflex.state import DatasetFingerprint
from dataflex.testbeds.tiny import collate_causal, default_data_dir, instruct_dataset, load_jsonl_dir

HERE = Path(__file__).resolve().parent

SELECTED = ["random", "less", "tracin", "rho", "loss_hard"]
REFERENCES = ["full_pool", "target_only"]
TARGET_FREE = {"random", "loss_hard", "full_pool"}  # the same run serves every target
LETTERS = "ABCDE"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=160, max_len=256, runs="outputs/selection_work", default_data=default_data_dir())
    p.set_defaults(lr=2e-3)
    p.add_argument("--targets", nargs="+", default=["gsm8k", "arc_easy"])
    p.add_argument("--methods", nargs="+", default=SELECTED + REFERENCES)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--warm-steps", type=int, default=80)
    p.add_argument("--il-steps", type=int, default=80, help="steps of the RHO-LOSS irreducible-loss model")
    p.add_argument("--dim", type=int, default=1024, help="influence projection dimension")
    p.add_argument(
        "--selection-seed",
        type=int,
        default=0,
        help="seed of the warm-up run that every scored selection comes from (fixed across --seeds)",
    )
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    if args.quick:  # pool capped at 60 per task
        args.seeds, args.steps, args.warm_steps, args.il_steps, args.pretrain_steps = [0], 20, 10, 10, 60
        args.work = args.runs = args.out = Path("outputs/selection_quick")
    bad = [m for m in args.methods if m not in SELECTED + REFERENCES]
    if bad:
        raise SystemExit(f"unknown methods {bad}; valid: {SELECTED + REFERENCES}")
    return args


# ----------------------------------------------------------------------------------------------- models
def lora_model(base: dict[str, torch.Tensor], args: argparse.Namespace, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = make_base()
    model.load_state_dict(base)
    torch.manual_seed(seed)  # peft draws lora_A from the global RNG
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0)
    return get_peft_model(model, config)


def finetune(model, pool, ids: np.ndarray, args, seed: int, work: Path, steps: int, desc: str):
    """LoRA-train on ``pool[ids]`` (examples drawn in natural proportions) with the resumable loop."""
    subset = pool.select(ids.tolist())
    dom, names = encode_domains(subset["task"])
    return train_mixture(
        model,
        subset,
        dom,
        names,
        Natural(),
        collate=collate_causal,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        ckpt_dir=work / "ckpt",
        ckpt_every=50,
        desc=desc,
    )


# ----------------------------------------------------------------------------------------------- eval
def letter_logits(model: torch.nn.Module):
    """``score_batch``: logits of 'A'..'E' at the first response position (the answer letter)."""
    letters = torch.tensor([ord(c) for c in LETTERS])

    @torch.no_grad()
    def score(batch):
        model.eval()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        first = (batch["labels"] != -100).int().argmax(1)  # first counted label = first response byte
        return logits[torch.arange(len(first)), first - 1][:, letters]

    return score


def evaluate(model, test_sets: dict[str, Any], test_records: dict[str, list[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": {}}
    for task, ds in test_sets.items():
        losses = score_pool(token_mean_losses(model), ds, collate_causal, batch_size=32, progress=False)
        out["loss"][task] = float(np.nanmean(losses))
    for task in ("arc_easy", "arc_challenge"):
        if task not in test_sets:
            continue
        logits = score_pool(letter_logits(model), test_sets[task], collate_causal, batch_size=32, progress=False)
        correct = []
        for rec, row in zip(test_records[task], logits):
            offered = [LETTERS.index(c) for c in re.findall(r"^([A-E])\. ", rec["instruction"], flags=re.M)]
            offered = offered or list(range(4))
            correct.append(offered[int(np.argmax(row[offered]))] == LETTERS.index(rec["response"].strip()[:1]))
        out[f"{task}_accuracy"] = float(np.mean(correct))
    return out


# ----------------------------------------------------------------------------------------------- selection
class Scorer:
    """Everything the selections share: the warm-up model, its optimizer, its pool scores (one seed)."""

    def __init__(self, args, base, pool, seed: int) -> None:
        self.args, self.base, self.pool, self.seed = args, base, pool, seed
        self.work = args.runs / f"seed{seed}"
        self.warm_ids = select_random(len(pool), args.fraction, seed=10_000 + seed)
        self._warm: tuple[torch.nn.Module, Any] | None = None

    def warm(self):
        if self._warm is None:
            model = lora_model(self.base, self.args, self.seed)
            res = finetune(
                model,
                self.pool,
                self.warm_ids,
                self.args,
                self.seed,
                self.work / "warm",
                self.args.warm_steps,
                desc=f"warm-up s{self.seed}",
            )
            self._warm = (model, res.optimizer)
        return self._warm

    def features(self, mode: str) -> np.ndarray:
        """Pool features of the warm model; LESS and TracIn come from one shared backward per batch."""
        model, optimizer = self.warm()
        featurizer = GradientFeaturizer(
            model, lora_linears(model), dim=self.args.dim, seed=self.seed, mode="less", optimizer=optimizer
        )
        both = score_pool(
            lambda b: torch.cat(list(featurizer.feature_sets(b, ("less", "tracin")).values()), 1),
            self.pool,
            collate_causal,
            batch_size=32,
            cache=self.work / "pool_features.npz",
            desc=f"gradient features s{self.seed}",
        )
        dim = self.args.dim
        return both[:, :dim] if mode == "less" else both[:, dim:]

    def target_features(self, target_ds) -> np.ndarray:
        model, _ = self.warm()
        featurizer = GradientFeaturizer(model, lora_linears(model), dim=self.args.dim, seed=self.seed)
        return score_pool(featurizer.features, target_ds, collate_causal, batch_size=32, progress=False)

    def warm_losses(self) -> np.ndarray:
        model, _ = self.warm()
        return score_pool(
            token_mean_losses(model),
            self.pool,
            collate_causal,
            batch_size=64,
            cache=self.work / "pool_warm_loss.npz",
            desc=f"warm losses s{self.seed}",
        )

    def irreducible_losses(self, target: str, target_ds) -> np.ndarray:
        """Warm model, further trained on the target's validation examples: the RHO-LOSS holdout model."""
        model = lora_model(self.base, self.args, self.seed)
        warm_model, _ = self.warm()
        model.load_state_dict(warm_model.state_dict())
        all_ids = np.arange(len(target_ds))
        finetune(
            model,
            target_ds,
            all_ids,
            self.args,
            self.seed,
            self.work / f"il_{target}",
            self.args.il_steps,
            desc=f"holdout {target} s{self.seed}",
        )
        return pool_losses(
            model,
            self.pool,
            collate_causal,
            cache=self.work / f"pool_il_{target}.npz",
            desc=f"irreducible {target} s{self.seed}",
        )

    def select(self, method: str, target: str, target_ds, seed: int) -> np.ndarray:
        """The subset ``method`` picks; only ``random`` depends on the finetuning ``seed``."""
        n, f = len(self.pool), self.args.fraction
        if method == "random":
            return select_random(n, f, seed=seed)
        if method == "loss_hard":
            return select_by_loss(self.warm_losses(), f, "hard")
        if method in ("less", "tracin"):
            direction = target_direction(self.target_features(target_ds))
            return select_top(self.features(method) @ direction, f)
        if method == "rho":
            return select_reducible(self.warm_losses(), self.irreducible_losses(target, target_ds), f)
        if method == "full_pool":
            return np.arange(n)
        if method == "target_only":
            return np.flatnonzero(np.asarray(self.pool["task"]) == target)
        raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    claim_runs(args, picks=("methods", "targets"))  # (subsets and results are named by method and target)
    cap = 60 if args.quick else None
    pool_records = load_jsonl_dir(args.data / "instruct" / "train", max_per_file=cap)
    pool = instruct_dataset(pool_records, args.max_len)
    pool_dom, pool_names = encode_domains(pool["task"])
    fingerprint = DatasetFingerprint.from_labels(pool_dom, pool_names)
    test_records = {t: load_jsonl_file(args.data / "instruct" / "test" / f"{t}.jsonl", cap) for t in pool_names}
    test_sets = {t: instruct_dataset(r, args.max_len) for t, r in test_records.items()}
    targets_val = {
        t: instruct_dataset(load_jsonl_file(args.data / "instruct" / "validation" / f"{t}.jsonl", cap), args.max_len)
        for t in args.targets
    }
    print(f"pool: {len(pool)} examples over {len(pool_names)} tasks; budget {budget(len(pool), args.fraction)}")
    base = pretrained_base(
        args.data, args.work, max_len=args.max_len, steps=args.pretrain_steps, batch_size=args.batch_size, lr=args.lr
    )
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    scorer = Scorer(args, base, pool, args.selection_seed)
    for seed in args.seeds:
        run_dir = args.runs / f"seed{seed}"
        for target in args.targets:
            for method in args.methods:
                key = method if method in TARGET_FREE else f"{method}_{target}"
                result_file = run_dir / f"{key}.json"
                if not result_file.is_file():
                    t0 = time.perf_counter()
                    ids = scorer.select(method, target, targets_val[target], seed)
                    write_subset(
                        run_dir / f"{key}_subset.json",
                        ids,
                        pool=fingerprint,
                        method=method,
                        fraction=len(ids) / len(pool),
                        extra={"target": target, "seed": seed},
                    )
                    select_s = time.perf_counter() - t0
                    model = lora_model(base, args, seed)
                    finetune(model, pool, ids, args, seed, run_dir / key, args.steps, desc=f"{key} s{seed}")
                    tasks = np.asarray(pool["task"])[ids]
                    result = {
                        "key": key,
                        "method": method,
                        "seed": seed,
                        "n_selected": int(len(ids)),
                        "composition": {t: int((tasks == t).sum()) for t in pool_names},
                        "select_seconds": select_s,
                        **evaluate(model, test_sets, test_records),
                    }
                    write_result(result_file, result)
                    print(f"seed {seed} {key}: {result['loss']}", flush=True)
                runs.append({**read_result(result_file), "target": target})
    report(args, runs, pool_names, time.perf_counter() - t_start)


# ----------------------------------------------------------------------------------------------- report
def report(args, runs: list[dict], tasks: list[str], seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Seeds {args.seeds}; {args.steps} finetuning steps x {args.batch_size} "
        f"examples x <= {args.max_len} bytes for every method; budget {args.fraction:.0%} of the pool. "
        f"Median [min, max] over seeds; loss = mean over test examples of the token-mean loss on response bytes.",
        "",
    ]
    summary: dict[str, Any] = {}
    for target in args.targets:
        rows = [r for r in runs if r["target"] == target]
        lines += [
            f"### target: {target}",
            "",
            f"| method | {target} test loss | arc_easy letter acc | mean loss, other 11 tasks | "
            f"share of subset from {target} |",
            "|---|---|---|---|---|",
        ]
        for method in args.methods:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            tl = [r["loss"][target] for r in mine]
            acc = [r.get("arc_easy_accuracy", float("nan")) for r in mine]
            other = [float(np.mean([v for t, v in r["loss"].items() if t != target])) for r in mine]
            share = [r["composition"][target] / max(1, r["n_selected"]) for r in mine]
            summary.setdefault(target, {})[method] = {
                "target_loss": tl,
                "arc_easy_accuracy": acc,
                "other_loss": other,
                "target_share": share,
            }
            lines.append(
                f"| {method} | {median_range(tl)} | {median_range(acc)} | {median_range(other)} | "
                f"{median_range(share, '{:.2f}')} |"
            )
        lines.append("")
    lines.append(f"Total wall time of this invocation: {seconds / 60:.1f} min (cached stages are not re-run).")
    data = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs}
    print(write_results(args.out, lines, data))
    plot(args, summary)


def plot(args, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 3.8), squeeze=False)
    for ax, (target, methods) in zip(axes[0], summary.items()):
        names = list(methods)
        for x, name in enumerate(names):
            values = methods[name]["target_loss"]
            ax.scatter([x] * len(values), values, color="tab:blue" if name not in REFERENCES else "tab:gray", s=18)
            ax.hlines(statistics.median(values), x - 0.3, x + 0.3, color="black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"{target}: test loss on response bytes (lower is better)")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(args.out / "target_loss.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
