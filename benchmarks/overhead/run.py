"""Step-time overhead of DataFlexCallback (per-example loss capture + ODM) on a stock HF Trainer.

    python -m benchmarks.overhead.run                  # ~3 minutes on 2 CPU cores
    python -m benchmarks.overhead.run --pairs 3 --steps 40
    python -m benchmarks.overhead.run --trainer sft    # TRL's SFTTrainer (default loss) -> results_sft.*
    python -m benchmarks.overhead.run --dynamics       # + a third arm keeping the training-dynamics record
                                                       #   -> results_dynamics.*
    python -m benchmarks.overhead.run --reweight [--trainer sft]  # + a third arm training with
                                                       #   ExampleWeightedLoss -> results[_sft]_reweight.*

Same model, data and seed in both arms; runs are interleaved (baseline, dataflex, baseline, ...)
so machine noise hits both alike. A step's time is the wall time between consecutive
``on_step_end`` events (data loading, forward, backward, optimizer, callbacks). For each run we
take the median step time after a warm-up; the reported number is the median over pairs of
``dataflex / baseline``. Writes ``results.{md,json}`` beside this file (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from benchmarks.report import write_results
from dataflex import DataFlexCallback
from dataflex.policies import ODM
from dataflex.samplers import ScheduledSampler
from dataflex.testbeds.tiny import byte_dataset, collate_causal, default_data_dir, load_jsonl_dir, tiny_gpt2
from dataflex.weighting import ExampleWeightedLoss

RESULTS = Path(__file__).resolve().parent  # results.{md,json} beside this file


class InstrumentedTime:
    """Wall time spent inside dataflex's own code (hook, callback events, sampler generation).

    The A/B ratio of whole runs is dominated by machine noise on a shared 2-core box; timing
    dataflex's code directly gives a low-noise estimate of the same overhead.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def wrap_generator(self, gen_fn):
        def timed(*args, **kwargs):
            gen = gen_fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(gen)
                except StopIteration:
                    self.seconds += time.perf_counter() - start
                    return
                self.seconds += time.perf_counter() - start
                yield item

        return timed


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps[skip:], self.stamps[skip + 1 :])]


