"""Compare the runs of a Hydra sweep side by side: each policy's median [min, max] over seeds, beside uniform.

``python -m dataflex.recipes.trainer -m policy=uniform,natural,odm seed=0,1,2`` (or ``dataflex.recipes.mixture``)
leaves one job folder per combination, ``<policy>/seed<k>[/<other overrides>]``, each with its ``results.json``.
:func:`summarize_sweep` reads every one of them under a sweep folder and writes ``sweep_summary.md`` (mean and
worst-domain loss per policy, median [min, max] over seeds, how many seeds beat the same seed's uniform run,
and the per-domain medians) and ``sweep_summary.png`` (per-domain loss per policy, bars at the median, whiskers
from the best to the worst seed). :class:`dataflex.recipes.sweep_summary.SweepSummary` does so when a Hydra
multirun of the Trainer, mixture, instruction or VLM recipe ends (their configs register it), and
``python -m dataflex.sweep <sweep folder>`` at any time, for instance after a job failed. A sweep of the VLM recipe
(``python -m dataflex.recipes.vlm -m method=uniform,rho seed=0,1,2``) is compared on what it reports instead: clean
test accuracy per question type, higher being better (its mean over question types and its worst question type).

Runs are compared only with runs of the same other overrides (the folder below ``seed<k>``): a sweep over
``lr`` gets one table per learning rate. Overrides of the policy's (detector's) own settings make other arms of
one table instead (``temperature(tau=2)`` and ``temperature(tau=4)`` beside ``uniform``). Results that cannot be
compared are refused, naming the folders: two runs claiming one policy, settings and seed, or runs of one table
evaluated on different domains (their mean and worst domain would be over different sets).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataflex.run_folder import split_overrides

__all__ = [
    "LOSS",
    "VLM_ACCURACY",
    "Measure",
    "SweepRun",
    "collect_runs",
    "plot_sweep",
    "summarize_sweep",
    "sweep_tables",
]

SPLITS = ("validation", "test")  # which per-domain values a run reports, in table order
REFERENCE = "uniform"  # the arm every other one is compared with, seed by seed (the instruct recipe: "none")


@dataclass(frozen=True)
class Measure:
    """What a recipe's runs report per group, and which way is better."""

    name: str
    group: str  # what the per-group values are per ("domain", "question type")
    higher_is_better: bool
    unit: str  # said once above the tables


LOSS = Measure("loss", "domain", False, "loss in nats per byte for the bundled recipes, lower is better")
VLM_ACCURACY = Measure(
    "clean accuracy", "question type", True, "the VLM recipe's clean test accuracy per question type, higher is better"
)


@dataclass(frozen=True)
class SweepRun:
    """One job of a sweep: its policy (as chosen on the command line), other overrides, seed and per-group values."""

    policy: str
    settings: str  # the overrides other than policy and seed, "" when none
    seed: int
    values: dict[str, dict[str, float]]  # split -> domain (question type) -> loss (accuracy)
    folder: Path
    measure: Measure = LOSS


