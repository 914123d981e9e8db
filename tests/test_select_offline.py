"""Offline selection recipe: a Trainer LoRA checkpoint (adapter + optimizer.pt) -> scored pool -> subset."""

from __future__ import annotations

import json
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
    recorded = json.loads((tmp_path / "sel.json").read_text())["tokens"]  # the pool's text digest, for read_subset
    with pytest.raises(ValueError, match="other text"):
        read_subset(tmp_path / "sel.json", tokens="0" * 16)
    assert len(read_subset(tmp_path / "sel.json", tokens=recorded)) == 6


def warmup(pool, work, **over):
    from dataflex.recipes.select_offline import lora_warmup

    kw = dict(fraction=0.5, epochs=2, batch_size=6, lr=5e-3, save_steps=2, lora_r=4, lora_alpha=8)
    return lora_warmup(base_model, pool, work, **{**kw, **over}, target_modules=["c_attn"], seed=0)


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "adapter_model.safetensors")


def test_the_warm_up_resumes_from_its_newest_complete_checkpoint_and_is_reused_when_done(tmp_path, monkeypatch):
    """LESS's warm-up run by the recipe: 18 of 36 pool examples, 2 epochs of 6 -> 6 steps, a checkpoint every 2.
    Cut after step 2 (steps 4 and 6 gone, a half-written step-4 folder left) it resumes from step 2 and ends
    with the uninterrupted run's adapter; finished, it is returned without training; another base or share
    gets its own folder."""
    import shutil

    from transformers import Trainer

    pool = instruct_dataset(load_jsonl_dir(default_data_dir() / "instruct" / "train", max_per_file=3), 96)
    full = warmup(pool, tmp_path / "a")
    assert full.name == "checkpoint-6" and (full / "optimizer.pt").is_file()
    assert sorted(p.name for p in full.parent.iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "run_settings.json",
    ]
    cut = tmp_path / "b" / full.parent.name
    shutil.copytree(full.parent, cut)
    shutil.rmtree(cut / "checkpoint-6")
    (cut / "checkpoint-4" / "trainer_state.json").unlink()  # killed while writing step 4
    resumed_from = []
    real_train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, **kw: resumed_from.append(kw) or real_train(self, **kw))
    again = warmup(pool, tmp_path / "b")
    assert [Path(kw["resume_from_checkpoint"]).name for kw in resumed_from] == ["checkpoint-2"]
    for name, value in adapter(full).items():
        torch.testing.assert_close(adapter(again)[name], value, rtol=0, atol=1e-6, msg=name)
    assert warmup(pool, tmp_path / "b") == again and len(resumed_from) == 1  # done: reused, not retrained
    assert warmup(pool, tmp_path / "b", fraction=0.25).parent != again.parent
    # A changed byte of the optimizer.pt LESS reads (torch.load would take it as another Adam moment) is refused,
    # and the warm-up redoes its last steps from the checkpoint before, to the same adapter.
    data = bytearray((again / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x08
    (again / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint-6 are not those it saved \(changed: \['optimizer.pt'\]"):
        load_trainer_optimizer(base_model(), again)
    with pytest.warns(UserWarning, match=r"skipping .*checkpoint-6: the Trainer's files"):
        assert warmup(pool, tmp_path / "b") == again
    assert Path(resumed_from[-1]["resume_from_checkpoint"]).name == "checkpoint-4"
    for name, value in adapter(full).items():
        torch.testing.assert_close(adapter(again)[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_warmed_up_adapter_is_refused_on_another_base(tmp_path):
    from dataflex.recipes.select_offline import check_warmup_base

    pool = instruct_dataset(load_jsonl_dir(default_data_dir() / "instruct" / "train", max_per_file=2), 96)
    ckpt = warmup(pool, tmp_path, epochs=1)
    check_warmup_base(ckpt, base_model())  # the base it was trained on
    other = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=1)
    with pytest.raises(ValueError, match=r"was warmed up on another base model \(weights: '.*' there, '.*' now\)"):
        check_warmup_base(ckpt, other)
    check_warmup_base(tmp_path, other)  # a checkpoint from elsewhere: its base is not recorded, nothing to check


@pytest.mark.slow  # (seconds; .ci/run runs it)
def test_hydra_command_without_a_checkpoint_warms_up_first(tmp_path):
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for name in ("gsm8k", "boolq"):
        lines = (default_data_dir() / "instruct" / "train" / f"{name}.jsonl").read_text().splitlines()[:8]
        (pool_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "dataflex.recipes.select_offline",
        f"target={default_data_dir() / 'instruct' / 'validation' / 'gsm8k.jsonl'}",
        f"pool={pool_dir}",
        "fraction=0.25",
        "dim=32",
        "max_len=96",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "warmup.fraction=0.5",
        "warmup.epochs=1",
        f"work_dir={tmp_path / 'work'}",
        f"out={tmp_path / 'sel.json'}",
        f"hydra.run.dir={tmp_path / 'h'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp_path / "work").iterdir()
    assert f"warm-up checkpoint: {folder / 'checkpoint-1'}" in proc.stdout  # 8 of 16 examples, batch 8: 1 step
    assert "selected 4 of 16 examples" in proc.stdout and len(read_subset(tmp_path / "sel.json")) == 4
