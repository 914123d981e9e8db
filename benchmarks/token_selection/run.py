"""Token-level selection (Rho-1) for a target task: train on the tokens a target-trained reference finds easy
but the current model does not, against training on every token.

    python -m benchmarks.token_selection.run            # 3 seeds (see results.md for the time)
    python -m benchmarks.token_selection.run --quick    # 1 seed, tiny budgets: a smoke test of the pipeline

Protocol (Rho-1, Lin et al., arXiv 2404.07965, scaled to the byte GPT-2 of the other instruction benchmarks):

1. *Pool*: a seeded ``--pool-fraction`` of the 12-task instruction pool (the gsm8k target of
   ``benchmarks/selection/`` is about 30 % of it), drawn by every arm in the same natural proportions.
2. *Reference*: the pretrained base finetuned ``--ref-steps`` on the first half of gsm8k's validation split
   (the paper's high-quality reference data); its loss of every counted token of the pool is computed once
   (:func:`~dataflex.token_weighting.reference_token_losses`).
3. *Arms*, each ``--steps`` x ``--batch-size`` from the base, through a stock Trainer with
   ``TokenWeightedLoss``: ``all_tokens`` (every weight 1: the stock loss), ``rho1`` (the ``keep`` share of each
   micro-batch's tokens with the highest excess loss over the reference; ``keep`` chosen from ``--keeps`` by
   the gsm8k loss on the *second* half of validation), and ``random_tokens`` (the same share of tokens drawn
   at random: what selecting that many tokens does without the reference).
4. *Cost*: forward-pass equivalents (a training example costs 3: forward and a backward of about twice
   it), for the main run and for the reference (its finetuning plus one forward over the pool), and the
   measured seconds of each, as ratios to the ``all_tokens`` run.

The test split (gsm8k and the other 11 tasks) is read once per final configuration. Every run is cached
under ``--runs``. Writes ``results.md``, ``results.json`` and ``results.png`` beside this file (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

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
from benchmarks.report import median_range, strip_plot, write_results
from dataflex.hf.callbacks import DataFlexCallback
from dataflex.policies import Natural
from dataflex.selection import select_random
from dataflex.state import open_checked, write_checked
from dataflex.testbeds.tiny import collate_causal, default_data_dir, instruct_dataset, load_jsonl_dir, task_losses
from dataflex.token_weighting import TokenWeightedLoss, reference_token_losses, rho1

HERE = Path(__file__).resolve().parent
ARMS = ["all_tokens", "rho1", "random_tokens"]
FORWARDS_PER_TRAINED_EXAMPLE = 3  # a forward and a backward of about twice its cost


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=300, max_len=256, runs="outputs/token_selection_work", default_data=default_data_dir())
    p.add_argument("--target", default="gsm8k")
    p.add_argument("--pool-fraction", type=float, default=0.2)
    p.add_argument("--ref-steps", type=int, default=80)
    p.add_argument("--keeps", type=float, nargs="+", default=[0.3, 0.6], help="rho1 token shares tried")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.ref_steps, args.pretrain_steps, args.keeps = [0], 10, 5, 60, [0.6]
        args.pool_fraction = 0.1
        args.work = Path("outputs/quick_base")
        args.runs = args.out = Path("outputs/token_selection_quick")
    return args


def random_tokens(keep: float, seed: int):
    """A rule giving weight 1 to a random ``keep`` share of each micro-batch's counted tokens (seeded per call)."""
    calls = [0]

    def rule(token_loss: torch.Tensor, counted: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        calls[0] += 1
        generator = torch.Generator().manual_seed(seed * 1_000_003 + calls[0])
        flat = counted.nonzero()
        k = int(np.ceil(keep * flat.shape[0]))
        chosen = flat[torch.randperm(flat.shape[0], generator=generator)[:k]]
        weights = torch.zeros_like(token_loss)
        weights[chosen[:, 0], chosen[:, 1]] = 1.0
        return weights

    return rule


class Setup:
    """Data, base weights and the reference's token losses, shared by every run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cap = 60 if args.quick else None
        root = args.data / "instruct"
        records = load_jsonl_dir(root / "train", max_per_file=cap)
        chosen = select_random(len(records), args.pool_fraction, seed=1234)
        self.pool = instruct_dataset([records[i] for i in chosen], args.max_len)
        val = load_jsonl_file(root / "validation" / f"{args.target}.jsonl", cap)
        half = len(val) // 2
        self.reference_data = instruct_dataset(val[:half], args.max_len)
        self.choose_on = {args.target: instruct_dataset(val[half:], args.max_len)}
        self.tasks = sorted(p.stem for p in (root / "train").glob("*.jsonl"))
        if args.target not in self.tasks:
            raise SystemExit(f"--target {args.target!r} is not a task of {root / 'train'}: {self.tasks}")
        self.root = root
        self.base = pretrained_base(
            args.data, args.work, max_len=args.max_len, steps=args.pretrain_steps, batch_size=args.batch_size, lr=2e-3
        )
        self.reference_cost: dict[str, float] = {}
        self.reference = self._reference()

    def _reference(self):
        """Finetune the reference on the first half of the target's validation split; score the pool."""
        args, folder = self.args, self.args.runs / "reference"
        cost_file = folder / "cost.json"
        model = make_base()
        model.load_state_dict(self.base)
        if not (folder / "model.pt").is_file():
            start = time.perf_counter()
            torch.manual_seed(0)
            trainer = Trainer(
                model=model,
                args=trainer_args(folder, steps=args.ref_steps, batch_size=args.batch_size, lr=args.lr, seed=0),
                train_dataset=self.reference_data,
                data_collator=collate_causal,
            )
            trainer.train()
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            losses = reference_token_losses(model, self.pool, collate_causal, batch_size=64)
            cost = {"train_seconds": train_seconds, "forward_seconds": time.perf_counter() - start}
            np.savez(folder / "token_losses.npz", *losses.per_example)
            torch.save(model.state_dict(), folder / "model.pt")
            write_result(cost_file, cost)
        self.reference_cost = read_result(cost_file)
        from dataflex.token_weighting import ReferenceTokenLosses

        with np.load(folder / "token_losses.npz") as saved:
            return ReferenceTokenLosses([saved[f"arr_{i}"] for i in range(len(saved.files))])

    def test_sets(self) -> dict[str, Any]:
        cap = 60 if self.args.quick else None
        return {t: instruct_dataset(load_jsonl_file(self.root / "test" / f"{t}.jsonl", cap), 256) for t in self.tasks}


def run_folder(args: argparse.Namespace, arm: str, keep: float | None, seed: int) -> Path:
    return args.runs / (f"{arm}_seed{seed}" if keep is None else f"{arm}_keep{keep:g}_seed{seed}")


def train_arm(setup: Setup, arm: str, keep: float | None, seed: int) -> dict[str, Any]:
    args = setup.args
    folder = run_folder(args, arm, keep, seed)
    result_file = folder / "result.json"
    if result_file.is_file():
        return read_result(result_file)
    dfx = DataFlexCallback(Natural(), domain_column="task", update_every=10**6)
    if arm == "all_tokens":
        rule = lambda token_loss, counted, ids: torch.ones_like(token_loss)  # noqa: E731 - the stock loss
    elif arm == "rho1":
        rule = rho1(setup.reference, keep=keep)
    else:
        rule = random_tokens(keep, seed)
    weighted = TokenWeightedLoss(rule, dfx)
    torch.manual_seed(seed)
    model = make_base()
    model.load_state_dict(setup.base)
    training = trainer_args(folder, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed)
    training.logging_steps = max(1, args.steps // 10)  # where the effective token share is logged
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=setup.pool,
        data_collator=collate_causal,
        callbacks=[dfx],
        compute_loss_func=dfx.wrap_loss(weighted),
    )
    dfx.attach(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shares = [
        h["dataflex/effective_token_share"] for h in trainer.state.log_history if "dataflex/effective_token_share" in h
    ]
    write_checked(folder / "final_model.pt", lambda f: torch.save(model.state_dict(), f))
    result = {
        "arm": arm,
        "keep": keep,
        "seed": seed,
        "choice_loss": task_losses(model, setup.choose_on)[args.target],
        "train_seconds": seconds,
        "effective_token_share": float(np.mean(shares)) if shares else None,
    }
    write_result(result_file, result)
    print(f"{folder.name}: {args.target} validation (second half) {result['choice_loss']:.4f}", flush=True)
    return result


def test_losses(setup: Setup, run: dict[str, Any], test_sets: dict[str, Any]) -> dict[str, float]:
    folder = setup.args.runs / (
        f"{run['arm']}_seed{run['seed']}"
        if run["keep"] is None
        else f"{run['arm']}_keep{run['keep']:g}_seed{run['seed']}"
    )
    cached = folder / "test.json"
    if not cached.is_file():
        model = make_base()
        model.load_state_dict(torch.load(open_checked(folder / "final_model.pt")))
        write_result(cached, task_losses(model, test_sets))
    return read_result(cached)


def main() -> None:
    args = parse_args()
    claim_runs(args, picks=("keeps",))  # (rho1 runs are named by their token share)
    start = time.perf_counter()
    setup = Setup(args)
    print(f"pool: {len(setup.pool)} examples over {len(setup.tasks)} tasks; reference on {len(setup.reference_data)}")
    runs = {"all_tokens": [train_arm(setup, "all_tokens", None, s) for s in args.seeds]}
    tried = {k: [train_arm(setup, "rho1", k, s) for s in args.seeds] for k in args.keeps}
    keep = min(args.keeps, key=lambda k: statistics.median(r["choice_loss"] for r in tried[k]))
    runs["rho1"] = tried[keep]
    runs["random_tokens"] = [train_arm(setup, "random_tokens", keep, s) for s in args.seeds]
    test_sets = setup.test_sets()
    for arm_runs in runs.values():
        for r in arm_runs:
            r["test_loss"] = test_losses(setup, r, test_sets)
    report(args, setup, runs, tried, keep, time.perf_counter() - start)


def report(args, setup: Setup, runs, tried, keep: float, seconds: float) -> None:
    target = args.target
    main_forwards = args.steps * args.batch_size * FORWARDS_PER_TRAINED_EXAMPLE
    ref_forwards = args.ref_steps * args.batch_size * FORWARDS_PER_TRAINED_EXAMPLE + len(setup.pool)
    base_seconds = statistics.median(r["train_seconds"] for r in runs["all_tokens"])
    ref_seconds = setup.reference_cost["train_seconds"] + setup.reference_cost["forward_seconds"]
    lines = [
        f"Pool: {len(setup.pool)} examples ({args.pool_fraction:.0%} of the 12-task pool, natural proportions); "
        f"byte GPT-2 pretrained on textmix, full finetuning {args.steps} steps x {args.batch_size}, lr {args.lr}; "
        f"seeds {args.seeds}. Reference: {args.ref_steps} steps on the first {len(setup.reference_data)} {target} "
        f"validation examples. rho1's keep chosen from {args.keeps} by the {target} loss on the other validation "
        f"half: {keep}. Median [min, max] over seeds; loss = mean over test examples of the token-mean loss on "
        "response bytes.",
        "",
        f"| arm | {target} test loss | mean test loss, other {len(setup.tasks) - 1} tasks | token share trained on "
        "| compute, forward equivalents (x all_tokens) | wall time (x all_tokens) |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for arm, rs in runs.items():
        target_loss = [r["test_loss"][target] for r in rs]
        other = [float(np.mean([v for t, v in r["test_loss"].items() if t != target])) for r in rs]
        share = [r["effective_token_share"] for r in rs]
        extra_forwards = ref_forwards if arm == "rho1" else 0
        extra_seconds = ref_seconds if arm == "rho1" else 0.0
        wall = [(r["train_seconds"] + extra_seconds) / base_seconds for r in rs]
        compute = (main_forwards + extra_forwards) / main_forwards
        summary[arm] = {"target_loss": target_loss, "other_loss": other, "token_share": share, "wall": wall}
        name = arm if arm == "all_tokens" else f"{arm} (keep {keep})"
        lines.append(
            f"| {name} | {median_range(target_loss)} | {median_range(other)} | {median_range(share, '{:.2f}')} | "
            f"{compute:.2f} | {median_range(wall, '{:.2f}')} |"
        )
    lines += ["", f"rho1 by keep ({target} loss on the validation half used for the choice):", ""]
    lines += ["| keep | validation loss |", "|---|---|"]
    for k, rs in tried.items():
        lines.append(f"| {k} | {median_range([r['choice_loss'] for r in rs])} |")
    lines += [
        "",
        f"The reference costs {ref_forwards} forward equivalents ({args.ref_steps} training steps and one forward "
        f"over the {len(setup.pool)} pool examples; {ref_seconds:.0f} s), once, shared by every seed and keep.",
        "",
        f"Wall time of this invocation: {seconds / 60:.1f} min (cached stages are not re-run).",
    ]
    print(write_results(args.out, lines, {"summary": summary, "keep": keep, "runs": runs}))
    plot(args, summary)


def plot(args, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "target_loss", f"{args.target} test loss"),
        (axes[1], "other_loss", "mean test loss, other tasks"),
    ):
        strip_plot(ax, {arm: row[key] for arm, row in summary.items()}, title, highlight=lambda arm: arm == "rho1")
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
