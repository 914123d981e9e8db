"""Recipe: offline selection (the LESS workflow) — warm up, score a pool once, write the chosen subset.

    python -m dataflex.recipes.select_offline target=data/instruct/validation/gsm8k.jsonl method=less fraction=0.05
    python -m dataflex.recipes.select_offline checkpoint=my_run/checkpoint-80 target=... method=tracin

``checkpoint`` is a Hugging Face Trainer checkpoint of a short LoRA warm-up run: the peft adapter, and
``optimizer.pt`` whose Adam moments precondition LESS features (Xia et al., arXiv 2402.04333). Without one,
the recipe runs LESS's warm-up itself first (:func:`lora_warmup`: LoRA on a random 5 % of the pool for 4
epochs with a stock Trainer) in a folder under ``work_dir`` named by its settings, and reuses or resumes it on
a rerun. The base model is built from the ``model`` config group (optionally with ``base_weights``); a
checkpoint this recipe warmed up is refused on another base. Every pool example is scored once in
length-sorted batches (``cache`` keeps partial scores across a crash), the top ``fraction`` is kept and
written with the pool's fingerprint; train on it with ``dataflex.offline.read_subset``.

Methods: ``less`` (Adam-preconditioned gradient cosine with the target's mean plain gradient),
``tracin`` (raw gradients, arXiv 2002.08484), ``loss_hard`` / ``loss_easy`` (current loss), ``random``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.domains import encode_domains
from dataflex.offline import score_pool, target_direction, token_mean_losses, write_subset
from dataflex.recipes.settings import check_model_fits, check_select_offline_settings
from dataflex.run_folder import RUN_SETTINGS, claim_run_folder, describe_differences, settings_digest, weights_summary
from dataflex.selection import select_by_loss, select_random, select_top
from dataflex.state import DatasetFingerprint, read_json, token_digest
from dataflex.testbeds.tiny import (
    INSTRUCTION_FIELDS,
    VOCAB_SIZE,
    collate_causal,
    instruct_dataset,
    load_jsonl,
    load_jsonl_dir,
)

METHODS = ("less", "tracin", "loss_hard", "loss_easy", "random")


def load_lora_checkpoint(base: torch.nn.Module, checkpoint: str | os.PathLike[str]) -> torch.nn.Module:
    """The peft adapter saved in a Trainer checkpoint, on top of ``base``, trainable."""
    from peft import PeftModel

    ckpt = Path(checkpoint)
    if not (ckpt / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds no peft adapter (adapter_config.json); save a LoRA Trainer run there")
    return PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)


WARMUP_SEED = 10_000  # the warm-up share is drawn from another stream than method=random's subset


def lora_warmup(
    make_base: Callable[[], torch.nn.Module],
    pool: Any,
    work_dir: str | os.PathLike[str],
    *,
    fraction: float,
    epochs: int,
    batch_size: int,
    lr: float,
    save_steps: int,
    lora_r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    seed: int,
) -> Path:
    """LESS's warm-up (Xia et al., arXiv 2402.04333): LoRA trained with a stock ``Trainer`` (AdamW) on a
    random ``fraction`` of ``pool`` for ``epochs``; returns its final checkpoint (adapter + ``optimizer.pt``).

    It runs in ``work_dir/warmup-<digest of its settings>``, which records those settings (the base model's
    weights among them): a rerun returns the finished checkpoint or resumes from the newest complete one, and
    other settings get their own folder.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from dataflex.hf.checkpoint import RecordTrainerFiles, last_complete_checkpoint

    base = make_base()
    labels = pool["task"] if "task" in pool.column_names else ["pool"] * len(pool)
    ids = select_random(len(pool), fraction, seed=WARMUP_SEED + seed)
    steps = math.ceil(epochs * len(ids) / batch_size)
    settings = {
        "base": base_settings(base),
        "pool": DatasetFingerprint.from_labels(*encode_domains(labels)).to_json(),
        "tokens": token_digest(pool),
        "fraction": fraction,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "lora": {"r": lora_r, "alpha": lora_alpha, "target_modules": list(target_modules)},
    }  # (save_steps is left out: it changes where a killed run resumes from, not what it ends with)
    folder = Path(work_dir) / f"warmup-{settings_digest(settings)}"
    claim_run_folder(folder, settings, hint="give the warm-up another work_dir")
    final = folder / f"checkpoint-{steps}"
    resume = last_complete_checkpoint(folder, require_dataflex=False)
    if resume is not None and Path(resume) == final:
        return final
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0)
    model = get_peft_model(base, config)
    args = TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        save_steps=save_steps,
        learning_rate=lr,
        seed=seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        logging_steps=max(1, steps // 10),
    )
    subset = pool.select(ids.tolist()).select_columns(["input_ids", "prompt_len"])
    # Its checkpoints record their files' sums: LESS reads optimizer.pt, which has no checksum of its own.
    trainer = Trainer(
        model=model, args=args, train_dataset=subset, data_collator=collate_causal, callbacks=[RecordTrainerFiles()]
    )
    trainer.train(resume_from_checkpoint=resume)  # the Trainer saves the last step too (save_strategy="steps")
    return final


