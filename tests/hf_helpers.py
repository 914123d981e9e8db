"""Tiny Trainer runs shared by the HF tests (real textmix text, tiny GPT-2 built from config)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dataflex.tiny import byte_dataset, collate_causal, default_data_dir, load_jsonl_dir, tiny_gpt2, tiny_llama

DOMAINS3 = ("code", "literature", "trivia")


def small_dataset(per_domain: int = 24, max_len: int = 48, domains=DOMAINS3):
    recs = [
        r
        for r in load_jsonl_dir(default_data_dir() / "textmix" / "train", max_per_file=per_domain)
        if r["domain"] in domains
    ]
    return byte_dataset(recs, max_len)


class StepRecorder(TrainerCallback):
    """Keeps the example ids dataflex attributed to each optimizer step."""

    def __init__(self, dfx) -> None:
        self.dfx = dfx
        self.ids: dict[int, list[int]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        ids, _, _ = self.dfx.last_step_records()
        self.ids[state.global_step] = ids.tolist()


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash before step {self.step + 1}")


def make_trainer(ds, dfx, out_dir, *, max_steps=12, accum=1, workers=0, save_steps=4, extra=(), seed=0, arch="gpt2"):
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accum,
        max_steps=max_steps,
        save_steps=save_steps,
        logging_steps=100,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=workers,
        disable_tqdm=True,
    )
    if arch == "gpt2":
        model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=seed)
    elif arch == "llama":
        model = tiny_llama(n_layer=1, hidden=32, n_head=2, seed=seed)
    else:
        raise ValueError(f"arch={arch!r}; valid: 'gpt2', 'llama'")
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_causal, callbacks=[dfx, *extra])
    if hasattr(dfx, "attach"):
        dfx.attach(trainer)
    return trainer


def params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@torch.no_grad()
def single_example_loss(model, example) -> float:
    batch = collate_causal([example])
    return float(model(**batch).loss)
