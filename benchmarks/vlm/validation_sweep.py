"""Choose VLM benchmark settings on validation only: train one method over a grid and print validation accuracy.

    python -m benchmarks.vlm.validation_sweep --method uniform --lr 2e-3 1e-3 5e-4 2.5e-4 1e-4 --seeds 0
    python -m benchmarks.vlm.validation_sweep --method last_loss --warmup 600 900 1200 --seeds 0 1
    python -m benchmarks.vlm.validation_sweep --method last_loss --warmup 900 --fraction 0.8 0.9 --seeds 0 1

Each run is ``recipes.vlm.train_vlm`` with the benchmark's defaults except the grid's settings. Printed:
validation accuracy against the given (partly wrong) answers — the only number used to choose — so the
clean test split is never looked at while choosing (``train_vlm`` scores it; this script does not print or
keep it). The choices and the numbers behind them are in ``benchmarks/README.md`` (VLM section).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from dataflex.recipes.vlm import METHODS, train_vlm
from dataflex.testbeds.digits import digits_vqa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list(METHODS), default="uniform")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, nargs="+", default=[5e-4])
    p.add_argument("--warmup", type=int, nargs="+", default=[200])
    p.add_argument("--fraction", type=float, nargs="+", default=[0.7])
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--data-seed", type=int, default=0)
    args = p.parse_args()
    data = digits_vqa(args.noise, seed=args.data_seed)
    for lr, warmup, fraction, seed in itertools.product(args.lr, args.warmup, args.fraction, args.seeds):
        with tempfile.TemporaryDirectory() as out:
            result = train_vlm(args.method, data, out=Path(out), seed=seed, lr=lr, warmup=warmup, fraction=fraction)
        row = {"method": args.method, "lr": lr, "warmup": warmup, "fraction": fraction, "seed": seed}
        print(json.dumps({**row, "validation_accuracy_given_answers": result["validation_accuracy_given_answers"]}))


if __name__ == "__main__":
    main()
