"""Peak memory and step time of per-example loss capture at a 128k vocabulary (issue: bounded-memory scoring).

    python -m benchmarks.loss_memory.run                # 5 alternating pairs per arm, ~6 min on 2 cores
    python -m benchmarks.loss_memory.run --pairs 2 --steps 6

Each run is its own process (so its peak RSS is its own): a tiny Llama built from config with a
128,000-token vocabulary trains on random token ids through a stock ``transformers.Trainer``. Arms:

* ``stock`` — no dataflex;
* ``dataflex`` — ``DataFlexCallback(Uniform())`` as users attach it: the per-token losses come from the
  model's own loss computation (tapped ``loss_function``);
* ``dataflex_recompute`` — the same callback on a model whose loss function is customised, so dataflex
  falls back to recomputing the loss from the logits in float32 chunks of at most 2^24 elements;
* ``fused`` — no dataflex, the same Llama with a fused linear cross-entropy loss
  (:class:`dataflex.testbeds.fused.FusedLossLlama`: no logits are materialised, none returned);
* ``dataflex_fused`` — the callback on that model: dataflex scores from the last hidden state (one extra
  LM-head forward over the counted tokens, no gradient, in chunks).

Reported: the median over pairs of each arm's peak RSS and median step time, as ratios to ``stock``
measured in the same pair (runs alternate so machine drift hits all arms alike); the fused arms are
compared with ``fused``, the stock step of a fused-loss model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("stock", "dataflex", "dataflex_recompute", "fused", "dataflex_fused")
BASELINE = {"dataflex_fused": "fused", "fused": "fused"}  # the stock run each arm is compared with (default: stock)


def one_run(arm: str, args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.steps`` steps in this process; return its peak RSS (MB) and median step time (s)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.loss.loss_utils import ForCausalLMLoss

    from dataflex import DataFlexCallback
    from dataflex.policies import Uniform

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    from dataflex.testbeds.fused import FusedLossLlama

    model = (FusedLossLlama if "fused" in arm else LlamaForCausalLM)(config)
    if arm == "dataflex_recompute":
        model.loss_function = lambda *a, **k: ForCausalLMLoss(*a, **k)  # a custom loss: no tapping
    rng = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (64, args.seq_len), generator=rng)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "domain": ["a", "b"] * 32})

    def collate(rows):
        x = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a, s, c, **kw):
            stamps.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=args.scratch,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[Stamp()])
    if arm.startswith("dataflex"):
        DataFlexCallback(Uniform(), update_every=5, trainer=trainer)
    trainer.train()
    steps = [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :])]
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--scratch", default="/tmp/dataflex_loss_memory")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one run in this process
    args = p.parse_args()
    if args.arm:
        print(json.dumps(one_run(args.arm, args)))
        return
    from benchmarks.report import write_results

    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for pair in range(args.pairs):
        order = ARMS if pair % 2 == 0 else ARMS[::-1]
        for arm in order:
            cmd = [sys.executable, "-m", "benchmarks.loss_memory.run", "--arm", arm]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("arm", "out", "pairs")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[arm].append(json.loads(out))
        print(f"pair {pair + 1}/{args.pairs}: " + ", ".join(f"{a} {runs[a][-1]}" for a in ARMS), flush=True)
    ratios = {
        arm: {
            key: [r[key] / s[key] for r, s in zip(runs[arm], runs[BASELINE.get(arm, "stock")])]
            for key in ("peak_rss_mb", "step_s")
        }
        for arm in ARMS
    }
    lines = [
        f"Tiny Llama (hidden {args.hidden}, 1 layer) with a {args.vocab:,}-token vocabulary, batch {args.batch_size} x "
        f"{args.seq_len} tokens, {args.steps} steps ({args.warmup} warm-up) per run, each run its own process; "
        f"{args.pairs} alternating pairs. Median over pairs; ratios are to the stock run of the same pair.",
        "",
        "| arm | compared with | peak RSS (MB) | peak RSS ratio | step time (ms) | step time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(
            f"| {arm} | {BASELINE.get(arm, 'stock')} | {statistics.median(r['peak_rss_mb'] for r in runs[arm]):.0f} | "
            f"{statistics.median(ratios[arm]['peak_rss_mb']):.3f} | "
            f"{1e3 * statistics.median(r['step_s'] for r in runs[arm]):.0f} | "
            f"{statistics.median(ratios[arm]['step_s']):.3f} |"
        )
    print(
        write_results(
            args.out, lines, {"runs": runs, "ratios": ratios, "args": {k: str(v) for k, v in vars(args).items()}}
        )
    )


if __name__ == "__main__":
    main()