def base_settings(base: torch.nn.Module) -> dict[str, Any]:
    """What a LoRA adapter was trained on top of: the base model's class and a summary of its weights."""
    return {"class": type(base).__qualname__, "weights": weights_summary(base)}


def check_warmup_base(checkpoint: str | os.PathLike[str], base: torch.nn.Module) -> None:
    """Refuse an adapter this recipe warmed up (its folder records the base) on top of another base model: the
    adapter's gradients and losses would be those of a model that was never trained."""
    recorded = Path(checkpoint).parent / RUN_SETTINGS
    if not recorded.is_file():
        return  # a checkpoint from elsewhere: its base is not known
    recorded_settings = read_json(recorded)
    saved = recorded_settings.get("base") if isinstance(recorded_settings, dict) else None
    if saved is not None and saved != base_settings(base):
        raise ValueError(
            f"{checkpoint} was warmed up on another base model ({describe_differences(saved, base_settings(base))}):"
            " build the base as the warm-up did (the same model settings, seed and base_weights)"
        )


def load_trainer_optimizer(model: torch.nn.Module, checkpoint: str | os.PathLike[str]) -> torch.optim.Optimizer:
    """Rebuild the Trainer's optimizer for ``model`` (same parameter groups) and load ``optimizer.pt``."""
    from transformers import Trainer, TrainingArguments

    from dataflex.hf.checkpoint import verify_checkpoint_files

    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: LESS needs the warm-up run's Adam state (use method=tracin)")
    verify_checkpoint_files(str(checkpoint))  # a changed byte would load as another Adam moment
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=not torch.cuda.is_available())
        optimizer = Trainer(model=model, args=args).create_optimizer()
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return optimizer


