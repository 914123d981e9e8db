"""Tabulate a Hydra sweep of recipes/mixture.py: median over seeds of mean / worst validation loss.

python -m dataflex.recipes.mixture -m policy=uniform,natural,odm,ado,doremi,doremi_online seed=0,1,2
python -m benchmarks.mixture.summarize multirun/mixture
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def run_label(root: Path, results: Path) -> str:
    """The policy of a run folder (``<policy>/seed<k>[/<other overrides>]``), with its other overrides if any:
    runs that differ in more than the seed are different rows, not seeds of one."""
    parts = results.relative_to(root).parent.parts
    at = next((i for i, part in enumerate(parts) if re.fullmatch(r"seed-?\d+", part)), None)
    if at is None or at == 0:
        raise SystemExit(f"{results}: not inside a <policy>/seed<k> folder of a recipes/mixture.py sweep")
    others = "/".join(parts[at + 1 :])
    return parts[at - 1] + (f" [{others}]" if others else "")


def summarize(root: Path) -> str:
    rows: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(root.glob("**/results.json")):
        rows[run_label(root, path)].append(json.loads(path.read_text()))
    if not rows:
        raise SystemExit(f"no results.json under {root}")
    lines = ["| policy | seeds | mean val loss | worst val loss | train s |", "|---|---|---|---|---|"]
    for policy, results in sorted(rows.items()):
        means = [statistics.fmean(r["validation_loss"].values()) for r in results]
        worsts = [max(r["validation_loss"].values()) for r in results]
        secs = [r["train_seconds"] for r in results]
        lines.append(
            f"| {policy} | {len(results)} | {statistics.median(means):.4f} | {statistics.median(worsts):.4f} | "
            f"{statistics.median(secs):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/mixture")))
