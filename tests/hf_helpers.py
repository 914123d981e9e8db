"""Tiny Trainer runs shared by the HF tests (real textmix text, tiny GPT-2 built from config)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dataflex.testbeds.tiny import byte_dataset, collate_causal, default_data_dir, load_jsonl_dir, tiny_gpt2, tiny_llama

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


class OutOfMemoryOnce(TrainerCallback):
    """Raises, once, after step 2, the error the Trainer's auto_find_batch_size retries on (a simulated OOM)."""

    fired = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired and state.global_step == 2:
            self.fired = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def trainer_settings(out_dir, *, accum, max_steps, save_steps, logging_steps, workers, seed) -> dict:
    """The TrainingArguments every test Trainer shares (TRL's SFTConfig takes the same)."""
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accum,
        max_steps=max_steps,
        save_steps=save_steps,
        logging_steps=logging_steps,
        learning_rate=3e-3,
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=workers,
        disable_tqdm=True,
    )


def tiny_model(arch: str = "gpt2", seed: int = 0):
    """The one-layer test model of ``arch`` ('gpt2' or 'llama'), seeded."""
    if arch == "gpt2":
        return tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=seed)
    if arch == "llama":
        return tiny_llama(n_layer=1, hidden=32, n_head=2, seed=seed)
    if arch == "fused_llama":  # the same Llama, returning only the loss in training (fused linear cross-entropy)
        from dataflex.testbeds.fused import FusedLossLlama

        model = tiny_llama(n_layer=1, hidden=32, n_head=2, seed=seed)
        model.__class__ = FusedLossLlama
        return model
    raise ValueError(f"arch={arch!r}; valid: 'gpt2', 'llama', 'fused_llama'")


class FSDPOnCPU:
    """Mixin for a Trainer class (the stock one, TRL's): FSDP on CPU ranks (gloo), for tests, by lifting one gate.

    accelerate turns an FSDP plugin into ``DistributedType.FSDP`` only for accelerator backends (a CPU run silently
    trains as DDP), although torch's FSDP1 and FSDP2 run on CPU with gloo. Set here after the Accelerator is built,
    with the device it gives FSDP1's ``device_id`` as plain ``cpu`` (FSDP1 refuses ``cpu:0`` for weights on ``cpu``);
    everything else — accelerate's preparation, torch's sharding, the Trainer's FSDP paths — is the real code.
    """

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None:
            raise ValueError("FSDPOnCPU needs fsdp settings in its TrainingArguments (fsdp_settings())")
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.device = torch.device("cpu")
        self.is_fsdp_enabled = True


class FSDPOnCPUTrainer(FSDPOnCPU, Trainer):
    """The stock Trainer under FSDP on CPU ranks (:class:`FSDPOnCPU`)."""


def fsdp_settings(version: int, layer: str) -> dict:
    """TrainingArguments for FSDP ``version`` (1 or 2), each ``layer`` (a class name) a shard unit. Sharded
    checkpoints: the Trainer's full-state-dict save fails on CPU inside safetensors (an invalid storage pointer),
    with or without dataflex."""
    config = {"version": version, "transformer_layer_cls_to_wrap": [layer], "sync_module_states": False}
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": config | {"state_dict_type": "SHARDED_STATE_DICT"}}


def make_trainer(
    ds,
    dfx,
    out_dir,
    *,
    max_steps=12,
    accum=1,
    workers=0,
    save_steps=4,
    extra=(),
    seed=0,
    arch="gpt2",
    logging_steps=100,
    model=None,
    compute_loss_func=None,
    eval_dataset=None,
    trainer_cls=Trainer,
    **args_overrides,
):
    """A stock Trainer (or ``trainer_cls``) on ``ds`` with ``dfx`` attached; ``args_overrides`` go to
    TrainingArguments."""
    args_overrides.setdefault("report_to", [])
    settings = trainer_settings(
        out_dir,
        accum=accum,
        max_steps=max_steps,
        save_steps=save_steps,
        logging_steps=logging_steps,
        workers=workers,
        seed=seed,
    )
    args = TrainingArguments(**(settings | args_overrides))
    model = model if model is not None else tiny_model(arch, seed)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=collate_causal,
        callbacks=[dfx, *extra],
        compute_loss_func=compute_loss_func,
        eval_dataset=eval_dataset,
    )
    if hasattr(dfx, "attach"):
        dfx.attach(trainer)
    return trainer