def select_offline(
    model: torch.nn.Module,
    pool: Any,
    target: Any,
    *,
    method: str,
    fraction: float,
    out: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    dim: int = 1024,
    seed: int = 0,
    batch_size: int = 32,
    cache: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Score ``pool`` once with ``method``, keep the top ``fraction``, write it to ``out``; returns the ids."""
    from dataflex.grads import lora_linears
    from dataflex.influence import GradientFeaturizer

    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid values are {', '.join(METHODS)}")
    scores: np.ndarray | None = None
    cached = {  # what the pool's scores depend on: a cache made from another checkpoint or method is refused
        "method": method,
        "dim": dim if method in ("less", "tracin") else None,
        "seed": seed if method in ("less", "tracin") else None,
        "weights": weights_summary(model),
    }
    if method in ("less", "tracin"):
        layers = lora_linears(model)
        featurizer = GradientFeaturizer(model, layers, dim=dim, seed=seed, mode=method, optimizer=optimizer)
        plain = GradientFeaturizer(model, layers, projector=featurizer.projector)  # LESS: plain target gradients
        direction = target_direction(
            score_pool(plain.features, target, collate_causal, batch_size=batch_size, desc="target features")
        )
        feats = score_pool(
            featurizer.features,
            pool,
            collate_causal,
            batch_size=batch_size,
            cache=cache,
            desc=f"{method} features",
            settings=cached,
        )
        scores = feats @ direction.astype(np.float32)
        ids = select_top(scores, fraction)
    elif method.startswith("loss_"):
        scores = score_pool(
            token_mean_losses(model),
            pool,
            collate_causal,
            batch_size=batch_size,
            cache=cache,
            desc="losses",
            settings=cached,
        )
        ids = select_by_loss(scores, fraction, method.removeprefix("loss_"))
    else:
        ids = select_random(len(pool), fraction, seed)
    labels = pool["task"] if "task" in pool.column_names else ["pool"] * len(pool)
    dom, names = encode_domains(labels)
    write_subset(
        out,
        ids,
        pool=DatasetFingerprint.from_labels(dom, names),
        method=method,
        fraction=fraction,
        scores=scores,
        extra={"seed": seed, "dim": dim},
        tokens=token_digest(pool),
    )
    return ids


def _hydra_main() -> None:
    import hydra
    from hydra.utils import instantiate, to_absolute_path
    from omegaconf import DictConfig

    from dataflex.testbeds.tiny import default_data_dir

    @hydra.main(config_path="../configs", config_name="select_offline", version_base=None)
    def main(cfg: DictConfig) -> None:
        path = lambda p: to_absolute_path(p) if p else None  # noqa: E731  (relative to where it was launched)
        check_select_offline_settings(cfg, METHODS, resolve=path)

        def make_base() -> torch.nn.Module:
            base = instantiate(cfg.model, seed=cfg.seed)
            check_model_fits(base, max_len=cfg.max_len, vocab_needed=VOCAB_SIZE, len_key="max_len")
            if cfg.base_weights:
                base.load_state_dict(torch.load(path(cfg.base_weights), map_location="cpu", weights_only=True))
            return base

        base = make_base()
        pool_dir = Path(path(cfg.pool)) if cfg.pool else default_data_dir() / "instruct" / "train"
        pool = instruct_dataset(load_jsonl_dir(pool_dir, require=INSTRUCTION_FIELDS), cfg.max_len)
        checkpoint = path(cfg.checkpoint)
        if checkpoint is None:
            warm = cfg.warmup
            checkpoint = lora_warmup(
                make_base,
                pool,
                path(cfg.work_dir),
                **{k: warm[k] for k in ("fraction", "epochs", "batch_size", "lr", "save_steps", "lora_r")},
                lora_alpha=warm.lora_alpha,
                target_modules=list(warm.target_modules),
                seed=cfg.seed,
            )
            print(f"warm-up checkpoint: {checkpoint}")
        check_warmup_base(checkpoint, base)
        model = load_lora_checkpoint(base, checkpoint)
        optimizer = load_trainer_optimizer(model, checkpoint) if cfg.method == "less" else None
        target = instruct_dataset(load_jsonl(path(cfg.target), require=INSTRUCTION_FIELDS), cfg.max_len)
        ids = select_offline(
            model,
            pool,
            target,
            method=cfg.method,
            fraction=cfg.fraction,
            out=path(cfg.out),
            optimizer=optimizer,
            dim=cfg.dim,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            cache=path(cfg.cache),
        )
        tasks = np.asarray(pool["task"])[ids]
        print(f"selected {len(ids)} of {len(pool)} examples -> {path(cfg.out)}")
        for task in sorted(set(tasks.tolist())):
            print(f"  {task}: {(tasks == task).sum()}")

    main()


if __name__ == "__main__":
    _hydra_main()
