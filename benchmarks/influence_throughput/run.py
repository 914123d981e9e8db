"""Influence-scoring throughput: batched per-example gradients vs. a per-example loop.

    python -m benchmarks.influence_throughput.run             # batch sizes 8, 32, 128 (~4 min on 2 cores)

Timing: both paths run in one process, alternating (batched, loop, batched, loop, ...) after a warm-up,
and the speed-up is the median of the per-pair ratios, so slow drifts in machine load (about +-20 % on
this shared 2-core box) hit both sides of every pair alike. Peak memory (max RSS) comes from a separate
fresh process per path, so neither path's allocations count against the other.

Same model (a tiny GPT-2, 4 layers x 128 wide, LoRA r=8 on attention and MLP projections), same data
(textmix, 128 bytes per example, the first 16 bytes as an uncounted prompt), one process per
measurement so peak memory (max RSS) is clean. Both paths compute LoRA per-example gradients,
project them to 1024 dims with the same seeded Rademacher matrix and normalise them; the features
must agree to 1e-4. Writes ``benchmarks/results/influence_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import write_results

RESULTS = Path(__file__).resolve().parent  # results.{md,json} beside this file


def build(batch_size: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from dataflex.grads import lora_linears
    from dataflex.testbeds.tiny import collate_causal, default_data_dir, encode_bytes, load_jsonl_dir, tiny_gpt2

    base = tiny_gpt2(n_layer=4, n_embd=128, n_head=4, n_positions=128, seed=seed)
    torch.manual_seed(seed)  # peft initialises lora_A from the global RNG: fix it so every process agrees
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0)
    )
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as after some training: B = 0 would make every A-gradient vanish
            p.data.normal_(0, 0.02)
    records = load_jsonl_dir(default_data_dir() / "textmix" / "train", max_per_file=64)
    texts = [r["text"] for r in records if len(r["text"].encode()) >= 128][:batch_size]
    batch = collate_causal([{"input_ids": encode_bytes(t, 128)} for t in texts])
    batch["labels"][:, :16] = -100
    return model, lora_linears(model), batch


def features_loop(model, layers, batch, projector) -> torch.Tensor:
    """The straightforward reference: one forward/backward per example."""
    from dataflex.losses import per_example_mean_loss

    out = []
    model.eval()
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        row = {k: v[i : i + 1] for k, v in batch.items()}
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits
        per_example_mean_loss(logits, row["labels"]).sum().backward()
        grads = {name: layer.weight.grad.detach().unsqueeze(0) for name, layer in layers.items()}
        f = projector.project(grads)
        out.append(f / f.norm(dim=1, keepdim=True).clamp(min=1e-12))
    return torch.cat(out)


def _paths(batch_size: int):
    from dataflex.influence import GradientFeaturizer

    model, layers, batch = build(batch_size)
    featurizer = GradientFeaturizer(model, layers, dim=1024, seed=0)
    return {
        "batched": lambda: featurizer.features(batch),
        "loop": lambda: features_loop(model, layers, batch, featurizer.projector),
    }


def peak_memory(mode: str, batch_size: int, out_file: str) -> None:
    """Child process: run one path twice (warm-up + one) and report its peak RSS."""
    run = _paths(batch_size)[mode]
    run()
    run()
    torch.save({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, out_file)


def paired_timing(batch_size: int, pairs: int) -> dict:
    """Alternate the two paths; features of both, per-pair times and the median ratio."""
    paths = _paths(batch_size)
    feats = {mode: run() for mode, run in paths.items()}  # warm-up (also builds the cached projection)
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for i in range(pairs):
        order = ("batched", "loop") if i % 2 == 0 else ("loop", "batched")
        for mode in order:
            start = time.perf_counter()
            feats[mode] = paths[mode]()
            times[mode].append(time.perf_counter() - start)
    ratios = sorted(lo / ba for lo, ba in zip(times["loop"], times["batched"]))
    return {"features": feats, "times": times, "median_ratio": ratios[len(ratios) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--pairs", type=int, default=5, help="alternating (batched, loop) timing pairs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=3, metavar=("MODE", "BATCH", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        peak_memory(args.child[0], int(args.child[1]), args.child[2])
        return
    rows = []
    scratch = Path("/tmp/dataflex_influence")
    scratch.mkdir(exist_ok=True)
    for bs in args.batch_sizes:
        peak = {}
        for mode in ("batched", "loop"):
            f = scratch / f"{mode}_{bs}.pt"
            subprocess.run([sys.executable, __file__, "--child", mode, str(bs), str(f)], check=True)
            peak[mode] = torch.load(f)["peak_rss_mb"]
        timing = paired_timing(bs, args.pairs)
        max_diff = float((timing["features"]["batched"] - timing["features"]["loop"]).abs().max())
        median = {mode: sorted(t)[len(t) // 2] for mode, t in timing["times"].items()}
        row = {
            "batch_size": bs,
            "batched_examples_per_s": bs / median["batched"],
            "loop_examples_per_s": bs / median["loop"],
            "speedup": timing["median_ratio"],
            "max_abs_feature_diff": max_diff,
            "agree_1e-4": max_diff <= 1e-4,
            "batched_peak_rss_mb": peak["batched"],
            "loop_peak_rss_mb": peak["loop"],
        }
        rows.append(row)
        print(row, flush=True)
    md = [
        f"{args.pairs} alternating timing pairs after a warm-up; "
        "speed-up = median of per-pair (loop time / batched time); ex/s = batch / median time.",
        "",
        "| batch | batched ex/s | loop ex/s | speed-up | max abs feature diff | peak RSS batched / loop (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['batch_size']} | {r['batched_examples_per_s']:.1f} | {r['loop_examples_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['max_abs_feature_diff']:.1e} | "
            f"{r['batched_peak_rss_mb']:.0f} / {r['loop_peak_rss_mb']:.0f} |"
        )
    print(write_results(args.out, md, {"rows": rows}))


if __name__ == "__main__":
    main()
