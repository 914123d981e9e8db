"""Ablation: DoReMi's step size eta, reusing the references and cached reference losses of run.py.

    python -m benchmarks.mixture.run                 # first: trains the per-seed references
    python -m benchmarks.mixture.doremi_eta --eta 0.1

For each seed, trains a Group-DRO proxy with the given eta on the cached reference losses, then a main
run with the averaged weights, and reports the test loss next to run.py's uniform and eta=1 results.
Writes ``doremi_eta<eta>.md`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from dataflex.domains import encode_domains
from dataflex.proxies.doremi import REFERENCE_LOSSES, DoReMiOffline, train_proxy
from dataflex.recipes.mixture import load_split, run_experiment
from dataflex.testbeds.tiny import default_data_dir, tiny_gpt2

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eta", type=float, required=True)
    p.add_argument("--data", type=Path, default=default_data_dir() / "textmix")
    p.add_argument("--work", type=Path, default=Path("/tmp/dataflex_mixture_bench"))
    p.add_argument("--results", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    base = json.loads(args.results.read_text())
    run_args = base["args"]
    steps, seeds = int(run_args["steps"]), [int(s) for s in run_args["seeds"].strip("[]").split(",")]
    train_ds = load_split(args.data, "train", int(run_args["max_len"]))
    ids, names = encode_domains(train_ds["domain"])
    rows = []
    for seed in seeds:
        work = args.work / f"steps{steps}" / f"seed{seed}"

        def make_model(seed: int = seed):
            return tiny_gpt2(n_layer=2, n_embd=96, n_head=4, n_positions=int(run_args["max_len"]), seed=seed)

        ref_losses = np.load(work / "reference" / REFERENCE_LOSSES)
        loop = dict(
            steps=steps,
            batch_size=int(run_args["batch_size"]),
            lr=float(run_args["lr"]),
            seed=seed,
            update_every=int(run_args["update_every"]),
        )
        export = train_proxy(
            make_model, train_ds, ids, names, ref_losses, work / f"proxy_eta{args.eta}", eta=args.eta, **loop
        )
        policy = DoReMiOffline(weights_path=str(work / f"proxy_eta{args.eta}" / "doremi_weights.json"))
        res = run_experiment(
            policy=policy,
            make_model=make_model,
            data_root=args.data,
            steps=steps,
            batch_size=loop["batch_size"],
            lr=loop["lr"],
            seed=seed,
            update_every=loop["update_every"],
            eval_every=max(10, steps // 10),
            max_len=int(run_args["max_len"]),
            val_per_domain=None,
            work_dir=work,
            eval_splits=("validation", "test"),
            train_ds=train_ds,
        )
        test, val = res["test_loss"], res["validation_loss"]
        traj = np.array(export["trajectory"])
        rows.append(
            {
                "seed": seed,
                "mean": float(np.mean(list(test.values()))),
                "worst": float(max(test.values())),
                "val_mean": float(np.mean(list(val.values()))),
                "val_worst": float(max(val.values())),
                "weights": export["weights"],
                "max_weight_in_trajectory": float(traj.max()),
            }
        )
    summary = base["summary"]
    lines = [
        f"DoReMi eta ablation: `python -m benchmarks.mixture.doremi_eta --eta {args.eta}` (same seeds, budget and "
        "references as run.py). Median [min, max] over seeds; the validation columns are the ones to judge by.",
        "",
        "| method | val mean | val worst | test mean | test worst | max alpha during proxy training |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    for name in ("uniform", "doremi"):
        runs = base["runs"][name]
        val_mean = [float(np.mean(list(r["validation_loss"].values()))) for r in runs]
        val_worst = [float(max(r["validation_loss"].values())) for r in runs]
        s = summary[name]
        lines.append(
            f"| {name} (run.py) | {cell(val_mean)} | {cell(val_worst)} | {cell(s['mean'])} | {cell(s['worst'])} | |"
        )
    alphas = ", ".join(format(r["max_weight_in_trajectory"], ".2f") for r in rows)
    lines.append(
        f"| doremi eta={args.eta} | {cell([r['val_mean'] for r in rows])} | {cell([r['val_worst'] for r in rows])} | "
        f"{cell([r['mean'] for r in rows])} | {cell([r['worst'] for r in rows])} | {alphas} |"
    )
    lines += [
        "",
        f"Averaged weights (seed {rows[0]['seed']}): "
        + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, rows[0]["weights"])),
    ]
    text = "\n".join(lines) + "\n"
    (HERE / f"doremi_eta{args.eta}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