def collect_runs(root: Path) -> list[SweepRun]:
    """Every ``results.json`` under ``root``, read as a :class:`SweepRun`; a file outside a ``<policy>/seed<k>``
    folder, or without per-domain losses (or the VLM recipe's per-question accuracy), is refused naming it."""
    root = Path(root)
    runs = []
    for path in sorted(root.glob("**/results.json")):
        parts = path.relative_to(root).parent.parts
        at = next((i for i, part in enumerate(parts) if re.fullmatch(r"seed-?\d+", part)), None)
        if at is None or at == 0:
            raise ValueError(
                f"{path}: not inside a <policy>/seed<k> folder of a recipe's sweep (the recipes' hydra.sweep.subdir); "
                "give the sweep folder itself"
            )
        result = _read_result(path)
        measure = VLM_ACCURACY if isinstance(result.get("accuracy_by_question"), dict) else LOSS
        if measure is VLM_ACCURACY:  # (its validation answers are the noisy given ones: test is the clean split)
            values = {"test": result["accuracy_by_question"]}
        else:  # (the instruction recipe writes an empty test_loss when it did not evaluate the test split)
            values = {
                split: result[f"{split}_loss"] for split in SPLITS if isinstance(result.get(f"{split}_loss"), dict)
            }
            values = {split: by_domain for split, by_domain in values.items() if by_domain}
            if "validation" not in values:
                raise ValueError(
                    f"{path} has no per-domain 'validation_loss' (nor the VLM recipe's 'accuracy_by_question'); "
                    f"keys there: {sorted(result)}"
                )
        for split, by_group in values.items():
            bad = {k: v for k, v in by_group.items() if isinstance(v, bool) or not isinstance(v, int | float)}
            if bad:
                raise ValueError(f"{path}: the {split} values must be numbers; got {bad} (edited by hand?)")
        seed = int(parts[at][len("seed") :])
        if "seed" in result and result["seed"] != seed:
            raise ValueError(f"{path} records seed {result['seed']} but sits in folder {parts[at]!r}; moved by hand?")
        arm, settings = _arm_and_settings(parts[at - 1], "/".join(parts[at + 1 :]))
        runs.append(SweepRun(arm, settings, seed, values, path.parent, measure))
    if not runs:
        raise ValueError(f"no results.json under {root}: no job of the sweep has finished (or it is another folder)")
    return runs


def _read_result(path: Path) -> dict[str, Any]:
    """One job's ``results.json`` as an object; a file that is not one is refused naming it (the recipes write it
    whole or not at all, so such a file was damaged or written by something else)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}): rerun its job, or remove the file") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path} holds a JSON {type(result).__name__}, not a recipe's results object")
    return result


#: Overrides of the arm's own config group (``policy.tau=2``, ``detector.drop=0.2``): they make another arm of the
#: same comparison, not another comparison, so ``temperature`` at two ``tau`` both meet ``uniform`` in one table.
ARM_OPTIONS = ("policy.", "detector.")


def _arm_and_settings(policy: str, settings: str) -> tuple[str, str]:
    """``("temperature(tau=2)", "lr=0.01")`` from ``"temperature"`` and ``"lr=0.01,policy.tau=2"``. A name the recipe
    cut to its start (a 16-digit ``~<digest>`` at its end, see :func:`dataflex.run_folder.folder_name`) has lost its
    last items, so it is not split: a table of its own. (Long items shortened one by one keep their keys.)"""
    if not settings or re.search(r"~[0-9a-f]{16}$", settings):
        return policy, settings
    items = split_overrides(settings)
    own = [item.split(".", 1)[1] for item in items if item.startswith(ARM_OPTIONS)]
    rest = [item for item in items if not item.startswith(ARM_OPTIONS)]
    return (f"{policy}({','.join(own)})" if own else policy), ",".join(rest)


def _spread(values: Sequence[float]) -> str:
    """``median [min, max]``; a run whose loss is not finite (diverged) is named, not ordered among the others."""
    bad = sum(not np.isfinite(v) for v in values)
    if bad:
        return f"not finite in {bad} of {len(values)} seeds"
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def _check_comparable(runs: list[SweepRun]) -> None:
    """Refuse, naming the folders, a table whose runs cannot be compared."""
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        if (run.policy, run.seed) in seen:
            raise ValueError(
                f"two runs of policy {run.policy!r}, seed {run.seed} and the same settings: "
                f"{seen[run.policy, run.seed]} and {run.folder} (seed folders such as seed1 and seed01?)"
            )
        seen[run.policy, run.seed] = run.folder
    first = runs[0]
    for run in runs[1:]:
        if run.measure != first.measure:
            raise ValueError(
                f"runs reporting different measures in one comparison: {first.folder} reports {first.measure.name}, "
                f"{run.folder} {run.measure.name} (results of different recipes in one sweep folder?)"
            )
        for split in SPLITS:
            mine, theirs = set(first.values.get(split, {})), set(run.values.get(split, {}))
            if split in first.values and split in run.values and mine != theirs:
                raise ValueError(
                    f"{split} {first.measure.name} over different {first.measure.group}s in one comparison: "
                    f"{first.folder} has {sorted(mine)}, {run.folder} has {sorted(theirs)}; mean and worst would be "
                    "over different sets (another data.path under the same settings?)"
                )


def _summary(values: dict[str, float], measure: Measure) -> tuple[float, float]:
    """Mean and worst group of one run's per-group values (the worst is the lowest accuracy, the highest loss)."""
    per_group = list(values.values())
    return float(np.mean(per_group)), float(min(per_group) if measure.higher_is_better else max(per_group))


