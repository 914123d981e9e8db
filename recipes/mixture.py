"""Recipe: train a tiny GPT from scratch on a domain mixture chosen by a policy, in a plain PyTorch loop.

Single process, several processes, or a Hydra sweep (configs/ composes model x data x policy)::

    python recipes/mixture.py policy=odm seed=1
    accelerate launch --multi_gpu --num_processes 2 recipes/mixture.py policy=doremi_online steps=200

(On a machine without GPUs, ``--multi_gpu`` still starts two processes through torchrun and the
Accelerator falls back to gloo on CPU; accelerate's ``--cpu --num_processes 2`` needs MPI.)
    python -m dataflex.recipes.mixture -m policy=uniform,natural,odm,ado,doremi,doremi_online seed=0,1,2

Each run checkpoints every ``ckpt_every`` steps into ``ckpt_dir`` (default: ``ckpt/`` in its Hydra output
folder); rerunning the same command after a kill continues exactly from the newest complete checkpoint.
Each run writes ``results.json`` (per-domain validation loss, the weight history, timings) into its
Hydra output folder; a multirun ends with its summary (:mod:`dataflex.sweep`; also
``python -m dataflex.sweep <sweep folder>`` at any time).
The loop is :func:`dataflex.proxies.loop.train_mixture`: the DomainMixtureSampler feeds an
``accelerate``-prepared DataLoader, per-example losses are recorded from the training logits, and the
policy updates the schedule every ``update_every`` steps. DoReMi policies first run (or reuse) their
reference/proxy stages under ``work_dir``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.accelerator import own_accelerator
from dataflex.domains import encode_domains
from dataflex.policies.base import NeedsPreparation
from dataflex.proxies.loop import train_mixture
from dataflex.recipes.settings import (
    check_model_fits,
    nonnegative_int,
    optional_positive_int,
    positive_int,
    positive_number,
    seed_value,
)
from dataflex.state import write_text_atomic
from dataflex.testbeds.tiny import (
    VOCAB_SIZE,
    check_evaluation_split,
    collate_causal,
    default_data_dir,
    per_domain_loss,
    text_split,
)

# Settings that do not change a run's result: left out of its folder name (configs/*.yaml, hydra exclude_keys)
# and of the settings its folder records (dataflex.run_folder); a test keeps the two lists equal.
SAME_RESULT = ("ckpt_every", "ckpt_dir", "work_dir")


def load_split(root: Path, split: str, max_len: int, per_domain: int | None = None) -> Any:
    return text_split(root / split, max_len, per_domain)


def run_experiment(
    *,
    policy: Any,
    make_model: Any,
    data_root: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    update_every: int,
    eval_every: int,
    max_len: int,
    val_per_domain: int | None,
    work_dir: Path,
    eval_splits: tuple[str, ...] = ("validation",),
    curve_per_domain: int | None = 50,
    curve_by_domain: bool = False,
    accelerator: Any = None,
    train_ds: Any = None,
    train_per_domain: int | None = None,
    progress: bool = True,
    ckpt_dir: Path | None = None,
    ckpt_every: int = 0,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train one model with ``policy`` and evaluate it; returns a JSON-safe result dict.

    With ``ckpt_dir`` and ``ckpt_every``, checkpoints go there and a repeated call continues from the newest
    one; ``stop_after`` ends training early after that many steps (as a pre-emption would), leaving the
    checkpoint to continue from. Every ``eval_every`` steps the validation loss on ``curve_per_domain``
    examples per domain is added to the curve (its mean; per domain too with ``curve_by_domain``).
    """
    for key, value in (("steps", steps), ("batch_size", batch_size), ("update_every", update_every)):
        positive_int(key, value)
    nonnegative_int("eval_every", eval_every)
    nonnegative_int("ckpt_every", ckpt_every)
    positive_number("lr", lr)
    seed_value("seed", seed)
    positive_int("data.max_len", max_len)
    optional_positive_int("data.val_per_domain", val_per_domain)
    optional_positive_int("data.train_per_domain", train_per_domain)
    optional_positive_int("stop_after", stop_after)
    check_model_fits(make_model(), max_len=max_len, vocab_needed=VOCAB_SIZE)
    accelerator = accelerator or own_accelerator("run_experiment")
    train_ds = train_ds if train_ds is not None else load_split(data_root, "train", max_len, train_per_domain)
    domain_ids, names = encode_domains(train_ds["domain"])
    loop_kwargs = dict(
        collate=collate_causal,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        update_every=update_every,
        accelerator=accelerator,
        progress=progress,
    )
    prepare_seconds = 0.0
    if isinstance(policy, NeedsPreparation):
        start = time.perf_counter()
        policy.prepare(make_model, train_ds, domain_ids, names, work_dir, loop_kwargs)
        prepare_seconds = time.perf_counter() - start
    curve_ds = load_split(data_root, "validation", max_len, curve_per_domain)
    # Evaluation splits are read and checked before training, so a split that cannot be scored stops the run
    # at its start, not after it.
    evaluated = {split: load_split(data_root, split, max_len, val_per_domain) for split in eval_splits}
    for split, ds in {"validation": curve_ds, **evaluated}.items():
        check_evaluation_split(train_ds, ds, split)

    def curve_eval(model: torch.nn.Module) -> dict[str, float]:
        losses = per_domain_loss(model, curve_ds, curve_ds["domain"])
        mean = {"mean": float(np.mean(list(losses.values())))}
        return {**mean, "by_domain": losses} if curve_by_domain else mean

    torch.manual_seed(seed)
    model = make_model()
    result = train_mixture(
        model,
        train_ds,
        domain_ids,
        names,
        policy,
        eval_fn=curve_eval,
        eval_every=eval_every,
        desc=type(policy).__name__,
        ckpt_dir=ckpt_dir,
        ckpt_every=ckpt_every,
        stop_after=stop_after,
        **loop_kwargs,
    )
    model = accelerator.unwrap_model(model)
    out: dict[str, Any] = {
        "policy": type(policy).__name__,
        "seed": seed,
        "steps": steps,
        "domain_names": names,
        "train_seconds": result.seconds,
        "prepare_seconds": prepare_seconds,
        "proxy_seconds": float(getattr(policy, "proxy_seconds", 0.0)),
        "history": result.history,
        "curve": result.curve,
    }
    for split, ds in evaluated.items():
        out[f"{split}_loss"] = per_domain_loss(model, ds, ds["domain"])
    return out


