"""How dataflex's sampler and state scale with the number of examples (issue: state that scales).

    python -m benchmarks.scaling.run                       # 1e5, 1e6, 1e7, 2e7 examples, 3 repeats
    python -m benchmarks.scaling.run --sizes 100000 --repeats 1

For N examples in 8 domains (uniform labels, seeded) and a mixture sampler with a decision scheduled every
tenth of the epoch, measured on one process (single-threaded numpy):

* generation: µs per sample to produce one whole epoch order (``epoch_order``) and to iterate the sampler
  as a DataLoader does (the first N/2 samples);
* resume at half an epoch: the sampler's state after N/2 consumed (time to take it), then load it into a
  fresh sampler and produce the first sample after it;
* checkpoint: write time — taking the state (``state_dict``) and writing it, as the callback's
  ``on_save`` does; the first save in the process (every repeat runs in a fresh process), then the
  median of the next two: a run saves many — and size of a dataflex state, the JSON and the binary
  file, for a mixing run (sampler, score store with nothing scored, policy) and for a selection run
  (a score per example and a selected subset of N/2 ids, as selection checkpoints them).

Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
K = 8


def build(n: int, events: bool = True):
    from dataflex.samplers import DomainMixtureSampler
    from dataflex.schedule import WeightSchedule

    ids = np.random.default_rng(0).integers(0, K, n)
    schedule = WeightSchedule([f"d{k}" for k in range(K)], np.full(K, 1 / K))
    if events:
        rng = np.random.default_rng(1)
        for i in range(1, 10):
            schedule.add(i * n // 10, rng.dirichlet(np.ones(K)))
    return DomainMixtureSampler(ids, schedule, seed=0), ids


def measure(n: int) -> dict[str, float]:
    from dataflex.checkpoint import save_state
    from dataflex.schedule import SubsetSchedule
    from dataflex.store import ScoreStore

    sampler, ids = build(n)
    t0 = time.perf_counter()
    sampler.epoch_order(0)
    epoch_us = (time.perf_counter() - t0) / n * 1e6

    half = n // 2  # a run that has consumed half an epoch: its sampler produced those positions
    sampler, _ = build(n)
    t0 = time.perf_counter()
    for i, _ in enumerate(sampler):
        if i + 1 == half:
            break
    iter_us = (time.perf_counter() - t0) / half * 1e6

    t0 = time.perf_counter()
    state = sampler.state_dict(consumed=half)
    state_s = time.perf_counter() - t0
    fresh, _ = build(n)
    t0 = time.perf_counter()
    fresh.load_state_dict(state)
    next(iter(fresh))
    resume_s = time.perf_counter() - t0

    mixing_store, selection_store = ScoreStore(ids, K), ScoreStore(ids, K)
    selection_store.record_scores(np.arange(n), np.random.default_rng(2).random(n), step=10)
    subset = SubsetSchedule(n)
    subset.add(n // 4, np.arange(0, n, 2))

    def mixing() -> dict:
        return {"sampler": sampler.state_dict(consumed=0), "store": mixing_store.state_dict(), "policy": {"t": 3}}

    def selection() -> dict:
        return {**mixing(), "store": selection_store.state_dict(), "subset": subset.state_dict()}

    out = {"epoch_us_per_sample": epoch_us, "iter_us_per_sample": iter_us, "state_s": state_s, "resume_s": resume_s}
    for name, take_state in (("mixing", mixing), ("selection", selection)):
        times = []
        for _ in range(3):  # a run saves many checkpoints: the first in a process, then the steady state
            folder = Path(tempfile.mkdtemp())
            try:
                t0 = time.perf_counter()  # what a checkpoint costs the run: taking the state and writing it
                save_state(folder, "dataflex_state", take_state(), None)
                times.append(time.perf_counter() - t0)
                out[f"{name}_json_mb"] = (folder / "dataflex_state.json").stat().st_size / 1e6
                binary = folder / "dataflex_state.pt"
                out[f"{name}_binary_mb"] = binary.stat().st_size / 1e6 if binary.exists() else 0.0
            finally:
                shutil.rmtree(folder)
        out[f"{name}_first_write_s"], out[f"{name}_write_s"] = times[0], statistics.median(times[1:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000, 20_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    from benchmarks.report import write_results

    rows, raw = [], {}
    for n in args.sizes:
        # Each repeat in a fresh process, so the first save really is a process's first (cold allocator).
        spawn = multiprocessing.get_context("spawn")
        runs = []
        for _ in range(args.repeats):
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                runs.append(pool.submit(measure, n).result())
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        raw[str(n)] = runs
        print(n, med, flush=True)
        rows.append(
            f"| {n:,} | {med['epoch_us_per_sample']:.3f} ({1 / med['epoch_us_per_sample']:.2f} M/s) | "
            f"{med['iter_us_per_sample']:.3f} | {med['state_s']:.4f} | {med['resume_s']:.3f} | "
            + " | ".join(
                f"{med[f'{run}_write_s']:.3f} s (first {med[f'{run}_first_write_s']:.3f} s), "
                f"{med[f'{run}_json_mb']:.4f} + {med[f'{run}_binary_mb']:.1f} MB"
                for run in ("mixing", "selection")
            )
            + " |"
        )
    lines = [
        f"Mixture sampler over {K} domains with 9 scheduled decisions per epoch; median of {args.repeats} repeats.",
        "",
        "| examples | epoch order µs/sample | iteration µs/sample | sampler state at N/2 (s) | resume at N/2 (s) "
        "| mixing state: write, JSON + binary | selection state: write, JSON + binary |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Goals (issue 14): ≥ 5 M samples/s generation, resume ≤ 0.5 s at 10M consumed, state write ≤ 0.2 s and "
        "JSON ≤ 1 MB at 10M examples.",
    ]
    print(write_results(args.out, lines, {"runs": raw, "sizes": args.sizes}))


if __name__ == "__main__":
    main()
