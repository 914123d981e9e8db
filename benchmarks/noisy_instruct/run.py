"""Noisy instruction benchmark: can a detector find swapped responses, and does dropping them help?

    python -m benchmarks.noisy_instruct.run            # every detector, 3 seeds (see results.md for the time)
    python -m benchmarks.noisy_instruct.run --quick    # 1 seed, tiny budgets: a smoke test of the pipeline

Data: the first ``--per-task`` training examples of gsm8k, competition_math, jeopardy and human_eval from the
bundled instruction pool, ``--noise`` of them given another example's response of the same task (a
plausible wrong answer; :func:`dataflex.testbeds.noisy_instruct.noisy_instructions`). The byte GPT-2
pretrained on textmix (shared with the other instruction benchmarks) is finetuned with
``python -m dataflex.recipes.instruct``'s :func:`~dataflex.recipes.instruct.train_instruct` for each detector:

* ``none``: plain training; its training-dynamics record scores the record detectors (AUROC, recall);
* ``aum`` / ``cartography`` / ``loss`` / ``forgetting``: ``DropNoisy`` re-decided every ``--update-every``
  steps after step ``--warmup``, leaving out the ``drop`` share of every task;
* ``out_of_fold``: 3 proxies (each ``--fold-steps`` steps on two thirds) score the third they never saw;
* ``prompt_support``: :func:`dataflex.prompt_support.prompt_support_scores` of the text (no model); its
  analyzer is chosen by AUROC on the clean validation split with the same share of responses swapped there;
* ``clean_oracle``: trains on the right examples only (reads the mask: the upper reference).

``drop`` is chosen per detector from ``--drops`` by the median clean *validation* loss over seeds; the test
split is scored once, for the chosen configuration of each arm (the models are kept until then). Reported:
mean clean test loss over the tasks and per task, the share of the uniform-to-oracle gap closed, the
wrong share trained on, prompt reliance (how much worse a test response is predicted under another test
instruction of its task than under its own: :func:`~dataflex.testbeds.noisy_instruct.prompt_reliance`, mean
over tasks) and detection AUROC / recall at the noise rate against the mask.
Every run is cached under ``--runs`` and resumes after a crash.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import add_common_args, claim_runs, pretrained_base, read_result, write_result
from benchmarks.report import median_range, write_results
from dataflex.detectors import detection_quality, plant_threshold_examples
from dataflex.prompt_support import ANALYZERS, prompt_support_scores
from dataflex.recipes.instruct import DETECTORS, make_model, train_instruct
from dataflex.state import open_checked
from dataflex.testbeds.noisy_instruct import NOISY_TASKS, noisy_instructions, prompt_reliance
from dataflex.testbeds.tiny import default_data_dir, task_losses

HERE = Path(__file__).resolve().parent
DROPPING = [d for d in DETECTORS if d not in ("none", "clean_oracle")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=400, max_len=256, runs="outputs/noisy_instruct_work", default_data=default_data_dir())
    # forgetting is left out by default: a response of many tokens is never right at every token under teacher
    # forcing, so there are no forgetting events and its ranking is the loss ranking (ties broken by loss).
    p.add_argument("--detectors", nargs="+", default=[d for d in DETECTORS if d != "forgetting"])
    p.add_argument("--tasks", nargs="+", default=list(NOISY_TASKS))
    p.add_argument("--per-task", type=int, default=500)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--drops", type=float, nargs="+", default=[0.15, 0.3], help="drop shares tried on validation")
    p.add_argument("--warmup", type=int, default=100, help="steps before the first DropNoisy decision")
    p.add_argument("--update-every", type=int, default=50, help="steps between DropNoisy decisions")
    p.add_argument("--fold-steps", type=int, default=200)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.warmup, args.update_every = [0], 30, 10, 10
        args.fold_steps, args.pretrain_steps = 10, 60
        args.per_task, args.drops = 60, [0.3]
        args.work = Path("outputs/quick_base")
        args.runs = args.out = Path("outputs/noisy_instruct_quick")
    bad = [d for d in args.detectors if d not in DETECTORS]
    if bad:
        raise SystemExit(f"unknown detectors {bad}; valid: {list(DETECTORS)}")
    return args


def run_key(detector: str, drop: float | None, seed: int) -> str:
    return f"{detector}_seed{seed}" if drop is None else f"{detector}_drop{drop:g}_seed{seed}"


def train_run(args, data, base, detector: str, drop: float | None, seed: int) -> dict[str, Any]:
    """One run (cached): trains, keeps the final weights and its validation losses; no test yet."""
    folder = args.runs / run_key(detector, drop, seed)
    result_file = folder / "result.json"
    if result_file.is_file():
        return read_result(result_file)
    result = train_instruct(
        detector,
        data,
        out=folder,
        base=base,
        seed=seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        drop=drop if drop is not None else 0.3,
        warmup=args.warmup,
        update_every=args.update_every,
        fold_steps=args.fold_steps,
        save_steps=max(1, args.steps // 4),
        evaluate_test=False,
        folds_dir=args.runs / f"folds_seed{seed}",  # shared by the drop shares tried
        analyzer=args.analyzer,
    )
    result["drop"] = drop
    write_result(result_file, result)
    print(f"{run_key(detector, drop, seed)}: mean validation loss {result['mean_validation_loss']:.4f}", flush=True)
    return result


def choose_analyzer(data: dict[str, Any], noise: float) -> tuple[str, dict[str, float]]:
    """prompt_support's analyzer with the best AUROC on the validation split given ``noise`` swapped responses
    (planted here, within each task): the choice never looks at the training mask."""
    text = data["validation_text"]
    responses, planted = plant_threshold_examples(text["responses"], noise, seed=0, groups=text["tasks"])
    wrong = np.zeros(len(responses), dtype=bool)
    wrong[planted] = True
    auroc = {
        a: detection_quality(prompt_support_scores(text["prompts"], responses, text["tasks"], analyzer=a), wrong)[
            "auroc"
        ]
        for a in ANALYZERS
    }
    return max(auroc, key=auroc.get), auroc


def task_auroc(data: dict[str, Any], analyzer: str, seeds: list[int]) -> dict[str, list[float]]:
    """prompt_support's detection AUROC within each task of the training set, per seed."""
    text, wrong = data["train_text"], np.asarray(data["noisy"], dtype=bool)
    tasks = np.asarray(text["tasks"])
    out: dict[str, list[float]] = {t: [] for t in dict.fromkeys(text["tasks"])}
    for seed in seeds:
        scores = prompt_support_scores(text["prompts"], text["responses"], tasks, analyzer=analyzer, seed=seed)
        for t in out:
            out[t].append(detection_quality(scores[tasks == t], wrong[tasks == t])["auroc"])
    return out


