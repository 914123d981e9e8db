"""Demo: a tiny GPT trained on the 8 textmix domains, uniform mixture vs. ODM, on a stock HF Trainer.

    python recipes/demo_mixing.py                 # about 2 minutes on 2 CPU cores
    python recipes/demo_mixing.py --steps 100     # a quick look

Prints per-domain validation loss side by side and writes ``<out>/weights.png`` (ODM's weight
trajectory), ``<out>/results.json`` and ``<out>/results.md``. Data: the bundled ``data/textmix``
(real public text; see data/PROVENANCE.md). Only the ``validation/`` split is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dataflex import DataFlexCallback
from dataflex.plotting import plot_weight_trajectory
from dataflex.policies import ODM, Natural, Temperature, Uniform
from dataflex.testbeds.tiny import (
    check_evaluation_split,
    collate_causal,
    default_data_dir,
    per_domain_loss,
    text_split,
    tiny_gpt2,
)

HEADS = 4  # attention heads of the demo's model
POLICIES = {"uniform": Uniform, "natural": Natural, "temperature": Temperature, "odm": ODM}


class QuietProgress(TrainerCallback):
    """One progress bar per run, without echoing every log dict."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.label, leave=False)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def train_one(name: str, train_ds, args: argparse.Namespace, out: Path) -> tuple[object, DataFlexCallback, float]:
    policy = POLICIES[name]()
    dfx = DataFlexCallback(policy, domains=train_ds["domain"], update_every=args.update_every)
    targs = TrainingArguments(
        output_dir=str(out / name),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 20),
        lr_scheduler_type="cosine",
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    model = tiny_gpt2(n_layer=args.layers, n_embd=args.width, n_head=HEADS, n_positions=args.max_len, seed=args.seed)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        data_collator=collate_causal,
        callbacks=[dfx, QuietProgress(name)],
    )
    dfx.attach(trainer)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    start = time.perf_counter()
    trainer.train()
    return model, dfx, time.perf_counter() - start


def plot_weights(history: list[dict], domains: list[str], path: Path, title: str) -> None:
    plot_weight_trajectory(
        [h["step"] for h in history],
        np.array([h["weights"] for h in history]),
        domains,
        path,
        title=title,
        xlabel="optimizer step (decision time; takes effect a few batches later)",
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (argparse names the option and shows the value when it is not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def width(text: str) -> int:
    value = positive_int(text)
    if value % HEADS:
        raise argparse.ArgumentTypeError(f"must be a multiple of the model's {HEADS} attention heads; got {text}")
    return value


def data_folder(text: str) -> Path:
    """argparse type: a folder laid out as ``data/textmix`` (``train/`` and ``validation/`` holding ``.jsonl``)."""
    folder = Path(text)
    missing = [split for split in ("train", "validation") if not any((folder / split).glob("*.jsonl"))]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text} has no .jsonl files in {' or '.join(f'{s}/' for s in missing)}; give a folder laid out as "
            "data/textmix (train/ and validation/ holding .jsonl records with 'text' and 'domain')"
        )
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=data_folder, default=default_data_dir() / "textmix", help="a folder laid out as data/textmix"
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--policies", default="uniform,odm", help=f"comma list from {sorted(POLICIES)}")
    p.add_argument("--steps", type=positive_int, default=900)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-len", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--width", type=width, default=96, help=f"model width, a multiple of its {HEADS} heads")
    p.add_argument("--update-every", type=positive_int, default=5)
    p.add_argument("--val-per-domain", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        p.error(f"unknown policies {unknown}; valid: {sorted(POLICIES)}")
    if not names or len(set(names)) != len(names):
        p.error(f"--policies needs distinct names from {sorted(POLICIES)}; got {args.policies!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("weights*.png"):  # an earlier run's plots would pass for this run's
        stale.unlink()

    train_ds = text_split(args.data / "train", args.max_len)
    val_ds = text_split(args.data / "validation", args.max_len, args.val_per_domain)
    check_evaluation_split(train_ds, val_ds)
    domains = sorted(set(train_ds["domain"]))
    print(f"train: {len(train_ds)} examples in {len(domains)} domains; validation: {len(val_ds)}")

    results: dict[str, dict] = {}
    for name in names:
        model, dfx, seconds = train_one(name, train_ds, args, args.out)
        losses = per_domain_loss(model, val_ds, val_ds["domain"])
        results[name] = {"val_loss": losses, "seconds": seconds, "history": dfx.history}
        if len(dfx.history) > 1:
            plot_weights(
                dfx.history,
                dfx.domain_names,
                args.out / f"weights_{name}.png",
                f"{name}: domain weights during training",
            )

    header = "| domain | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    # The summary rows are in bold: a domain may itself be called "mean" or "worst".
    rows = [(d, [results[n]["val_loss"][d] for n in names]) for d in domains]
    rows.append(("**mean**", [np.mean(list(results[n]["val_loss"].values())) for n in names]))
    rows.append(("**worst**", [max(results[n]["val_loss"].values()) for n in names]))
    lines += [f"| {label} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for label, row in rows]
    lines.append("| train seconds | " + " | ".join(f"{results[n]['seconds']:.0f}" for n in names) + " |")
    table = "\n".join(lines)
    print("\nvalidation loss (nats/byte) per domain, seed", args.seed)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
    )
    adaptive = [n for n in names if len(results[n]["history"]) > 1]
    if adaptive:
        main_plot = args.out / f"weights_{adaptive[-1]}.png"
        (args.out / "weights.png").write_bytes(main_plot.read_bytes())
        print(f"\nweight trajectory: {args.out / 'weights.png'}")
    else:
        print(f"\nno weight plot: {', '.join(names)} kept their weights fixed")


if __name__ == "__main__":
    main()