def _better(ours: tuple[float, float], theirs: tuple[float, float], measure: Measure) -> bool:
    """Better on both the mean and the worst group."""
    if measure.higher_is_better:
        return ours[0] > theirs[0] and ours[1] > theirs[1]
    return ours[0] < theirs[0] and ours[1] < theirs[1]


def _arm_order(by_policy: dict[str, list[SweepRun]], reference: str, split: str) -> list[str]:
    """The reference first, then best median mean on ``split`` first."""

    def key(policy: str) -> tuple[bool, float]:
        runs = by_policy[policy]
        median = float(np.median([_summary(run.values[split], run.measure)[0] for run in runs]))
        if not np.isfinite(median):
            return policy != reference, np.inf  # (a diverged run: last)
        return policy != reference, -median if runs[0].measure.higher_is_better else median

    return sorted(by_policy, key=key)


def _comparisons(runs: list[SweepRun]) -> dict[str, dict[str, list[SweepRun]]]:
    """settings -> policy -> its runs by seed, each settings' runs checked comparable (tables and plot alike)."""
    groups: dict[str, list[SweepRun]] = defaultdict(list)
    for run in runs:
        groups[run.settings].append(run)
    out = {}
    for settings in sorted(groups):
        _check_comparable(groups[settings])
        by_policy: dict[str, list[SweepRun]] = defaultdict(list)
        for run in sorted(groups[settings], key=lambda r: r.seed):
            by_policy[run.policy].append(run)
        out[settings] = dict(by_policy)
    return out


def sweep_tables(runs: list[SweepRun], reference: str = REFERENCE) -> str:
    """Markdown: per settings, one row per policy (median [min, max] over seeds; how many seeds beat the same seed's
    ``reference`` run) and the per-domain medians."""
    out = []
    for settings, by_policy in _comparisons(runs).items():
        group = [run for arm in by_policy.values() for run in arm]
        measure = group[0].measure
        splits = [s for s in SPLITS if all(s in run.values for run in group)]
        paired_with = {run.seed: run for run in by_policy.get(reference, [])}
        out.append(f"### {settings or 'default settings'}\n")
        head = ["policy", "seeds"] + [
            f"{s} {what}" for s in splits for what in (f"mean {measure.name}", f"worst {measure.group}")
        ]
        head.append(f"seeds better than {reference} (same seed; mean and worst, {splits[-1]})")
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        policies = _arm_order(by_policy, reference, splits[0])
        for policy in policies:
            arm = by_policy[policy]
            cells = [policy, ",".join(str(run.seed) for run in arm)]
            for split in splits:
                pairs = [_summary(run.values[split], measure) for run in arm]
                cells += [_spread([p[0] for p in pairs]), _spread([p[1] for p in pairs])]
            paired = [run for run in arm if run.seed in paired_with]
            if policy == reference or not paired:
                cells.append("-" if policy == reference else f"no {reference} run with these seeds")
            else:
                split = splits[-1]
                ours = [_summary(run.values[split], measure) for run in paired]
                theirs = [_summary(paired_with[run.seed].values[split], measure) for run in paired]
                better = sum(_better(a, b, measure) for a, b in zip(ours, theirs))
                cells.append(f"{better} of {len(paired)}")
            out.append("| " + " | ".join(cells) + " |")
        split = splits[0]
        out += ["", f"{split.capitalize()} {measure.name} per {measure.group}, median over seeds "
                f"({settings or 'default settings'}):", ""]  # fmt: skip
        out += [f"| {measure.group} | " + " | ".join(policies) + " |", "|" + "---|" * (len(policies) + 1)]
        for name in sorted(group[0].values[split]):
            medians = [np.median([run.values[split][name] for run in by_policy[p]]) for p in policies]
            out.append(f"| {name} | " + " | ".join(f"{m:.4f}" for m in medians) + " |")
        out.append("")
    return "\n".join(out)


