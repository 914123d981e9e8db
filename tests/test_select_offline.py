"""Offline selection recipe: a Trainer LoRA checkpoint (adapter + optimizer.pt) -> scored pool -> subset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from dataflex.grads import lora_linears  # noqa: E402
from dataflex.influence import GradientFeaturizer  # noqa: E402
from dataflex.offline import read_subset  # noqa: E402
from dataflex.recipes.select_offline import load_lora_checkpoint, load_trainer_optimizer, select_offline  # noqa: E402
from dataflex.testbeds.tiny import collate_causal, default_data_dir, instruct_dataset, load_jsonl_dir, tiny_gpt2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def base_model():
    return tiny_gpt2(n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=0)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A 4-step LoRA warm-up with a stock Trainer, checkpointed (adapter + optimizer.pt)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("warm")
    pool = instruct_dataset(load_jsonl_dir(default_data_dir() / "instruct" / "train", max_per_file=6), 96)
    torch.manual_seed(0)
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=4,
        save_steps=4,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=pool.remove_columns(["task"]), data_collator=collate_causal)
    trainer.train()
    return out / "checkpoint-4", pool, trainer


def test_less_from_a_trainer_checkpoint_equals_the_live_run(warmed, tmp_path):
    ckpt, pool, trainer = warmed
    target = pool.filter(lambda r: r["task"] == "gsm8k")
    model = load_lora_checkpoint(base_model(), ckpt)
    optimizer = load_trainer_optimizer(model, ckpt)
    ids = select_offline(
        model,
        pool,
        target,
        method="less",
        fraction=0.25,
        out=tmp_path / "s.json",
        optimizer=optimizer,
        dim=128,
        batch_size=16,
    )
    assert len(ids) == 18 and read_subset(tmp_path / "s.json").tolist() == ids.tolist()
    # the same selection computed from the live Trainer's model and optimizer
    live = GradientFeaturizer(
        trainer.model, lora_linears(trainer.model), dim=128, mode="less", optimizer=trainer.optimizer
    )
    plain = GradientFeaturizer(trainer.model, lora_linears(trainer.model), projector=live.projector)
    direction = plain.features(collate_causal([target[i] for i in range(len(target))])).mean(0)
    scores = live.features(collate_causal([pool[i] for i in range(len(pool))])) @ direction
    expected = np.sort(np.argsort(-scores.detach().numpy(), kind="stable")[:18])
    assert ids.tolist() == expected.tolist()
    assert (np.asarray(pool["task"])[ids] == "gsm8k").mean() > 1 / 12  # leans towards the target task
    with pytest.raises(ValueError, match="method='influence'; valid values are less, tracin"):
        select_offline(model, pool, target, method="influence", fraction=0.1, out=tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="optimizer.pt is missing"):
        load_trainer_optimizer(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no peft adapter"):
        load_lora_checkpoint(base_model(), tmp_path)


def test_hydra_command_writes_the_subset(warmed, tmp_path):
    ckpt, _, _ = warmed
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for name in ("gsm8k", "boolq", "piqa"):
        lines = (default_data_dir() / "instruct" / "train" / f"{name}.jsonl").read_text().splitlines()[:10]
        (pool_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    target = default_data_dir() / "instruct" / "validation" / "gsm8k.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "dataflex.recipes.select_offline",
        f"checkpoint={ckpt}",
        f"target={target}",
        f"pool={pool_dir}",
        "method=less",
        "fraction=0.2",
        "dim=64",
        "max_len=96",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        f"out={tmp_path / 'sel.json'}",
        f"hydra.run.dir={tmp_path / 'h'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selected 6 of 30 examples" in proc.stdout
    assert len(read_subset(tmp_path / "sel.json")) == 6