def params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@torch.no_grad()
def single_example_loss(model, example) -> float:
    batch = collate_causal([example])
    return float(model(**batch).loss)


SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


def comparable_log(log_history: list[dict], ignore: tuple[str, ...] = ()) -> list[dict]:
    """Log entries without the end-of-run summary (wall-clock timings; its loss averages only this call)
    and without the ``ignore`` keys."""
    return [
        {k: v for k, v in h.items() if k not in ignore} for h in log_history if not any(k in h for k in SUMMARY_KEYS)
    ]


def assert_trainer_resumes_exactly(
    make_callback,
    ds,
    out,
    *,
    accum=1,
    workers=0,
    steps=12,
    crash_at=8,
    save_steps=4,
    logging_steps=2,
    make_model=None,
    make_loss=None,
    forced_differs=True,
    trainer_factory=None,
    log_keys_not_resumed=(),
    compare=None,
    **factory_kwargs,
):
    """Crash a Trainer run at ``crash_at``, resume it from its checkpoint, and compare with an uninterrupted run.

    ``make_callback(allow_missing_state)`` returns a fresh dataflex callback; ``make_model()`` a fresh
    model (default: make_trainer's), ``make_loss(callback)`` a ``compute_loss_func`` or None. Compared:
    the example ids of every step, the decision history, every logged entry and the final parameters.
    Negative control on the same resume path: without dataflex's state the resume is refused, and
    forced (``allow_missing_state=True``) it differs from the uninterrupted run (or, with
    ``forced_differs=False``, for a decider whose order needs no state, equals it).
    """
    assert crash_at % save_steps == 0, "the crash must follow a checkpoint"

    def run(folder, crash=None, resume=None, allow_missing_state=False):
        cb = make_callback(allow_missing_state)
        rec = StepRecorder(cb)
        extra = [rec] + ([CrashAt(crash)] if crash else [])
        trainer = (trainer_factory or make_trainer)(
            ds,
            cb,
            folder,
            max_steps=steps,
            accum=accum,
            workers=workers,
            save_steps=save_steps,
            extra=extra,
            logging_steps=logging_steps,
            model=make_model() if make_model else None,
            compute_loss_func=make_loss(cb) if make_loss else None,
            **factory_kwargs,
        )
        try:
            trainer.train(resume_from_checkpoint=resume)
        except KeyboardInterrupt:
            pass
        return cb, rec, trainer

    full, full_rec, full_tr = run(out / "full")
    assert full.tracker.updates_per_epoch < steps, "the run should cross an epoch boundary"
    _, head_rec, _ = run(out / "crash", crash=crash_at)
    assert max(head_rec.ids) == crash_at
    ckpt = out / "crash" / f"checkpoint-{crash_at}"
    resumed, tail_rec, resumed_tr = run(out / "crash", resume=str(ckpt))
    assert {**head_rec.ids, **tail_rec.ids} == full_rec.ids, "example ids per step differ after resuming"
    assert resumed.history == full.history, "decision history differs after resuming"
    ignore = tuple(log_keys_not_resumed)
    assert comparable_log(resumed_tr.state.log_history, ignore) == comparable_log(full_tr.state.log_history, ignore)
    p_full, p_res = params(full_tr.model), params(resumed_tr.model)
    assert all(np.array_equal(p_full[k], p_res[k]) for k in p_full), "parameters differ after resuming"
    if compare is not None:  # what else the caller needs equal: compare(uninterrupted, resumed callback)
        compare(full, resumed)

    shutil.rmtree(ckpt / "dataflex")
    with pytest.raises(FileNotFoundError, match="no dataflex state"):
        run(out / "crash", resume=str(ckpt))
    with pytest.warns(UserWarning, match="starting afresh"):
        forced, forced_rec, _ = run(out / "crash", resume=str(ckpt), allow_missing_state=True)
    differs = {**head_rec.ids, **forced_rec.ids} != full_rec.ids or forced.history != full.history
    assert differs == forced_differs
    return full, full_rec


def finish_distributed() -> None:
    """End a torchrun worker (its last call): a process that exits with its gloo process group alive now and
    then aborts in C++ teardown ("terminate called without an active exception"), failing the job spuriously.
    Barrier and destroy the group, then leave without running C++ static destructors, where the abort still
    came now and then on a loaded machine (every result file is written and closed by then)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