def plot_sweep(runs: list[SweepRun], path: Path, *, reference: str = REFERENCE, dpi: int = 120) -> None:
    """Validation loss (the VLM recipe: clean test accuracy) per domain (question type) and policy: a bar at the median
    over seeds, a whisker from the best seed to the worst. One panel per settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dataflex.plotting import domain_colors, drawable_names

    comparisons = _comparisons(runs)
    domains_most = max(len(next(iter(run.values.values()))) for run in runs)
    fig, axes = plt.subplots(
        len(comparisons), 1, figsize=(max(6.5, 0.9 * (domains_most + 1) + 2), 3.6 * len(comparisons))
    )
    for ax, (settings, by_policy) in zip(np.atleast_1d(axes), comparisons.items()):
        group = [run for arm in by_policy.values() for run in arm]
        measure, split = group[0].measure, next(s for s in SPLITS if all(s in run.values for run in group))
        policies = _arm_order(by_policy, reference, split)
        domains = sorted(group[0].values[split])
        columns = [*domains, "(mean)", "(worst)"]  # (a domain may be called "mean")
        width = 0.8 / len(policies)
        for i, (policy, color) in enumerate(zip(policies, domain_colors(len(policies)))):
            values = np.array(
                [
                    [*(run.values[split][d] for d in domains), *_summary(run.values[split], measure)]
                    for run in by_policy[policy]
                ]  # fmt: skip
            )
            median = np.median(values, axis=0)
            x = np.arange(len(columns)) + (i - (len(policies) - 1) / 2) * width
            error = np.vstack([median - values.min(axis=0), values.max(axis=0) - median])
            label = drawable_names([f"{policy} ({len(values)} seeds)"])[0]
            ax.bar(x, median, width, yerr=error, capsize=2, color=color, label=label)
        ax.set_xticks(np.arange(len(columns)), drawable_names(columns), rotation=30, ha="right", fontsize=8)
        finite = [v for run in group for v in run.values[split].values() if np.isfinite(v)]
        if finite:  # (bars start near the lowest value, so differences between policies show)
            ax.set_ylim(bottom=max(0.0, min(finite) - 0.1 * abs(min(finite))))
        ax.set_ylabel(f"{split} {measure.name}")
        ax.set_title(drawable_names([settings or "default settings"])[0], fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def summarize_sweep(root: Path, reference: str = REFERENCE) -> str:
    """Write ``sweep_summary.md`` and ``sweep_summary.png`` into ``root`` (every finished job under it); return the
    Markdown."""
    root = Path(root)
    runs = collect_runs(root)
    again = f"python -m dataflex.sweep {root}" + (f" --reference {reference}" if reference != REFERENCE else "")
    units = "; ".join(sorted({run.measure.unit for run in runs}))
    text = f"Every finished run under {root} (median [min, max] over seeds; {units}). Rerun: {again}\n\n"
    arms = sorted({run.policy for run in runs})
    if reference not in arms:  # (a misspelt --reference reads like a sweep whose reference jobs all failed)
        text += f"**No {reference!r} run in this folder to compare with**; its arms: {', '.join(arms)}.\n\n"
    text += sweep_tables(runs, reference)
    from dataflex.state import write_text_atomic

    write_text_atomic(root / "sweep_summary.md", text)
    plot_sweep(runs, root / "sweep_summary.png", reference=reference)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dataflex.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a Hydra sweep folder (hydra.sweep.dir, e.g. multirun/trainer)")
    parser.add_argument("--reference", default=REFERENCE, help="the arm others are compared with (instruct: none)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        parser.error(f"{args.sweep} is not a folder")
    try:
        print(summarize_sweep(args.sweep, args.reference))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