def run(
    ds, with_dataflex: bool, args: argparse.Namespace, out: Path, dynamics: bool = False, reweight: bool = False
) -> tuple[float, float]:
    """Median step time after warm-up, and dataflex's own seconds per step (0 for the baseline); with
    ``dynamics`` the callback also keeps the per-example training-dynamics record, with ``reweight`` the model
    trains on ``ExampleWeightedLoss`` (the Trainer's ``compute_loss_func``; SFTTrainer then runs its extra forward)."""
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    inside = InstrumentedTime()
    if with_dataflex:
        dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=args.update_every, dynamics=dynamics)
        # The forward hook (loss capture) is registered at train begin, so wrapping it here is what runs.
        dfx.capture._on_forward = inside.wrap(dfx.capture._on_forward)
        for name in ("on_step_begin", "on_step_end", "on_epoch_begin", "on_save"):
            setattr(dfx, name, inside.wrap(getattr(dfx, name)))
        callbacks.insert(0, dfx)
    loss = {"compute_loss_func": dfx.wrap_loss(ExampleWeightedLoss())} if reweight else {}
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-3,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    model = tiny_gpt2(n_layer=args.layers, n_embd=args.width, n_head=4, n_positions=args.max_len, seed=0)
    if args.trainer == "sft":  # TRL's SFTTrainer with its default loss (the fused LM head)
        from trl import SFTConfig, SFTTrainer

        from dataflex.testbeds.tiny import byte_tokenizer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**settings, max_length=args.max_len),
            train_dataset=ds,
            processing_class=byte_tokenizer(),
            callbacks=callbacks,
            **loss,
        )
    else:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**settings),
            train_dataset=ds,
            data_collator=collate_causal,
            callbacks=callbacks,
            **loss,
        )
    for cb in callbacks:
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    original = ScheduledSampler.__iter__  # the sampler's own work: chunk computation and per-item bookkeeping
    ScheduledSampler.__iter__ = inside.wrap_generator(original)
    try:
        trainer.train()
    finally:
        ScheduledSampler.__iter__ = original
    return statistics.median(timer.step_times(skip=args.warmup)), inside.seconds / args.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir() / "textmix")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--trainer", choices=["trainer", "sft"], default="trainer", help="stock Trainer or TRL SFTTrainer")
    p.add_argument("--out", type=Path, default=None, help="default: this folder (results_sft.* for --trainer sft)")
    third = p.add_mutually_exclusive_group()
    third.add_argument("--dynamics", action="store_true", help="add an arm that keeps the training-dynamics record")
    third.add_argument("--reweight", action="store_true", help="add an arm that trains with ExampleWeightedLoss")
    args = p.parse_args()
    # Every example is filled to exactly max_len bytes (its text repeated), so both arms do the same
    # compute per step even though they see different examples in a different order.
    records = [
        {**r, "text": (r["text"] + " ") * (args.max_len // max(1, len(r["text"].encode())) + 1)}
        for r in load_jsonl_dir(args.data / "train")
    ]
    ds = byte_dataset(records, args.max_len)
    scratch = Path("/tmp") / "dataflex_overhead"
    base, flex, ratios, inside, inside_ratios = [], [], [], [], []
    third, third_ratios, third_inside = [], [], []
    third_arm = "with dynamics" if args.dynamics else "with ExampleWeightedLoss"
    for i in range(args.pairs):
        # Alternate the arms' order, so warm-up effects of the machine do not favour one arm.
        arms = ["base", "flex", "third"] if args.dynamics or args.reweight else ["base", "flex"]
        arms = arms if i % 2 == 0 else arms[::-1]
        times = {}
        for arm in arms:
            times[arm] = run(
                ds, arm != "base", args, scratch, arm == "third" and args.dynamics, arm == "third" and args.reweight
            )
        (b, _), (f, own) = times["base"], times["flex"]
        base.append(b)
        flex.append(f)
        ratios.append(f / b)
        inside.append(own)
        inside_ratios.append(1 + own / b)
        line = (
            f"pair {i + 1}/{args.pairs}: baseline {b * 1e3:.1f} ms/step, dataflex {f * 1e3:.1f} ms/step, "
            f"ratio {f / b:.3f}; dataflex's own code {own * 1e3:.2f} ms/step"
        )
        if args.dynamics or args.reweight:
            d, own_d = times["third"]
            third.append(d)
            third_ratios.append(d / f)
            third_inside.append(own_d)
            line += f"; {third_arm} {d * 1e3:.1f} ms/step ({d / f:.3f} x dataflex), own {own_d * 1e3:.2f} ms"
        print(line, flush=True)
    result = {
        "median_ratio": statistics.median(ratios),
        "instrumented_ratio": statistics.median(inside_ratios),
        "dataflex_own_ms_per_step": [x * 1e3 for x in inside],
        "ratios": ratios,
        "baseline_ms": [x * 1e3 for x in base],
        "dataflex_ms": [x * 1e3 for x in flex],
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    trainer_name = "SFTTrainer" if args.trainer == "sft" else "Trainer"
    rows = [
        "| arm | median step time (ms), per pair |",
        "|---|---|",
        f"| stock {trainer_name} | {', '.join(f'{x * 1e3:.1f}' for x in base)} |",
        f"| + DataFlexCallback(ODM) | {', '.join(f'{x * 1e3:.1f}' for x in flex)} |",
        f"| ratio | {', '.join(f'{r:.3f}' for r in ratios)} |",
        f"| dataflex's own code (ms/step) | {', '.join(f'{x * 1e3:.2f}' for x in inside)} |",
    ]
    if args.dynamics:
        # The record's own cost: dataflex's instrumented time with the record minus without, over the step.
        record = [(od - o) / b for od, o, b in zip(third_inside, inside, base)]
        result |= {
            "dynamics_ms": [x * 1e3 for x in third],
            "dynamics_vs_dataflex": third_ratios,
            "dynamics_median_ratio": statistics.median(third_ratios),
            "dynamics_own_ms_per_step": [x * 1e3 for x in third_inside],
            "dynamics_instrumented_ratio": 1 + statistics.median(record),
        }
        rows += [
            f"| + dynamics=True | {', '.join(f'{x * 1e3:.1f}' for x in third)} |",
            f"| ratio to DataFlexCallback(ODM) | {', '.join(f'{r:.3f}' for r in third_ratios)} |",
            f"| dataflex's own code with the record (ms/step) | {', '.join(f'{x * 1e3:.2f}' for x in third_inside)} |",
        ]
    if args.reweight:
        result |= {
            "reweight_ms": [x * 1e3 for x in third],
            "reweight_vs_dataflex": third_ratios,
            "reweight_median_ratio": statistics.median(third_ratios),
        }
        rows += [
            f"| + ExampleWeightedLoss (compute_loss_func) | {', '.join(f'{x * 1e3:.1f}' for x in third)} |",
            f"| ratio to DataFlexCallback(ODM) | {', '.join(f'{r:.3f}' for r in third_ratios)} |",
        ]
    rows += [
        "",
        f"**median A/B ratio: {result['median_ratio']:.3f}**; instrumented estimate 1 + own/baseline: "
        f"**{result['instrumented_ratio']:.4f}** (goal <= 1.05)",
    ]
    if args.dynamics:
        rows += [
            "",
            f"Training-dynamics record: **median A/B ratio to the callback without it "
            f"{result['dynamics_median_ratio']:.3f}**; instrumented estimate 1 + (own time with - without) / "
            f"baseline: **{result['dynamics_instrumented_ratio']:.4f}** (goal <= 1.02)",
        ]
    if args.reweight:
        rows += [
            "",
            f"Loss reweighting: **median A/B ratio of ExampleWeightedLoss to the callback alone "
            f"{result['reweight_median_ratio']:.3f}** (the weighted loss computed from the logits; TRL's SFTTrainer "
            "computes the full logits for any compute_loss_func and runs one more forward without gradient)",
        ]
    stem = "results_sft" if args.trainer == "sft" else "results_dynamics" if args.dynamics else "results"
    stem += "_reweight" if args.reweight else ""
    print(write_results(args.out or RESULTS, rows, result, stem=stem))


if __name__ == "__main__":
    main()
