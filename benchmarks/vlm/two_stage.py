"""Two-stage cleaning on the VLM testbed: train, drop what the record flags, train afresh on the rest.

    python -m benchmarks.vlm.two_stage                      # 3 seeds, test accuracy of every arm (~10 min here)
    python -m benchmarks.vlm.two_stage --validation-only    # the same runs; prints validation accuracy only

The AUM paper's protocol (arXiv 2001.10528) with dataflex's detectors: stage 1 is the VLM benchmark's
``uniform`` arm (``recipes.vlm.train_vlm``, ``--steps`` steps) whose training-dynamics record the
``cleaning`` rule reads at the end — ``DropNoisy(--detector, drop=--drop, per_label=True,
classes=question:answer)`` — and stage 2 trains a fresh model of the same seed for ``--steps`` steps on the
ids it kept (``method="subset"``). That costs twice the budget, so the baseline that matters is uniform
training for ``2 x --steps`` steps (``uniform_2x``); ``uniform`` (stage 1 itself) is the benchmark's
one-budget arm. The noise, data, model, batch size and learning rate are the VLM benchmark's. Reported:
clean test accuracy, validation accuracy against the given (partly wrong) answers, the noisy share of
what each arm trained on and of the kept ids, and stage 1's detection AUROC. Runs are cached under
``--runs`` by their settings. Writes ``results.md``, ``results.json`` and ``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import read_result, write_result
from benchmarks.report import median_range, write_results
from benchmarks.vlm.run import bar_panels
from dataflex.detectors import DETECTORS, DropNoisy
from dataflex.recipes.vlm import answer_classes, train_vlm
from dataflex.testbeds.digits import digits_vqa

HERE = Path(__file__).resolve().parent / "two_stage"
ARMS = ("uniform", "uniform_2x", "two_stage")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="steps of each stage (uniform_2x trains twice as many)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--detector", choices=DETECTORS, default="last_loss")
    p.add_argument("--drop", type=float, default=0.3, help="share of every question type left out after stage 1")
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=Path("outputs/vlm_two_stage"))
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--validation-only", action="store_true", help="print validation accuracy only (for choosing)")
    return p.parse_args()


def cached_run(args, name: str, seed: int, **kwargs: Any) -> dict[str, Any]:
    """One ``train_vlm`` run, cached by everything it depends on."""
    settings = {"name": name, "seed": seed, "lr": args.lr, "noise": args.noise, "data_seed": args.data_seed}
    settings.update({k: v for k, v in kwargs.items() if k not in ("data", "cleaning", "signals")})
    if "cleaning" in kwargs:
        settings.update(detector=args.detector, drop=args.drop)
    if "signals" in kwargs:
        settings["subset"] = hashlib.sha256(np.asarray(kwargs["signals"]["subset"]).tobytes()).hexdigest()[:12]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = args.runs / f"{name}_seed{seed}-{key}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        result = train_vlm(out=args.runs / f"work-{path.stem}", seed=seed, lr=args.lr, **kwargs)
        write_result(path, result)
    return read_result(path)


def main() -> None:
    args = parse_args()
    data = digits_vqa(args.noise, seed=args.data_seed)
    train = data["train"]
    noisy = np.asarray(train["noisy"], dtype=bool)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        rule = DropNoisy(args.detector, drop=args.drop, per_label=True, classes=answer_classes(train))
        first = cached_run(args, "uniform", seed, method="uniform", data=data, steps=args.steps, cleaning=rule)
        kept = np.asarray(first["kept_ids"])
        second = cached_run(
            args, "two_stage", seed, method="subset", data=data, steps=args.steps, signals={"subset": kept}
        )
        double = cached_run(args, "uniform_2x", seed, method="uniform", data=data, steps=2 * args.steps)
        second["kept_noisy_share"] = float(noisy[kept].mean())
        second["detection_auroc"] = first["detection"]["at_end"][f"{args.detector} (class-conditional)"]["auroc"]
        for arm, result in zip(ARMS, (first, double, second)):
            runs[arm].append(result)
        if args.validation_only:
            accuracy = {a: round(runs[a][-1]["validation_accuracy_given_answers"], 4) for a in ARMS}
            print(json.dumps({"seed": seed, "validation_accuracy_given_answers": accuracy}))
    if not args.validation_only:
        report(args, runs, noisy)


def report(args, runs: dict[str, list[dict[str, Any]]], noisy: np.ndarray) -> None:
    steps = {"uniform": args.steps, "uniform_2x": 2 * args.steps, "two_stage": 2 * args.steps}
    lines = [
        f"Tiny LLaVA from config, digits VQA: {noisy.size} training examples ({noisy.mean():.1%} with a wrong "
        f"answer); batch 32, lr {args.lr}; seeds {args.seeds}. two_stage: a uniform run of {args.steps} steps, "
        f"then DropNoisy('{args.detector}', drop={args.drop}, per question type, class-conditional) on its "
        f"record, then a fresh model {args.steps} steps on the kept ids. Median [min, max] over seeds.",
        "",
        "| arm | steps in all | clean test accuracy | validation accuracy (given answers) | noisy share trained on |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        rs = runs[arm]
        lines.append(
            f"| {arm} | {steps[arm]} | {median_range([r['accuracy'] for r in rs])} | "
            f"{median_range([r['validation_accuracy_given_answers'] for r in rs])} | "
            f"{median_range([r['noisy_share'] for r in rs])} |"
        )
    second = runs["two_stage"]
    lines += [
        "",
        f"Stage 1's class-conditional {args.detector} AUROC: {median_range([r['detection_auroc'] for r in second])}; "
        f"noisy share of the kept ids: {median_range([r['kept_noisy_share'] for r in second])} "
        f"(of the pool: {noisy.mean():.3f}).",
    ]
    summary = {
        arm: {k: [r[k] for r in rs] for k in ("accuracy", "validation_accuracy_given_answers", "noisy_share")}
        for arm, rs in runs.items()
    }
    print(write_results(args.out, lines, {"summary": summary, "seeds": args.seeds, "steps": steps}))
    panels = (("accuracy", "clean test accuracy"), ("noisy_share", "share of noisy examples trained on"))
    bar_panels(args.out / "results.png", list(ARMS), summary, panels)


if __name__ == "__main__":
    main()
