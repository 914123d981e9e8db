"""What the record of the Trainer's checkpoint files costs (``dataflex.hf.trainer_files``).

    python -m benchmarks.checkpoint_sums.run                      # 256 MB and 1 GB checkpoints, 5 repeats
    python -m benchmarks.checkpoint_sums.run --sizes-mb 64 --repeats 3

A synthetic Trainer checkpoint of S MB (weights one third, ``optimizer.pt`` two thirds, as AdamW keeps two
moments per weight; random float32 tensors so nothing compresses) is written with ``torch.save`` and fsynced,
as the Trainer's save does; then dataflex records the size and CRC-32 of every file (at ``on_save``, right after
the Trainer wrote them) and, as a resume does, checks them. Reported: medians over ``--repeats`` of the save,
the record and the check, and the record's time as a ratio of the save's. The files are read back from the
page cache here (they were just written); a checkpoint larger than the free memory is read from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def write_checkpoint(folder: Path, size_mb: int, seed: int) -> float:
    """Seconds to torch.save and fsync weights (1/3) and optimizer (2/3) of ``size_mb`` MB into ``folder``."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"w": torch.rand(size_mb * (1 << 20) // 12, generator=gen)}  # 4 bytes each: size/3 in all
    optimizer = {"exp_avg": torch.rand_like(weights["w"]), "exp_avg_sq": torch.rand_like(weights["w"])}
    start = time.perf_counter()
    for name, obj in (("model.pt", weights), ("optimizer.pt", optimizer)):
        with open(folder / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def measure(size_mb: int, seed: int) -> dict[str, float]:
    from dataflex.hf.trainer_files import record_trainer_files, verify_trainer_files

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint-1"
        (checkpoint / "dataflex").mkdir(parents=True)
        save = write_checkpoint(checkpoint, size_mb, seed)
        start = time.perf_counter()
        record_trainer_files(str(checkpoint), str(checkpoint / "dataflex"), "dataflex")
        record = time.perf_counter() - start
        start = time.perf_counter()
        verify_trainer_files(str(checkpoint), str(checkpoint / "dataflex"))
        check = time.perf_counter() - start
    return {"save_s": save, "record_s": record, "check_s": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for size in args.sizes_mb:
        runs = [measure(size, seed) for seed in range(args.repeats)]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        ratio = statistics.median(r["record_s"] / r["save_s"] for r in runs)
        rows.append({"size_mb": size, **median, "record_over_save": ratio, "runs": runs})
        print(f"{size} MB: save {median['save_s']:.2f} s, record {median['record_s']:.2f} s ({ratio:.2f}x the save)")
    table = [
        f"Command: `python -m benchmarks.checkpoint_sums.run --sizes-mb {' '.join(map(str, args.sizes_mb))} "
        f"--repeats {args.repeats}` (medians of {args.repeats})",
        "",
        "| checkpoint | save (torch.save, fsync) | record (size, CRC-32) | record / save | check at resume |",
        "|---|---|---|---|---|",
        *(
            f"| {r['size_mb']} MB | {r['save_s']:.2f} s | {r['record_s']:.2f} s | {r['record_over_save']:.2f} | "
            f"{r['check_s']:.2f} s |"
            for r in rows
        ),
    ]
    (HERE / "results.md").write_text("\n".join(table) + "\n")
    (HERE / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(table))


if __name__ == "__main__":
    main()
