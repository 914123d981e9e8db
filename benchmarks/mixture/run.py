"""Mixture benchmark: every mixing policy on the 8-domain textmix corpus, several seeds, one run.

    python -m benchmarks.mixture.run            # full: 3 seeds, ~50 min on 2 CPU cores
    python -m benchmarks.mixture.run --quick    # 1 seed, 100 steps: a smoke test (into outputs/mixture_quick)
    python -m benchmarks.mixture.run --data ../shared/data/textmix

A byte-level GPT-2 (2 layers, width 96) is trained from scratch at a fixed budget (steps x batch x
128 bytes) with: natural, uniform, temperature (tau=2), ODM, ADO, offline DoReMi (uniform reference ->
Group-DRO proxy -> static weights) and online DoReMi (proxy + frozen reference beside the main model).
DoReMi's reference and proxy have the main model's architecture and budget; the reference is shared
by both DoReMi variants of a seed.

Reported per method (medians over seeds, with min-max spread): per-domain loss on the *test* split,
the mean over domains, the worst domain, the worst-domain excess loss over the reference model, the
steps needed to reach uniform's final mean validation loss (from curves on a fixed validation subset),
and wall-clock relative to uniform. Hyper-parameters were chosen on ``validation/`` only. Writes
``results.json``, ``results.md`` and ``weights_<method>.png`` beside this file (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import median_range, write_results
from dataflex.plotting import plot_weight_trajectory
from dataflex.policies import ADO, ODM, Natural, Temperature, Uniform
from dataflex.proxies.doremi import DoReMiOffline, PreparedDoReMiOnline
from dataflex.recipes.mixture import load_split, run_experiment
from dataflex.state import open_checked, read_json
from dataflex.testbeds.tiny import default_data_dir, per_domain_loss, tiny_gpt2

HERE = Path(__file__).resolve().parent

METHODS = ["natural", "uniform", "temperature", "odm", "ado", "doremi", "doremi_online"]


def make_policy(name: str, lr: float) -> Any:
    return {
        "natural": Natural,
        "uniform": Uniform,
        "temperature": lambda: Temperature(2.0),
        "odm": ODM,
        "ado": ADO,
        "doremi": DoReMiOffline,
        "doremi_online": lambda: PreparedDoReMiOnline(lr=lr),
    }[name]()


def steps_to_reach(curve: list[dict[str, float]], target: float) -> int | None:
    for point in curve:
        if point["mean"] <= target:
            return int(point["step"])
    return None


def spread(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    return median_range(vals) if vals else "n/a"


def plot_weights(runs: dict[str, list[dict]], out: Path) -> list[str]:
    written = []
    for name, seeds in runs.items():
        first = seeds[0]
        if len({tuple(h["weights"]) for h in first["history"]}) <= 1:
            continue  # a static mixture: nothing to plot
        path = out / f"weights_{name}.png"
        plot_weight_trajectory(
            [h["step"] for h in first["history"]],
            np.array([h["weights"] for h in first["history"]]),
            first["domain_names"],
            path,
            title=f"{name}: domain weights (seed {first['seed']})",
            xlabel="step",
            dpi=110,
        )
        written.append(path.name)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir() / "textmix")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--work", type=Path, default=Path("/tmp/dataflex_mixture_bench"))
    p.add_argument("--quick", action="store_true", help="1 seed, 100 steps: checks the pipeline in minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--max-len", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 100
        if args.out == HERE:  # a smoke test's plots must not replace the published ones beside this file
            args.out = Path("outputs/mixture_quick")
    if "uniform" not in args.methods:
        args.methods = ["uniform", *args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_ds = load_split(args.data, "train", args.max_len)
    eval_every = max(10, args.steps // 10)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    reference_loss: list[dict[str, float]] = []
    ref_seconds: list[float] = []
    for seed in args.seeds:
        work = args.work / f"steps{args.steps}" / f"seed{seed}"

        def make_model(seed: int = seed) -> torch.nn.Module:
            return tiny_gpt2(n_layer=2, n_embd=96, n_head=4, n_positions=args.max_len, seed=seed)

        for name in args.methods:
            print(f"[seed {seed}] {name} ...", flush=True)
            res = run_experiment(
                policy=make_policy(name, args.lr),
                make_model=make_model,
                data_root=args.data,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                update_every=args.update_every,
                eval_every=eval_every,
                max_len=args.max_len,
                val_per_domain=None,
                work_dir=work,
                eval_splits=("validation", "test"),
                train_ds=train_ds,
            )
            runs[name].append(res)
            print(f"    mean test loss {np.mean(list(res['test_loss'].values())):.4f} in {res['train_seconds']:.0f}s")
        ref_path = work / "reference" / "model.pt"
        if ref_path.is_file():  # the uniform-mixture reference trained for DoReMi
            ref = make_model()
            ref.load_state_dict(torch.load(open_checked(ref_path), map_location="cpu"))  # (its digest checked)
            test = load_split(args.data, "test", args.max_len)
            reference_loss.append(per_domain_loss(ref, test, test["domain"]))
            meta = read_json(work / "reference" / "meta.json")
            ref_seconds.append(float(meta["train_seconds"]))
        else:
            ref_seconds.append(0.0)

    domains = runs["uniform"][0]["domain_names"]
    summary: dict[str, Any] = {}
    for name, seeds in runs.items():
        means = [float(np.mean(list(r["test_loss"].values()))) for r in seeds]
        worsts = [float(max(r["test_loss"].values())) for r in seeds]
        excess = (
            [max(r["test_loss"][d] - ref[d] for d in domains) for r, ref in zip(seeds, reference_loss)]
            if len(reference_loss) == len(seeds)
            else []
        )
        targets = [u["curve"][-1]["mean"] for u in runs["uniform"]]
        reach = [steps_to_reach(r["curve"], t) for r, t in zip(seeds, targets)]
        # Full cost: main run + stages it ran; online DoReMi reuses the seed's reference, so add its cost.
        seconds = [
            r["train_seconds"] + r["prepare_seconds"] + (ref_seconds[i] if name == "doremi_online" else 0.0)
            for i, r in enumerate(seeds)
        ]
        uni_seconds = [u["train_seconds"] for u in runs["uniform"]]
        summary[name] = {
            "per_domain": {d: statistics.median(r["test_loss"][d] for r in seeds) for d in domains},
            "mean": means,
            "worst": worsts,
            "worst_excess_over_reference": excess,
            "steps_to_uniform_final": reach,
            "wallclock_ratio_to_uniform": [s / u for s, u in zip(seconds, uni_seconds)],
            "proxy_seconds": [r["proxy_seconds"] for r in seeds],
            "final_weights": [r["history"][-1]["weights"] for r in seeds],
        }
    plots = plot_weights(runs, args.out)
    total_minutes = (time.perf_counter() - started) / 60
    lines = [
        f"{len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps x {args.batch_size} x "
        f"{args.max_len} bytes, {total_minutes:.1f} min in all.",
        "",
        "Test-split loss (nats/byte), median over seeds [min, max]. Steps-to-target: first evaluation at which the "
        f"mean validation loss (50/domain subset, every {eval_every} steps) reaches uniform's final value.",
        "",
        "| method | mean | worst domain | worst excess over reference | steps to uniform's final "
        "| wall-clock / uniform |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        reach = s["steps_to_uniform_final"]
        reach_txt = ", ".join("never" if r is None else str(r) for r in reach)
        lines.append(
            f"| {name} | {spread(s['mean'])} | {spread(s['worst'])} | {spread(s['worst_excess_over_reference'])} | "
            f"{reach_txt} (of {args.steps}) | {spread(s['wallclock_ratio_to_uniform'])} |"
        )
    lines += [
        "",
        "Per-domain test loss (median over seeds):",
        "",
        "| domain | " + " | ".join(summary) + " |",
        "|---|" + "---|" * len(summary),
    ]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{summary[m]['per_domain'][d]:.3f}" for m in summary) + " |")
    lines += [
        "",
        "Final weights (seed " + str(args.seeds[0]) + "):",
        "",
        "| domain | " + " | ".join(summary) + " |",
        "|---|" + "---|" * len(summary),
    ]
    for i, d in enumerate(domains):
        lines.append(f"| {d} | " + " | ".join(f"{summary[m]['final_weights'][0][i]:.3f}" for m in summary) + " |")
    lines += ["", "Weight trajectories: " + ", ".join(f"`{p}`" for p in plots)]
    suffix = "_quick" if args.quick else ""
    payload = {
        "minutes": total_minutes,
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "reference_test_loss": reference_loss,
        "runs": runs,
    }
    print(write_results(args.out, lines, payload, stem=f"results{suffix}"))


if __name__ == "__main__":
    main()
