"""Every mixture-law configuration run so far, side by side on validation and on test.

    python -m benchmarks.mixture_law.compare      # reads benchmarks/mixture_law/*/results.json, trains nothing

Each configuration's folder holds the per-seed, per-domain validation and test losses of its main runs
(written by ``benchmarks.mixture_law.run``). Ranking the configurations by the main runs' *validation* loss
is how one would choose among them without reading the test split; this table shows that choice next to the
test losses and uniform's, per seed, so the reader can see whether it beats uniform on every seed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.report import median_range, write_results

HERE = Path(__file__).resolve().parent
LAW_ARMS = ("law", "law_static", "law_schedule")


def mean_and_worst(losses: dict[str, float]) -> tuple[float, float]:
    return sum(losses.values()) / len(losses), max(losses.values())


def per_seed(results: dict[str, Any], arm: str, split: str) -> tuple[list[float], list[float]]:
    """The arm's mean and worst-domain loss on each seed that ran it."""
    pairs = [mean_and_worst(s["arms"][arm][split]) for s in results["seeds"] if arm in s["arms"]]
    return [m for m, _ in pairs], [w for _, w in pairs]


def seeds_beating_uniform(results: dict[str, Any], arm: str) -> int:
    """Seeds on which the arm's test losses are below the *same* results' uniform run of that seed on both the
    mean and the worst domain (each seed entry holds both arms, so no seed is paired with another's)."""
    wins = 0
    for s in results["seeds"]:
        if arm in s["arms"] and "uniform" in s["arms"]:
            (mean, worst), (u_mean, u_worst) = (mean_and_worst(s["arms"][a]["test"]) for a in (arm, "uniform"))
            wins += mean < u_mean and worst < u_worst
    return wins


def main() -> None:
    rows = []
    uniform = None
    seen: dict[str, list[str]] = {}  # the same main runs written by several invocations: listed once, all named
    for path in [HERE / "results.json", *sorted(HERE.glob("*/results.json"))]:
        results = json.loads(path.read_text())
        name = path.parent.name if path.parent != HERE else "(default command)"
        runs = json.dumps([s["arms"] for s in results["seeds"]], sort_keys=True)
        if runs in seen:
            seen[runs].append(name)
            continue
        seen[runs] = [name]
        if uniform is None and all("uniform" in s["arms"] for s in results["seeds"]):
            uniform = {split: per_seed(results, "uniform", split) for split in ("validation", "test")}
        for arm in LAW_ARMS:
            val_mean, val_worst = per_seed(results, arm, "validation")
            test_mean, test_worst = per_seed(results, arm, "test")
            if val_mean:
                wins = seeds_beating_uniform(results, arm)
                rows.append((seen[runs], arm, val_mean, val_worst, test_mean, test_worst, wins))
    if uniform is None:
        raise SystemExit(f"no results.json under {HERE} holds a uniform arm on every seed")
    rows.sort(key=lambda r: statistics.median(r[2]))

    lines = [
        "Main runs of every configuration in benchmarks/mixture_law/ (its section in benchmarks/README.md says "
        "how it was run), sorted by the median over seeds of the mean validation loss. Median [min, max] over "
        "seeds; the last column counts the seeds whose test losses beat that seed's uniform run (of the same "
        "invocation) on both the mean and the worst domain. The uniform row is the first invocation's.",
        "",
        "| configuration | arm | validation mean | validation worst | test mean | test worst | seeds better than "
        "uniform on both |",
        "|---|---|---|---|---|---|---|",
        f"| (uniform) | uniform | {median_range(uniform['validation'][0])} | {median_range(uniform['validation'][1])} "
        f"| {median_range(uniform['test'][0])} | {median_range(uniform['test'][1])} | - |",
    ]
    rows = [(" = ".join(names), *rest) for names, *rest in rows]
    for name, arm, val_mean, val_worst, test_mean, test_worst, wins in rows:
        lines.append(
            f"| {name} | {arm} | {median_range(val_mean)} | {median_range(val_worst)} | {median_range(test_mean)} "
            f"| {median_range(test_worst)} | {wins} of {len(test_mean)} |"
        )
    data = {
        "rows": [
            dict(
                zip(
                    (
                        "configuration",
                        "arm",
                        "val_mean",
                        "val_worst",
                        "test_mean",
                        "test_worst",
                        "seeds_beating_uniform",
                    ),
                    r,
                )
            )
            for r in rows
        ]
    }
    print(write_results(HERE, lines, data, stem="configurations"))


if __name__ == "__main__":
    main()