def test_measures(args, data, run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A chosen run's clean test loss and prompt reliance per task (cached): the only place the test split is
    read."""
    folder = args.runs / run_key(run["detector"], run["drop"], run["seed"])
    measures = {
        "test_loss": (folder / "test.json", lambda model: task_losses(model, data["test"])),
        "prompt_reliance": (
            folder / "test_prompt_reliance.json",
            lambda m: prompt_reliance(m, data["records"]["test"]),
        ),
    }
    model = None  # loaded once, only when a measure is not cached yet
    for cached, measure in measures.values():
        if not cached.is_file():
            if model is None:
                model = make_model(torch.load(open_checked(folder / "final_model.pt")), seed=0)
            write_result(cached, measure(model))
    return {name: read_result(cached) for name, (cached, _) in measures.items()}


def main() -> None:
    args = parse_args()
    claim_runs(args, picks=("detectors", "drops"))  # (runs are named by detector and drop share)
    data = noisy_instructions(args.data, tasks=tuple(args.tasks), per_task=args.per_task, noise=args.noise, seed=0)
    n, wrong = len(data["train"]), float(np.mean(data["noisy"]))
    print(f"{n} training examples over {len(args.tasks)} tasks, {wrong:.1%} with a swapped response")
    base = pretrained_base(
        args.data, args.work, max_len=args.max_len, steps=args.pretrain_steps, batch_size=args.batch_size, lr=2e-3
    )
    start = time.perf_counter()
    args.analyzer, args.analyzer_auroc = choose_analyzer(data, args.noise)
    print(f"prompt_support analyzer {args.analyzer} (validation AUROC per analyzer: {args.analyzer_auroc})")
    args.task_auroc = task_auroc(data, args.analyzer, args.seeds)
    runs: dict[str, list[dict[str, Any]]] = {}
    for detector in args.detectors:
        drops = args.drops if detector in DROPPING else [None]
        for drop in drops:
            runs[run_key(detector, drop, -1)] = [train_run(args, data, base, detector, drop, s) for s in args.seeds]
    chosen: dict[str, list[dict[str, Any]]] = {}
    for detector in args.detectors:  # the drop share with the best median validation loss over seeds
        drops = args.drops if detector in DROPPING else [None]
        best = min(
            drops, key=lambda d: statistics.median(r["mean_validation_loss"] for r in runs[run_key(detector, d, -1)])
        )
        chosen[detector] = [{**r, **test_measures(args, data, r)} for r in runs[run_key(detector, best, -1)]]
    report(args, chosen, runs, n, wrong, time.perf_counter() - start)


def validation_losses(runs: list[dict[str, Any]]) -> list[float]:
    return [r["mean_validation_loss"] for r in runs]


def median_validation(runs: list[dict[str, Any]]) -> float:
    return statistics.median(validation_losses(runs))


def mean_test(run: dict[str, Any]) -> float:
    return float(np.mean(list(run["test_loss"].values())))


def report(args, chosen, runs, n: int, wrong: float, seconds: float) -> None:
    by_seed = {d: {r["seed"]: r for r in rs} for d, rs in chosen.items()}
    uniform, oracle = by_seed.get("none", {}), by_seed.get("clean_oracle", {})

    def gap_closed(run: dict[str, Any]) -> float:
        u, o = uniform.get(run["seed"]), oracle.get(run["seed"])
        if u is None or o is None or mean_test(u) <= mean_test(o):
            return float("nan")
        return (mean_test(u) - mean_test(run)) / (mean_test(u) - mean_test(o))

    tasks = list(args.tasks)
    lines = [
        f"{n} training examples ({', '.join(tasks)}; first {args.per_task} of each), {wrong:.1%} with another "
        f"example's response of the same task; clean validation/test. Byte GPT-2 pretrained on textmix, full "
        f"finetuning {args.steps} steps x {args.batch_size}, lr {args.lr}; seeds {args.seeds}. Dropping detectors "
        f"leave out a share of every task (chosen from {args.drops} by median validation loss), re-decided every "
        f"{args.update_every} steps after step {args.warmup}. "
        "Median [min, max] over seeds.",
        "",
        "| arm | drop (chosen on validation) | mean clean test loss | share of uniform-to-oracle gap closed | "
        + " | ".join(f"{t} test loss" for t in tasks)
        + " | wrong share trained on | prompt reliance (test, mean over tasks) |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    summary: dict[str, Any] = {}
    for detector, rs in chosen.items():
        row = {
            "drop": rs[0]["drop"],
            "mean_test_loss": [mean_test(r) for r in rs],
            "gap_closed": [gap_closed(r) for r in rs],
            "test_loss": {t: [r["test_loss"][t] for r in rs] for t in tasks},
            "noisy_share": [r["noisy_share"] for r in rs],
            "prompt_reliance": [float(np.mean(list(r["prompt_reliance"].values()))) for r in rs],
            "prompt_reliance_by_task": {t: [r["prompt_reliance"][t] for r in rs] for t in tasks},
        }
        summary[detector] = row
        name = detector if detector != "none" else "none (uniform)"
        gaps = [g for g in row["gap_closed"] if np.isfinite(g)]
        lines.append(
            f"| {name} | {'-' if row['drop'] is None else row['drop']} | {median_range(row['mean_test_loss'])} | "
            f"{median_range(gaps, '{:.2f}') if gaps and detector not in ('none', 'clean_oracle') else '-'} | "
            + " | ".join(median_range(row["test_loss"][t]) for t in tasks)
            + f" | {median_range(row['noisy_share'])} | {median_range(row['prompt_reliance'], '{:.4f}')} |"
        )
    lines += [
        "",
        "Prompt reliance per task: test loss of each response under the previous test instruction of its task "
        "minus under its own (higher: the model reads its instruction more; median [min, max] over seeds):",
        "",
        "| arm | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for detector, row in summary.items():
        cells = [median_range(row["prompt_reliance_by_task"][t], "{:.4f}") for t in tasks]
        lines.append(f"| {detector} | " + " | ".join(cells) + " |")
    lines += ["", "Validation loss of every drop share tried (median [min, max] over seeds):", ""]
    lines += ["| arm | " + " | ".join(f"drop {d}" for d in args.drops) + " |", "|---|" + "---|" * len(args.drops)]
    for detector in args.detectors:
        if detector in DROPPING:
            cells = [
                median_range([r["mean_validation_loss"] for r in runs[run_key(detector, d, -1)]]) for d in args.drops
            ]
            lines.append(f"| {detector} | " + " | ".join(cells) + " |")
    detection = detection_table(chosen)
    if detection:
        lines += ["", "Noise detection against the known mask (median [min, max] over seeds):", ""]
        lines += ["| detector | record of | AUROC | recall at the noise rate |", "|---|---|---|---|"]
        for name, source, auroc, recall in detection:
            lines.append(f"| {name} | {source} | {median_range(auroc)} | {median_range(recall)} |")
    if "prompt_support" in args.detectors:
        lines += [
            "",
            f"prompt_support's analyzer, chosen on the validation split with {args.noise:.0%} of its responses "
            "swapped within each task (AUROC there): "
            + ", ".join(f"{a} {v:.3f}" for a, v in args.analyzer_auroc.items())
            + f" -> {args.analyzer}. Its training-set AUROC per task: "
            + ", ".join(f"{t} {median_range(v)}" for t, v in args.task_auroc.items())
            + " (median [min, max] over seeds, which draw the reference pairs).",
        ]
    lines.append("")
    lines.append(
        f"Wall time of this invocation: {seconds / 60:.1f} min on {torch.get_num_threads()} threads "
        "(cached runs are not re-run)."
    )
    print(write_results(args.out, lines, {"summary": summary, "runs": {k: v for k, v in runs.items()}}))
    plot(args, summary, detection)


def detection_table(chosen) -> list[tuple[str, str, list[float], list[float]]]:
    """AUROC and recall per detector: the record detectors on the uniform run's record (free of selection
    bias) at the end, and out-of-fold on its own proxies' scores."""
    rows = []
    sources = [
        ("none", "plain training (end of run)"),
        ("out_of_fold", "its 3 proxies"),
        ("prompt_support", "the text (no model)"),
    ]
    for detector, source in sources:
        rs = [r for r in chosen.get(detector, []) if r["detection"].get("at_end")]
        if not rs:
            continue
        for name in rs[0]["detection"]["at_end"]:
            quality = [r["detection"]["at_end"][name] for r in rs]
            rows.append((name, source, [q["auroc"] for q in quality], [q["recall_at_noise_rate"] for q in quality]))
    return rows


def plot(args, summary: dict[str, Any], detection) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(summary)
    for x, name in enumerate(names):
        values = summary[name]["mean_test_loss"]
        left.scatter(
            [x] * len(values), values, s=18, color="tab:gray" if name in ("none", "clean_oracle") else "tab:blue"
        )
        left.hlines(statistics.median(values), x - 0.3, x + 0.3, color="black")
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_title("mean clean test loss (lower is better)")
    for x, (_, _, auroc, _) in enumerate(detection):
        right.scatter([x] * len(auroc), auroc, s=18, color="tab:blue")
        right.hlines(statistics.median(auroc), x - 0.3, x + 0.3, color="black")
    right.axhline(0.5, color="gray", ls=":", lw=0.8)
    right.set_xticks(range(len(detection)), [d[0] for d in detection], rotation=30, ha="right")
    right.set_title("detection AUROC against the noise mask")
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
