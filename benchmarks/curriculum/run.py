"""Curriculum benchmark: grade-school math, easy-to-hard vs random vs hard-to-easy, on a stock Trainer.

    python -m benchmarks.curriculum.run            # 3 seeds x 4 orders, ~20 min on 2 cores
    python -m benchmarks.curriculum.run --quick    # 1 seed, a few steps: pipeline smoke test

A byte-level GPT-2 pretrained on textmix (shared with the other instruction benchmarks) is finetuned
on gsm8k's training split with ``DataFlexCurriculumCallback``. Every arm draws uniformly among the
examples its pacing has opened, so the arms differ only in *which* examples are open when:

* ``random``: everything open from the start (pacing c0 = 1);
* ``length``: competence pacing (Platanios et al. 2019, c0 = 0.1, full at half of training), difficulty
  = solution length in bytes;
* ``ref_loss``: the same pacing, difficulty = the pretrained base model's loss on the example;
* ``anti``: the reverse of ``length`` (longest solutions first).

Reported: validation-loss curves (every ``--eval-every`` steps, response bytes), final validation and
test loss (median [min, max] over seeds) and the step at which each arm first reaches the random
arm's final validation loss. Writes ``results.md``, ``results.json`` and ``curves.png`` beside this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

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
from dataflex import DataFlexCurriculumCallback
from dataflex.curriculum import Curriculum
from dataflex.hf import last_complete_checkpoint
from dataflex.offline import score_pool, token_mean_losses
from dataflex.testbeds.tiny import collate_causal, default_data_dir, instruct_dataset, task_losses

HERE = Path(__file__).resolve().parent

ARMS = ["random", "length", "ref_loss", "anti"]


class Curve(TrainerCallback):
    """Validation loss every ``every`` steps (and at the end), kept in ``path`` as it grows.

    A run resumed from a checkpoint starts its curve from ``path``: held in memory only, the points before the
    checkpoint were lost after a kill, and the resumed run reported a curve (and steps to the target loss) that
    began at the checkpoint. A point taken after the checkpoint the run resumes from is taken again only if it is
    missing: an exactly resumed run measures the same value there."""

    def __init__(self, val, every: int, path: Path) -> None:
        self.val, self.every, self.path = val, every, path
        self.points: list = read_result(path) if path.is_file() else []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            if not any(p["step"] == state.global_step for p in self.points):
                self.points.append({"step": state.global_step, **task_losses(model, {"val": self.val})})
                write_result(self.path, self.points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=240, max_len=256, runs="outputs/curriculum_work", default_data=default_data_dir())
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--arms", nargs="+", default=ARMS)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--c0", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    cap = None
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.pretrain_steps, cap = [0], 12, 6, 60, 200
        args.work, args.runs = Path("outputs/quick_base"), Path("outputs/curriculum_quick")
        args.out = args.runs
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arms {bad}; valid: {ARMS}")
    claim_runs(args, picks=("arms",))
    root = args.data / "instruct"
    train = instruct_dataset(load_jsonl_file(root / "train" / f"{args.task}.jsonl", cap), args.max_len)
    val = instruct_dataset(load_jsonl_file(root / "validation" / f"{args.task}.jsonl", cap), args.max_len)
    test = instruct_dataset(load_jsonl_file(root / "test" / f"{args.task}.jsonl", cap), args.max_len)
    base = pretrained_base(
        args.data, args.work, max_len=args.max_len, steps=args.pretrain_steps, batch_size=args.batch_size, lr=2e-3
    )
    length = np.array([len(r) - pl for r, pl in zip(train["input_ids"], train["prompt_len"])], dtype=np.float64)
    difficulty = {"length": length, "anti": length, "random": length}
    if "ref_loss" in args.arms:
        model = make_base()
        model.load_state_dict(base)
        difficulty["ref_loss"] = score_pool(
            token_mean_losses(model),
            train,
            collate_causal,
            batch_size=64,
            cache=args.runs / "ref_loss.npz",
            desc="reference losses",
        )
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            out = args.runs / f"{arm}_seed{seed}"
            result_file = out / "result.json"
            if not result_file.is_file():
                curriculum = Curriculum(
                    difficulty[arm], pacing="competence", c0=1.0 if arm == "random" else args.c0, reverse=arm == "anti"
                )
                cb = DataFlexCurriculumCallback(curriculum, horizon_steps=max(1, args.steps // 2))
                curve = Curve(val, args.eval_every, out / "curve.json")
                torch.manual_seed(seed)
                model = make_base()
                model.load_state_dict(base)
                trainer = Trainer(
                    model=model,
                    args=trainer_args(out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed),
                    train_dataset=train,
                    data_collator=collate_causal,
                    callbacks=[cb, curve],
                )
                cb.attach(trainer)
                trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))
                out.mkdir(parents=True, exist_ok=True)
                result = {
                    "arm": arm,
                    "seed": seed,
                    "curve": sorted(curve.points, key=lambda q: q["step"]),
                    **{f"final_{k}": v for k, v in task_losses(model, {"val": val, "test": test}).items()},
                }
                write_result(result_file, result)
                print(f"seed {seed} {arm}: val {result['final_val']:.4f} test {result['final_test']:.4f}", flush=True)
            runs.append(read_result(result_file))
    report(args, runs)


def first_step_at_or_below(curve: list[dict], target: float) -> int | None:
    return next((q["step"] for q in curve if q["val"] <= target), None)


def report(args, runs: list[dict]) -> None:
    lines = [
        f"Task {args.task}; {args.steps} steps x {args.batch_size} examples; seeds "
        f"{args.seeds}; competence pacing c0={args.c0}, whole pool open at step {args.steps // 2}. Median [min, max] "
        "over seeds of the mean per-example loss on response bytes.",
        "",
        "| arm | final validation loss | final test loss | first step at random's final val loss (per seed) |",
        "|---|---|---|---|",
    ]
    random_final = {r["seed"]: r["final_val"] for r in runs if r["arm"] == "random"}
    summary = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        reach = [
            first_step_at_or_below(r["curve"], random_final[r["seed"]]) if r["seed"] in random_final else None
            for r in mine
        ]
        summary[arm] = {"val": [r["final_val"] for r in mine], "test": [r["final_test"] for r in mine], "reach": reach}
        lines.append(
            f"| {arm} | {median_range(summary[arm]['val'])} | {median_range(summary[arm]['test'])} | "
            f"{', '.join('never' if s is None else str(s) for s in reach)} |"
        )
    print(write_results(args.out, lines, {"summary": summary, "runs": runs}))
    plot(args, runs)


def plot(args, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = dict(zip(ARMS, ["tab:gray", "tab:blue", "tab:green", "tab:red"]))
    for arm in args.arms:
        for i, r in enumerate(r for r in runs if r["arm"] == arm):
            steps = [q["step"] for q in r["curve"]]
            ax.plot(steps, [q["val"] for q in r["curve"]], color=colors[arm], alpha=0.8, label=arm if i == 0 else None)
    ax.axvline(args.steps // 2, color="black", lw=0.8, ls=":", label="whole pool open")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{args.task} validation loss (response bytes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
