"""Recipe: a stock ``transformers.Trainer`` with :class:`~dataflex.DataFlexCallback` on the bundled text domains.

    python -m dataflex.recipes.trainer policy=odm seed=1
    python -m dataflex.recipes.trainer -m policy=uniform,natural,odm seed=0,1,2      # a sweep

A tiny byte-level GPT-2 built from config trains on the 8 textmix domains (``configs/trainer.yaml``)
while the policy mixes them; checkpoints go to the Hydra run folder every ``save_steps`` and rerunning
the same command resumes from the newest complete one (model, optimizer, sampler, policy; see
:func:`dataflex.hf.last_complete_checkpoint`). ``results.json``
there holds the per-domain validation loss and the weight history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dataflex.hf.callbacks import DataFlexCallback
from dataflex.hf.checkpoint import last_complete_checkpoint
from dataflex.recipes import settings
from dataflex.recipes.mixture import write_run_result
from dataflex.testbeds.tiny import (
    VOCAB_SIZE,
    check_evaluation_split,
    collate_causal,
    default_data_dir,
    per_domain_loss,
    text_split,
)

__all__ = ["train_with_callback"]

# Settings that do not change a run's result: left out of its folder name (configs/*.yaml, hydra exclude_keys)
# and of the settings its folder records (dataflex.run_folder); a test keeps the two lists equal.
SAME_RESULT = ("save_steps", "logging_steps", "report_to")


@contextlib.contextmanager
def wandb_run_of_this_job(report_to: list[str], out_dir: Path) -> Iterator[None]:
    """With ``report_to`` naming wandb: one wandb run per job, logged offline into the job's folder.

    Without a key wandb stops the run asking for one (or uploads when it has one), so the run logs offline into
    ``out_dir`` unless ``WANDB_MODE`` / ``WANDB_DIR`` were set before (``wandb sync`` uploads it later). The
    Trainer's wandb reporter does not end its run at train end and joins a run already open, and wandb keeps
    its settings for the process: the jobs of a Hydra multirun, which run one after another in one process,
    all logged into the first job's run and folder. So the run is ended, wandb reset and the variables set
    here removed when the job ends.
    """
    if "wandb" not in report_to:
        yield
        return
    import wandb

    ours = {
        name: value
        for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(out_dir)))
        if name not in os.environ
    }
    os.environ.update(ours)
    try:
        yield
    except BaseException:
        wandb.finish(exit_code=1)  # recorded as failed (a resume of the job starts a run of its own)
        raise
    else:
        wandb.finish()
    finally:
        wandb.teardown()
        for name in ours:
            os.environ.pop(name, None)


class LogAtCheckpoints(TrainerCallback):
    """Log the training loss at every checkpoint step too: the steps since the last log are then in a log that
    the checkpoint keeps, and :func:`whole_run_train_loss` can add them back after a resume whatever the
    ``save_steps`` and ``logging_steps`` (without it, a ``save_steps`` that is not a multiple of ``logging_steps``
    left the steps between the last log and the checkpoint out of the resumed run's mean)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # (set by the Trainer's own flow callback, which runs first)
            control.should_log = True


def whole_run_train_loss(log_history: list[dict[str, Any]], steps_of_this_call: int) -> None:
    """Make the summary's ``train_loss`` the whole run's mean training loss after a resume.

    The Trainer's end-of-training summary averages only the steps of its own ``train()`` call: resumed from a
    checkpoint, the steps since it (and 0.0 when the checkpoint was the run's last, a rerun after a kill between
    the last checkpoint and the results file). The losses logged before the checkpoint (each the mean of the
    steps since the previous log; :class:`LogAtCheckpoints` makes the last of them end at the checkpoint) are
    added back in, so the results equal the uninterrupted run's (to rounding).
    """
    summary = next((entry for entry in reversed(log_history) if "train_loss" in entry), None)
    if summary is None:
        return
    start = summary["step"] - steps_of_this_call
    total, steps, last = summary["train_loss"] * steps_of_this_call, steps_of_this_call, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= start:
            total += entry["loss"] * (entry["step"] - last)
            steps, last = steps + entry["step"] - last, entry["step"]
    summary["train_loss"] = total / max(steps, 1)