def write_run_result(out_dir: Path, result: dict[str, Any]) -> None:
    """``results.json`` in the run folder (rank 0; every rank holds the same result) and a one-line summary."""
    if int(os.environ.get("RANK", "0")) == 0:
        write_text_atomic(out_dir / "results.json", json.dumps(result, indent=1))
    val = result["validation_loss"]
    print(
        f"{result['policy']} seed {result['seed']}: mean val loss {np.mean(list(val.values())):.4f}, "
        f"worst {max(val.values()):.4f} ({max(val, key=val.get)})"
    )


def _hydra_main() -> None:
    import hydra
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    from dataflex.recipes.settings import register_folder_resolver

    register_folder_resolver()  # the config names the run's folder through it

    @hydra.main(config_path="../configs", config_name="mixture", version_base=None)
    def main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from dataflex.run_folder import claim_run_folder, config_settings, settings_digest

        policy = instantiate(cfg.policy)
        model_cfg = cfg.model

        def make_model() -> torch.nn.Module:
            return instantiate(model_cfg, seed=cfg.seed)

        root = Path(cfg.data.path) if cfg.data.path else default_data_dir() / "textmix"
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        settings = config_settings(cfg, ignore=SAME_RESULT)
        for folder in {out_dir, *([Path(cfg.ckpt_dir)] if cfg.ckpt_dir else [])}:
            claim_run_folder(folder, settings)
        result = run_experiment(
            policy=policy,
            make_model=make_model,
            data_root=root,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            update_every=cfg.update_every,
            eval_every=cfg.eval_every,
            max_len=cfg.data.max_len,
            val_per_domain=cfg.data.val_per_domain,
            # DoReMi's stages, named by every setting (their folders also refuse other settings on their own)
            work_dir=Path(cfg.work_dir) / f"seed{cfg.seed}" / settings_digest(settings),
            train_per_domain=cfg.data.train_per_domain,
            ckpt_dir=Path(cfg.ckpt_dir) if cfg.ckpt_dir else out_dir / "ckpt",
            ckpt_every=cfg.ckpt_every,
        )
        write_run_result(out_dir, result)

    main()


if __name__ == "__main__":
    _hydra_main()
