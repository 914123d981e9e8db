"""Influence-scoring throughput: batched per-example gradients vs. a per-example loop.

    python benchmarks/influence_throughput.py             # batch sizes 8, 32, 128 (~3 min on 2 cores)

Same model (a tiny GPT-2, 4 layers x 128 wide, LoRA r=8 on attention and MLP projections), same data
(textmix, 128 bytes per example, the first 16 bytes as an uncounted prompt), one process per
measurement so peak memory (max RSS) is clean. Both paths compute LoRA per-example gradients,
project them to 1024 dims with the same seeded Rademacher matrix and normalise them; the features
must agree to 1e-4. Writes ``benchmarks/results/influence_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def build(batch_size: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from dataflex.grads import lora_linears
    from dataflex.tiny import collate_causal, default_data_dir, encode_bytes, load_jsonl_dir, tiny_gpt2

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


def measure(mode: str, batch_size: int, repeats: int, out_file: str) -> None:
    """Child process: time one path and write features + timing."""
    from dataflex.influence import GradientFeaturizer

    model, layers, batch = build(batch_size)
    featurizer = GradientFeaturizer(model, layers, dim=1024, seed=0)
    run = (lambda: featurizer.features(batch)) if mode == "batched" else (
        lambda: features_loop(model, layers, batch, featurizer.projector))  # fmt: skip
    feats = run()  # warm-up (also builds the cached projection)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        feats = run()
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"features": feats, "times": times, "peak_rss_mb": rss / 1024, "rss_before_mb": rss_before / 1024},
               out_file)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=3, metavar=("MODE", "BATCH", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        measure(args.child[0], int(args.child[1]), args.repeats, args.child[2])
        return
    rows = []
    scratch = Path("/tmp/dataflex_influence")
    scratch.mkdir(exist_ok=True)
    for bs in args.batch_sizes:
        res = {}
        for mode in ("batched", "loop"):
            f = scratch / f"{mode}_{bs}.pt"
            cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", mode, str(bs), str(f)]
            subprocess.run(cmd, check=True)
            res[mode] = torch.load(f)
        max_diff = float((res["batched"]["features"] - res["loop"]["features"]).abs().max())
        t_b = sorted(res["batched"]["times"])[len(res["batched"]["times"]) // 2]
        t_l = sorted(res["loop"]["times"])[len(res["loop"]["times"]) // 2]
        row = {
            "batch_size": bs,
            "batched_examples_per_s": bs / t_b,
            "loop_examples_per_s": bs / t_l,
            "speedup": t_l / t_b,
            "max_abs_feature_diff": max_diff,
            "agree_1e-4": max_diff <= 1e-4,
            "batched_peak_rss_mb": res["batched"]["peak_rss_mb"],
            "loop_peak_rss_mb": res["loop"]["peak_rss_mb"],
        }
        rows.append(row)
        print(row, flush=True)
    machine = f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    command = "python benchmarks/influence_throughput.py " + " ".join(sys.argv[1:])
    md = [
        f"Command: `{command}` on {machine}. Median of {args.repeats} timed repeats after a warm-up.",
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "influence_throughput.md").write_text("\n".join(md) + "\n")
    (args.out / "influence_throughput.json").write_text(json.dumps({"command": command, "machine": machine,
                                                                   "rows": rows}, indent=1))  # fmt: skip
    print("\n".join(md))


if __name__ == "__main__":
    main()
