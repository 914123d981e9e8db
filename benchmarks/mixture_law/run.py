"""Mixture law benchmark: swarm -> law -> proposed mixture (and its online correction) against the baselines.

    python -m benchmarks.mixture_law.run            # 3 seeds, the main-run budget of benchmarks/mixture
    python -m benchmarks.mixture_law.run --quick    # 1 seed, tiny budgets: a smoke test of the pipeline

Per seed, ``python -m dataflex.recipes.mixture_law``'s stages (:func:`dataflex.recipes.mixture_law.run_stages`)
with the main run of ``benchmarks/mixture`` (byte GPT-2, 2 layers x 96, 700 steps x 16 x 128 bytes, lr 2e-3,
the same seeds): a swarm of ``--swarm-size`` proxy runs of ``--swarm-steps`` steps each (the same model; its
cost in proxy steps is reported against one main run), the law kind with the lowest held-out-run error,
the proposal for the mean validation loss within an L1 distance ``--max-l1`` of uniform, then the main runs:
``law`` (corrected online, ``--radius``), ``law_static`` (the proposal as is), ``law_schedule`` (a two-stage
schedule from laws fitted at the half and the end of the swarm's runs, ending at the proposal), uniform,
natural, ODM and offline DoReMi; every main run is also evaluated half-way. The law's choice and the
proposal see only validation losses; the test split is scored once per main run. Writes ``results.md``,
``results.json`` and ``results.png`` beside this file (or ``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir

from benchmarks.report import median_range, strip_plot, write_results
from dataflex.recipes.mixture_law import run_stages
from dataflex.testbeds.tiny import default_data_dir, tiny_gpt2

HERE = Path(__file__).resolve().parent
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir() / "textmix")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=700, help="main-run steps (benchmarks/mixture's budget)")
    p.add_argument("--swarm-size", type=int, default=14)
    p.add_argument("--swarm-steps", type=int, default=50)
    p.add_argument(
        "--concentration",
        type=float,
        default=4.0,
        help="Dirichlet concentration of the swarm's mixtures around uniform (swarm.concentration)",
    )
    p.add_argument("--law-kinds", nargs="+", default=["loglinear", "gp", "gbm"])
    p.add_argument("--objective", default="mean", help="mean | worst | a domain: what the proposal minimises")
    p.add_argument("--max-l1", type=float, default=0.6)
    p.add_argument(
        "--min-weight", type=float, default=0.02, help="no domain's proposed weight below this (propose.min_weight)"
    )
    p.add_argument(
        "--no-worse-than-prior",
        action="store_true",
        help="the proposal may not be predicted worse than uniform on any domain (propose.no_worse_than=prior)",
    )
    p.add_argument(
        "--proxy-val-per-domain",
        type=int,
        default=None,
        help="score the proxies on this many validation examples per domain (swarm.val_per_domain; default all)",
    )
    p.add_argument(
        "--pessimism",
        type=float,
        default=0.0,
        help="compare the law's predictions plus this many of its spreads (propose.pessimism; 0: the plain law)",
    )
    p.add_argument(
        "--average-top",
        type=int,
        default=1,
        help="propose the mean of this many best candidates (propose.average_top; 1: the single best)",
    )
    p.add_argument(
        "--replicates",
        type=int,
        default=0,
        help="rerun this many swarm mixtures on another data order: how reproducible the proxies' order is",
    )
    p.add_argument("--radius", type=float, default=0.1)
    p.add_argument("--baselines", nargs="+", default=["uniform", "natural", "odm", "doremi"])
    p.add_argument("--work", type=Path, default=Path("outputs/mixture_law_bench"))
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.swarm_size, args.swarm_steps = [0], 40, 14, 6
        args.work = args.out = Path("outputs/mixture_law_quick")
    return args


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    overrides = [
        f"seed={seed}",
        f"main.steps={args.steps}",
        "main.update_every=10",
        f"main.baselines=[{','.join(args.baselines)}]",
        f"swarm.size={args.swarm_size}",
        f"swarm.steps={args.swarm_steps}",
        f"swarm.concentration={args.concentration}",
        f"law.kinds=[{','.join(args.law_kinds)}]",
        f"propose.max_l1={args.max_l1}",
        f"propose.min_weight={args.min_weight}",
        f"propose.objective={args.objective}",
        f"propose.no_worse_than={'prior' if args.no_worse_than_prior else 'null'}",
        f"propose.pessimism={args.pessimism}",
        f"propose.average_top={args.average_top}",
        f"correct.radius={args.radius}",
        "data.val_per_domain=null",
        f"swarm.val_per_domain={'null' if args.proxy_val_per_domain is None else args.proxy_val_per_domain}",
        f"swarm.replicates={args.replicates}",
    ]
    if args.quick:
        overrides += ["data.train_per_domain=60", "data.val_per_domain=20"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="mixture_law", overrides=overrides)

    def make_model():
        return tiny_gpt2(n_layer=2, n_embd=96, n_head=4, n_positions=cfg.data.max_len, seed=seed)

    work = args.work / f"seed{seed}"
    start = time.perf_counter()
    summary = run_stages(cfg, make_model, args.data, work)
    summary["seconds"] = time.perf_counter() - start
    return summary


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    per_seed = [run_seed(args, seed) for seed in args.seeds]
    arms = list(per_seed[0]["arms"])
    domains = (
        list(per_seed[0]["arms"]["uniform"]["test"])
        if "uniform" in arms
        else list(per_seed[0]["arms"][arms[0]]["test"])
    )
    lines = [
        f"Seeds {args.seeds}; main runs {args.steps} steps x 16 x 128 bytes (byte GPT-2, 2 layers x 96); swarm "
        f"{args.swarm_size} runs x {args.swarm_steps} steps around uniform (Dirichlet concentration "
        f"{args.concentration:g}); proposal for the {args.objective} "
        f"validation loss within L1 {args.max_l1} of uniform, floor {args.min_weight:g}"
        + (", no domain predicted worse than at uniform" if args.no_worse_than_prior else "")
        + (f", predictions compared with {args.pessimism:g} spreads of pessimism" if args.pessimism else "")
        + (f", the mean of the {args.average_top} best candidates" if args.average_top > 1 else "")
        + f"; online correction radius {args.radius}. "
        "Test-split loss (nats/byte), median [min, max] over seeds.",
        "",
        "| arm | mean test loss | worst-domain test loss | main-run wall time (x uniform) |",
        "|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for arm in arms:
        means = [float(np.mean(list(s["arms"][arm]["test"].values()))) for s in per_seed]
        worsts = [float(max(s["arms"][arm]["test"].values())) for s in per_seed]
        wall = [s["main_seconds"][arm] / s["main_seconds"].get("uniform", s["main_seconds"][arm]) for s in per_seed]
        summary[arm] = {"mean": means, "worst": worsts, "wall": wall}
        lines.append(f"| {arm} | {median_range(means)} | {median_range(worsts)} | {median_range(wall, '{:.2f}')} |")
    swarm_ratio = [s["swarm_steps_per_main_run"] for s in per_seed]
    swarm_wall = [s["swarm_seconds"] / s["main_seconds"].get("uniform", 1.0) for s in per_seed]
    held = {k: [s["held_out_mae"][k] for s in per_seed] for k in per_seed[0]["held_out_mae"]}
    rank = {k: [s["held_out_rank"][k] for s in per_seed] for k in per_seed[0]["held_out_rank"]}
    # How far the law's proposal prediction (proxy scale) is from the main run's final validation loss there.
    main_error = [
        float(
            np.mean(
                [
                    abs(s["arms"]["law_static" if "law_static" in s["arms"] else "law"]["validation"][d] - p)
                    for d, p in s["proposal"]["predicted"].items()
                ]
            )
        )
        for s in per_seed
    ]
    lines += [
        "",
        f"Swarm cost: {median_range(swarm_ratio, '{:.2f}')} main runs in steps, {median_range(swarm_wall, '{:.2f}')} "
        "in wall time. Law chosen per seed: " + ", ".join(s["law"] for s in per_seed) + ".",
        "",
        f"| law kind | held-out-run mean absolute error (validation loss) | rank correlation of held-out runs' "
        f"{args.objective} loss with the prediction, per seed |",
        "|---|---|---|",
        *[
            f"| {k} | {median_range(v, '{:.4f}')} | {', '.join(f'{r:+.2f}' for r in rank[k])} |"
            for k, v in held.items()
        ],
        "",
        "A proposal is the law's best-ranked mixture, so it needs the order of mixtures right, not the level "
        "(`dataflex.mixture_search.ranking_skill`: Spearman's rho over the swarm's runs, each predicted by a fit "
        "that did not see it; 0 is chance).",
        *replicate_lines(per_seed, args.seeds, args.objective),
        "",
        f"The law's prediction at the proposal vs the main run's final validation loss there (mean absolute error "
        f"over domains): {median_range(main_error)} — the swarm's runs are {args.steps // args.swarm_steps}x "
        "shorter, so the level is not expected to carry over; the proposal relies on the ranking"
        + (
            f" (the law predicts losses on {args.proxy_val_per_domain} validation examples per domain, the main "
            "runs are scored on the whole split: the error includes that subset's offset)."
            if args.proxy_val_per_domain is not None
            else "."
        ),
        "",
        "Proposed weights per seed: "
        + "; ".join(", ".join(f"{d} {w:.2f}" for d, w in s["proposal"]["weights"].items()) for s in per_seed),
        "",
        *schedule_lines(per_seed, arms, args.steps, args.objective),
        f"Wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min (cached stages are not re-run).",
    ]
    data = {
        "summary": summary,
        "swarm_ratio": swarm_ratio,
        "held_out_mae": held,
        "held_out_rank": rank,
        "main_error": main_error,
        "seeds": per_seed,
    }
    print(write_results(args.out, lines, data))
    plot(args, summary, domains)


def replicate_lines(per_seed: list[dict[str, Any]], seeds: list[int], objective: str) -> list[str]:
    """How reproducible the proxies' order of mixtures is (``--replicates``), per seed."""
    noise = [s.get("replicates") for s in per_seed]
    if not all(noise):
        return []
    lines = [
        "",
        f"Replicates: {noise[0]['runs']} swarm mixtures per seed rerun on another data order (same model init); "
        "Spearman's rank correlation between the two runs of each mixture, and the sd of one run's loss against "
        "the sd across the swarm's mixtures:",
        "",
        f"| seed | rank correlation, {objective} loss | rank correlation per domain (median) | sd of one run | "
        "sd across mixtures |",
        "|---|---|---|---|---|",
    ]
    for seed, n in zip(seeds, noise):
        per_domain = float(np.nanmedian(list(n["domain_rank"].values())))
        lines.append(
            f"| {seed} | {n['objective_rank']:+.2f} | {per_domain:+.2f} | {n['replicate_sd']:.4f} | "
            f"{n['between_sd']:.4f} |"
        )
    return lines


