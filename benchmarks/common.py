"""Shared by the instruction-tuning benchmarks (selection, clusters/dedup, curriculum).

A byte-level GPT-2 (2 layers, width 128) pretrained once on textmix is the starting point of every
finetuning run; losses are the mean over examples of the token-mean loss on response bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dataflex.domains import encode_domains
from dataflex.policies import Uniform
from dataflex.proxies.loop import train_mixture
from dataflex.run_folder import claim_run_folder, settings_digest
from dataflex.state import open_checked, read_json_checked, token_digest, write_checked, write_json_checked
from dataflex.testbeds.tiny import collate_causal, text_split, tiny_gpt2

POSITIONS = 256  # the base model's context; data max_len must not exceed it


def add_common_args(p: Any, *, steps: int, max_len: int, runs: str, default_data: Path) -> None:
    """Arguments every instruction benchmark takes (data, seeds, budget, pretrained base, output folders)."""
    p.add_argument("--data", type=Path, default=default_data, help="folder holding instruct/ and textmix/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=steps, help="finetuning steps of every arm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=max_len, help=f"bytes per example (<= {POSITIONS})")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--work", type=Path, default=Path("outputs/selection_work"), help="holds the pretrained base")
    p.add_argument("--runs", type=Path, default=Path(runs), help="per-run checkpoints and results (resumable)")
    p.add_argument("--quick", action="store_true", help="1 seed, tiny budgets: a smoke test of the pipeline")


def make_base(seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(n_layer=2, n_embd=128, n_head=4, n_positions=POSITIONS, seed=seed)


def pretrained_base(data: Path, work: Path, *, max_len: int, steps: int, batch_size: int, lr: float) -> dict:
    """Base weights: byte GPT-2 trained on textmix (uniform over domains) once, cached under ``work`` in a folder
    named by its settings (the text's tokens among them): a base made with another ``--pretrain-steps``,
    ``--max-len`` or data is never handed to a run that asked for this one (the ``--quick`` modes of the
    benchmarks share ``work``)."""
    text = text_split(data / "textmix" / "train", max_len)
    settings = {"tokens": token_digest(text), "max_len": max_len, "steps": steps, "batch_size": batch_size, "lr": lr}
    folder = work / f"base-{settings_digest(settings)}"
    claim_run_folder(folder, settings, hint="give --work another folder")
    path = folder / "model.pt"
    if not path.is_file():
        dom, names = encode_domains(text["domain"])
        model = make_base()
        train_mixture(
            model,
            text,
            dom,
            names,
            Uniform(),
            collate=collate_causal,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=0,
            ckpt_dir=folder / "ckpt",
            ckpt_every=250,
            desc="pretrain",
        )
        write_checked(path, lambda f: torch.save(model.state_dict(), f))
    return torch.load(open_checked(path))


# Arguments that say which runs to make or where to write, not what any one run does.
NOT_RUN_SETTINGS = ("seeds", "out", "runs", "work", "quick")


def claim_runs(args: Any, *, picks: tuple[str, ...] = ()) -> None:
    """Record the benchmark's settings in ``args.runs`` and refuse a rerun with other ones: finished runs are
    reused by their folder name (arm and seed), so ``--steps 50`` after a 400-step run would report the 400-step
    results as its own. ``picks``: the arguments that choose arms whose names are in their folders (those may
    change between reruns: more arms or seeds reuse the ones done)."""
    settings = {k: v for k, v in vars(args).items() if k not in (*NOT_RUN_SETTINGS, *picks)}
    claim_run_folder(args.runs, settings, hint="give --runs another folder")


def load_jsonl_file(path: Path, cap: int | None = None) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:cap] if cap else rows


def trainer_args(out: Path, *, steps: int, batch_size: int, lr: float, seed: int, save_steps: int = 50) -> Any:
    """TrainingArguments for a short CPU finetuning run with resumable checkpoints."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        save_steps=save_steps,
        save_total_limit=1,
        logging_steps=10**9,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def write_result(path: Path, result: Any) -> None:
    """Write a cached result (a run's, a test measure's) atomically, its sha256 beside it (``<path>.sha256``).
    Written in place, a kill mid-write left a truncated file that every rerun of the benchmark failed to parse
    (the run counted as finished), and a changed digit would have been reported as measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_checked(path, result)


#: A result :func:`write_result` wrote, refused when it does not match its digest (one without a digest is read as is).
read_result = read_json_checked