def train_with_callback(
    *,
    policy: Any,
    model: torch.nn.Module,
    data_root: Path,
    out_dir: Path,
    seed: int,
    steps: int,
    batch_size: int,
    gradient_accumulation_steps: int,
    lr: float,
    update_every: int,
    warmup_steps: int,
    save_steps: int,
    logging_steps: int,
    max_len: int,
    report_to: str | list[str],
    train_per_domain: int | None = None,
    val_per_domain: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) one run; returns the per-domain validation loss and the mixture history."""
    if hasattr(policy, "prepare") and getattr(policy, "weights_path", None) is None:
        # DoReMi trains a reference (and a proxy) before the main run: the plain-loop mixture recipe does that.
        raise ValueError(
            f"{type(policy).__name__} trains its reference model (and proxy) before the main run, which this Trainer "
            "recipe does not do: run it with the mixture recipe (python -m dataflex.recipes.mixture policy=...)"
            + (
                ", or give policy.weights_path=<the doremi_weights.json that recipe exported>"
                if hasattr(policy, "weights_path")
                else ""
            )
        )
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("update_every", update_every),
        ("save_steps", save_steps),
        ("logging_steps", logging_steps),
        ("data.max_len", max_len),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        settings.positive_int(name, value)
    settings.positive_number("lr", lr)
    settings.seed_value("seed", seed)
    settings.nonnegative_int("warmup_steps", warmup_steps)
    settings.optional_positive_int("data.train_per_domain", train_per_domain)
    settings.optional_positive_int("data.val_per_domain", val_per_domain)
    settings.check_model_fits(model, max_len=max_len, vocab_needed=VOCAB_SIZE)
    train_ds = text_split(data_root / "train", max_len, train_per_domain)
    val_ds = text_split(data_root / "validation", max_len, val_per_domain)
    check_evaluation_split(train_ds, val_ds)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=steps,
        learning_rate=lr,
        save_steps=save_steps,
        logging_steps=logging_steps,
        report_to=report_to if isinstance(report_to, str) else list(report_to),  # ("none", "all" or one name too)
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collate_causal,
        callbacks=[LogAtCheckpoints()],
    )
    dfx = DataFlexCallback(policy, update_every=update_every, warmup_steps=warmup_steps, trainer=trainer)
    resume = last_complete_checkpoint(out_dir)
    with wandb_run_of_this_job(args.report_to, out_dir):  # (the Trainer's list: "all" expanded, "none" empty)
        trainer.train(resume_from_checkpoint=resume)
    if resume is not None:
        resumed_at = int(Path(resume).name.split("-")[-1])  # (a checkpoint-<step> folder)
        whole_run_train_loss(trainer.state.log_history, trainer.state.global_step - resumed_at)
    return {
        "policy": type(policy).__name__,
        "seed": seed,
        "steps": steps,
        "validation_loss": per_domain_loss(trainer.model, val_ds, val_ds["domain"]),
        "history": dfx.history,
        "log_history": trainer.state.log_history,
    }


def reporters(value: Any) -> str | list[str]:
    """``report_to`` from the config as the Trainer takes it: a list (``report_to=[tensorboard,wandb]``) or one
    name, ``all`` or ``none`` as written on a command line (``report_to=tensorboard``); null means none."""
    from collections.abc import Sequence

    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):  # (a ListConfig is a Sequence)
        return list(value)
    raise ValueError(f"report_to must be a reporter name, 'all', 'none' or a list of names; got {value!r}")


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    from dataflex.recipes.settings import register_folder_resolver
    from dataflex.run_folder import claim_run_folder, config_settings

    register_folder_resolver()  # the config names the run's folder through it

    @hydra.main(config_path="../configs", config_name="trainer", version_base=None)
    def main(cfg: DictConfig) -> None:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        root = Path(cfg.data.path) if cfg.data.path else default_data_dir() / "textmix"
        settings.seed_value("seed", cfg.seed)  # the model is built from it before train_with_callback checks the rest
        claim_run_folder(out_dir, config_settings(cfg, ignore=SAME_RESULT))
        result = train_with_callback(
            policy=instantiate(cfg.policy),
            model=instantiate(cfg.model, seed=cfg.seed),
            data_root=root,
            out_dir=out_dir,
            seed=cfg.seed,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            lr=cfg.lr,
            update_every=cfg.update_every,
            warmup_steps=cfg.warmup_steps,
            save_steps=cfg.save_steps,
            logging_steps=cfg.logging_steps,
            max_len=cfg.data.max_len,
            report_to=reporters(cfg.report_to),
            train_per_domain=cfg.data.train_per_domain,
            val_per_domain=cfg.data.val_per_domain,
        )
        write_run_result(out_dir, result)

    main()


if __name__ == "__main__":
    _hydra_main()