def schedule_lines(per_seed: list[dict[str, Any]], arms: list[str], steps: int, objective: str) -> list[str]:
    """The two-stage schedule's weights, the laws' view of it, and every arm's validation loss half-way."""
    if "schedule" not in per_seed[0]["proposal"]:
        return []
    plans = [s["proposal"]["schedule"] for s in per_seed]
    half = [str(p["stages"][1][0]) for p in plans]
    lines = [
        "Schedule per seed (first stage's weights; the second stage's make the whole run's mixture the proposal): "
        + "; ".join(", ".join(f"{d} {w:.2f}" for d, w in p["stages"][0][1].items()) for p in plans),
        "",
        "Half-way law (fitted on the swarm's losses at the middle of its runs): held-out mean absolute error "
        + median_range([next(iter(p["held_out_mae"].values())) for p in plans], "{:.4f}")
        + f"; its predicted {objective} validation loss half-way, schedule vs static proposal: "
        + median_range([p["objective"][0] for p in plans], "{:.4f}")
        + " vs "
        + median_range([p["static_objective"][0] for p in plans], "{:.4f}")
        + " (the swarm's scale).",
        "",
        f"| arm | mean validation loss half-way (step {half[0]}) | at the end (step {steps}) |",
        "|---|---|---|",
    ]
    for arm in arms:
        mid = [s["along"][arm][h] for s, h in zip(per_seed, half) if h in s.get("along", {}).get(arm, {})]
        end = [float(np.mean(list(s["arms"][arm]["validation"].values()))) for s in per_seed]
        lines.append(f"| {arm} | {median_range(mid) if mid else 'not measured'} | {median_range(end)} |")
    return [*lines, ""]


def plot(args, summary: dict[str, Any], domains: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "mean", "mean test loss"), (axes[1], "worst", "worst-domain test loss")):
        strip_plot(ax, {arm: row[key] for arm, row in summary.items()}, title, highlight=lambda a: a.startswith("law"))
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
