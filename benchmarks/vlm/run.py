"""VLM benchmark: which data policy copes with 30 % wrong answers on a LLaVA-style model?

    python -m benchmarks.vlm.run             # 3 seeds x 11 arms = 33 runs (21 of them took 17 min here)
    python -m benchmarks.vlm.run --quick     # 1 seed, a few steps: pipeline smoke test

A tiny LLaVA (CLIP vision tower + projector + Llama, built from config) is finetuned from scratch
with a stock ``transformers.Trainer`` on visual questions about real handwritten digits
(``dataflex.testbeds.digits``: what digit / even or odd / more than four / which comes next). ``--noise`` of
the training answers are wrong on purpose, with a known mask. Every arm takes the same number of
steps of the same batch size:

* ``uniform``: ``DataFlexCallback(Uniform())`` over the four question types;
* ``loss_hard`` / ``loss_easy``: ``DataFlexSelectCallback(LossFocus(f, mode))`` — re-select the
  highest / lowest current-loss fraction ``f`` of the pool every ``--update-every`` steps;
* ``loss_easy_mean``: the same as ``loss_easy`` but ranked by each example's loss averaged over all
  re-selections so far (``LossFocus(..., history="mean")``, in the spirit of AUM, arXiv 2001.10528);
* ``rho``: RHO-LOSS (Mindermann et al. 2022, arXiv 2206.07137) — the same selection by training loss
  minus irreducible loss, the latter from a model trained on the (equally noisy) validation split;
* ``reweight``: every example trained on, loss weights ∝ exp(−z/T) of the standardised batch losses
  (``ExampleWeightedLoss(direction="easy")`` through ``compute_loss_func``);
* ``clusters``: cluster-balanced sampling over faiss k-means clusters of projected image features
  (taken with the holdout model), ``DataFlexCallback(Uniform(), domains=clusters, stratified=True)``;
* ``aum`` / ``cartography`` / ``last_loss``: ``DataFlexSelectCallback(DropNoisy(detector, drop=1 - f))`` —
  leave out the share ``1 - f`` of every question type that the detector finds most suspect, from the
  training-dynamics record the training forwards fill (area under the margin, arXiv 2001.10528; mean
  confidence, arXiv 2009.10795; loss at the latest visit, arXiv 1804.06872), class-conditional (scores
  compared within question type and given answer) unless ``--no-class-conditional``; the uniform arm keeps
  the same record, and every detector's detection quality on it is reported, raw and class-conditional;
* ``clean_oracle`` (a reference, not a method: it reads the noise mask): trains only on the examples
  whose answer is right — what perfect noise filtering could give at this step budget.

The data (split and noise mask) is fixed by ``--data-seed``; seeds vary initialisation and order. The
learning rate (5e-4) was chosen on the uniform arm's validation accuracy (``benchmarks.vlm.validation_sweep``);
tables measured before that used ``--lr 0.002``.
Selection arms keep ``--fraction`` 0.7 = 1 - noise rate of every question type (the keep rate
Co-teaching uses with a known noise rate); a first run with 0.5 trained on fewer distinct images and
was worse for every selection arm.
Reported: clean test exact-answer accuracy (argmax of every answer token) and loss, and the share
of noisy examples among what each arm trained on (for ``reweight``: the share of loss weight), over
the whole run and after the first selection. Writes ``results.md``, ``results.json``, ``results.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import read_result, write_result
from benchmarks.report import median_range, write_results
from dataflex.recipes.vlm import METHODS, holdout_signals, train_vlm
from dataflex.testbeds.digits import digits_vqa

HERE = Path(__file__).resolve().parent

# Every method but "subset", which trains on the ids a cleaning run kept (benchmarks.vlm.two_stage gives them):
# in this list, the default command ran every other arm and then stopped on it.
ARMS = [method for method in METHODS if method != "subset"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=ARMS)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="chosen on the uniform arm's validation accuracy")
    p.add_argument("--fraction", type=float, default=0.7, help="share of the pool the selection arms keep")
    p.add_argument(
        "--label-by",
        choices=["question", "question_answer"],
        default="question",
        help="selection arms keep the same share of every group of this kind",
    )
    p.add_argument(
        "--class-conditional",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="detector arms compare noise scores within question type and given answer",
    )
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--warmup", type=int, default=200, help="steps before the first selection")
    p.add_argument("--temperature", type=float, default=1.0, help="reweight arm: T in exp(-z / T)")
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--holdout-steps", type=int, default=600)
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("outputs/vlm_work"),
        help="per-run results (resumable), in a subfolder named by the settings that shape a run",
    )
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.update_every, args.warmup, args.holdout_steps = [0], 30, 10, 10, 20
        args.runs = args.out = Path("outputs/vlm_quick")
    if "subset" in args.arms:
        raise SystemExit("the subset arm trains on the ids a cleaning run kept: run python -m benchmarks.vlm.two_stage")
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arms {bad}; valid: {ARMS}")
    data = digits_vqa(args.noise, seed=args.data_seed)
    extras: dict = {}
    if {"rho", "clusters"} & set(args.arms):
        extras = holdout_signals(
            data,
            args.runs,
            steps=args.holdout_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            clusters=args.clusters,
            seed=args.data_seed,
        )
    runs = []
    folder = args.runs / run_settings_key(args)  # a changed setting never reuses another setting's runs
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arm in args.arms:
            path = folder / f"{arm}_seed{seed}.json"
            if not path.is_file():
                result = train_vlm(
                    arm,
                    data,
                    out=folder / f"{arm}_seed{seed}",
                    seed=seed,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    fraction=args.fraction,
                    update_every=args.update_every,
                    warmup=args.warmup,
                    temperature=args.temperature,
                    label_by=args.label_by,
                    class_conditional=args.class_conditional,
                    signals=extras,
                )
                result["arm"] = arm
                write_result(path, result)
                print(
                    f"seed {seed} {arm}: acc {result['accuracy']:.3f} loss {result['loss']:.3f} "
                    f"noisy share {result['noisy_share']:.3f}",
                    flush=True,
                )
            runs.append(read_result(path))
    report(args, runs, data, extras)


def run_settings_key(args) -> str:
    """A folder name for the settings every run of one benchmark shares (not the seeds or arms)."""
    import hashlib

    shared = {k: v for k, v in sorted(vars(args).items()) if k not in ("seeds", "arms", "runs", "out", "quick")}
    return "settings-" + hashlib.sha256(json.dumps(shared, default=str).encode()).hexdigest()[:10]


def report(args, runs: list[dict], data, extras: dict) -> None:
    noisy_rate = float(np.mean(data["train"]["noisy"]))
    lines = [
        f"Tiny LLaVA from config, digits VQA: {len(data['train'])} training examples "
        f"({noisy_rate:.1%} with a wrong answer), clean test split of {len(data['test'])}; {args.steps} steps x "
        f"{args.batch_size}; seeds {args.seeds}; selection keeps {args.fraction:.0%} of every "
        f"{args.label_by.replace('_', ' and ')} group, re-selected every "
        f"{args.update_every} steps from step {args.warmup}; learning rate {args.lr:g}; detector arms "
        f"{'class-conditional (within question type and given answer)' if args.class_conditional else 'raw'}. "
        "Median [min, max] over seeds.",
        "",
        "| arm | clean test accuracy | clean test loss | validation accuracy (given answers) | noisy share trained on "
        f"| ... after step {args.warmup} | train seconds* |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        keys = (
            "accuracy",
            "loss",
            "validation_accuracy_given_answers",
            "noisy_share",
            "noisy_share_after_warmup",
            "seconds",
        )
        summary[arm] = {k: [r[k] for r in mine] for k in keys}
        s = summary[arm]
        name = f"{arm} (reference: reads the noise mask)" if arm == "clean_oracle" else arm
        lines.append(
            f"| {name} | {median_range(s['accuracy'])} | {median_range(s['loss'])} | "
            f"{median_range(s['validation_accuracy_given_answers'])} | "
            f"{median_range(s['noisy_share'])} | {median_range(s['noisy_share_after_warmup'])} | "
            f"{median_range(s['seconds'], '{:.0f}')} |"
        )
    lines += [
        "",
        "*Wall time of each run's training; runs may have shared the two cores with another run, so "
        "it is not a timing comparison.",
    ]
    detection = detection_table(args, runs)
    if detection:
        lines += ["", *detection]
    if "cluster_digit_purity" in extras:
        lines += [
            "",
            f"Image clusters ({args.clusters}, holdout model's projected features): digit purity "
            f"{extras['cluster_digit_purity']:.2f}.",
        ]
    data = {
        "summary": summary,
        "runs": runs,
        "noise_rate": noisy_rate,
        "cluster_digit_purity": extras.get("cluster_digit_purity"),
    }
    print(write_results(args.out, lines, data))
    plot(args, summary)


def detection_table(args, runs: list[dict]) -> list[str]:
    """AUROC and recall at the true noise rate of every detector on the uniform arm's training-dynamics
    record (plain training: no selection decided what the record saw), at the first selection and at the end."""
    mine = [r for r in runs if r["arm"] == "uniform" and (r.get("detection") or {}).get("at_end")]
    if not mine:
        return []
    lines = [
        "Noise detection on the uniform arm's training-dynamics record (`DataFlexCallback(dynamics=True)`), against "
        f"the known mask; median [min, max] over seeds {[r['seed'] for r in mine]}:",
        "",
        f"| detector | AUROC at step {args.warmup} | recall at the noise rate, step {args.warmup} | AUROC at the end "
        "| recall at the noise rate, end |",
        "|---|---|---|---|---|",
    ]
    for detector in mine[0]["detection"]["at_end"]:
        cells = [
            median_range([r["detection"][when][detector][key] for r in mine])
            for when in ("at_warmup", "at_end")
            for key in ("auroc", "recall_at_noise_rate")
        ]
        lines.append(f"| {detector} | " + " | ".join(cells) + " |")
    return lines


def plot(args, summary: dict) -> None:
    panels = (("accuracy", "clean test accuracy"), ("noisy_share_after_warmup", "share of noisy examples trained on"))
    bar_panels(args.out / "results.png", list(args.arms), summary, panels)


def bar_panels(path: Path, arms: list[str], summary: dict, panels: tuple[tuple[str, str], ...]) -> None:
    """One panel per ``(key, title)``: a bar at each arm's median of ``summary[arm][key]``, a dot per seed
    (the references — uniform, the clean oracle — in their own colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for x, arm in enumerate(arms):
            values = summary[arm][key]
            color = {"uniform": "tab:gray", "uniform_2x": "tab:gray", "clean_oracle": "tab:green"}.get(arm, "tab:blue")
            ax.bar(x, np.median(values), color=color, alpha=0.7)
            ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=30)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
