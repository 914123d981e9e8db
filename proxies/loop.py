"""A plain, resumable PyTorch training loop driven by a domain-mixture sampler (no HF Trainer).

Used for the reference and proxy stages of DoReMi and by ``recipes/mixture.py`` for main runs. It is
``accelerate``-aware: ``accelerator.prepare`` shards the DataLoader (ranks take consecutive batches)
and per-domain statistics are gathered across ranks before the policy sees them, so the recipe runs
unchanged under ``accelerate launch --cpu --num_processes 2``.

Checkpoints (every ``ckpt_every`` steps, and at the end) hold the model, optimizer, sampler, policy,
score store and objective state, each in its own ``ckpt_dir/step-<N>/`` folder that appears complete or
not at all (:func:`dataflex.checkpoint.save_step`; the two newest are kept); a run restarted with the
same arguments continues exactly where the newest checkpoint left off. Here the loop owns the sampler
position (unlike the HF path, nothing else fast-forwards the DataLoader).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dataflex import dist
from dataflex.accelerator import changed_numerics, own_accelerator
from dataflex.batching import inspect_loader, rank_position_batches
from dataflex.cadence import start_policy
from dataflex.checkpoint import latest_step, load_state, save_step
from dataflex.losses import check_causal_lm, per_example_token_loss
from dataflex.policies.base import BatchObserver, MixingPolicy
from dataflex.run_folder import claim_run_folder, constructor_settings, weights_summary
from dataflex.samplers.mixture import DomainMixtureSampler
from dataflex.schedule import WeightSchedule
from dataflex.state import DatasetFingerprint, TensorStateful, token_digest
from dataflex.store import ScoreStore

__all__ = ["LOOP_STATE", "LoopResult", "MeanTokenLoss", "Objective", "cosine_lr", "train_mixture"]

LOOP_STATE = "loop_state"  # loop_state.json + loop_state.pt (see dataflex.checkpoint)


class Objective(Protocol):
    """Computes the training loss of a micro-batch; may keep state (e.g. DoReMi's alpha)."""

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ids: np.ndarray, row_domain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MeanTokenLoss:
    """The usual causal-LM objective: token-mean cross-entropy of the batch."""

    def __call__(self, model, batch, ids, row_domain):
        out = model(**batch)
        return out.loss, out.logits

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@dataclass
class LoopResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # scheduled mixtures
    curve: list[dict[str, Any]] = field(default_factory=list)  # evaluations during training
    seconds: float = 0.0
    steps: int = 0
    optimizer: Any = field(default=None, repr=False)  # the live optimizer (LESS reads its Adam moments); not saved


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_mixture(
    model: torch.nn.Module,
    train_ds: Any,
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    policy: MixingPolicy,
    *,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    update_every: int = 10,
    accelerator: Any = None,
    objective: Objective | None = None,
    ckpt_dir: str | os.PathLike[str] | None = None,
    ckpt_every: int = 0,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    desc: str = "train",
    progress: bool = True,
    stop_after: int | None = None,
) -> LoopResult:
    """Train ``model`` for ``steps`` optimizer steps on batches mixed by ``policy``.

    ``domain_ids`` gives each example's domain (0..K-1, in ``domain_names`` order); ``collate`` turns a
    list of examples into a batch with ``input_ids``, ``attention_mask`` and ``labels``. With an
    ``accelerator`` the model, optimizer and DataLoader are prepared by it; ``batch_size`` is per rank.
    ``stop_after`` ends this call after that many total steps (a simulated pre-emption; the schedule
    is still that of a ``steps``-long run, and a later call with the same ``ckpt_dir`` continues).
    """
    check_causal_lm(model)  # every per-example loss here shifts the labels by one
    accelerator = accelerator or own_accelerator("train_mixture")
    objective = objective or MeanTokenLoss()
    k = len(domain_names)
    sizes = np.bincount(domain_ids, minlength=k)
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None:  # a ckpt_dir continues only the run that wrote it (before binding: the policy as given)
        settings = _run_settings(
            model, train_ds, domain_ids, domain_names, policy, objective, collate, steps, batch_size, lr
        )
        settings = {**settings, "seed": seed, "update_every": update_every, **changed_numerics(accelerator)}
        claim_run_folder(ckpt, settings, hint=CKPT_HINT)
    start_policy(policy, domain_names, sizes, steps=steps, update_every=update_every)  # decides at done % update_every
    schedule = WeightSchedule(domain_names, policy.initial_weights())
    world = accelerator.num_processes
    global_batch = batch_size * world
    num_samples = (len(train_ds) // global_batch) * global_batch
    if num_samples == 0:
        raise ValueError(
            f"the training set ({len(train_ds)} examples) is smaller than one global batch ({global_batch})"
        )
    sampler = DomainMixtureSampler(domain_ids, schedule, seed=seed, num_samples=num_samples)
    loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    layout = inspect_loader(loader)
    positions = rank_position_batches(num_samples, layout)
    steps_per_epoch = len(positions)
    store = ScoreStore(domain_ids, k)
    result = LoopResult(history=[{"step": 0, "effective_at": 0, "weights": schedule.current.tolist()}])
    lookahead = 3 * global_batch  # DataLoaderShard prefetches one batch; no workers here
    parts = _Parts(
        accelerator,
        model,
        optimizer,
        scheduler,
        sampler,
        policy,
        store,
        objective,
        result,
        steps_per_epoch,
        global_batch,
    )
    start = 0
    resume_from = latest_step(ckpt, LOOP_STATE) if ckpt is not None else None
    if resume_from is not None:
        start = _load(resume_from, parts)
    unwrapped = accelerator.unwrap_model(model)
    domain_t = torch.as_tensor(domain_ids)
    t0 = time.perf_counter() - result.seconds
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False, disable=not progress or accelerator.process_index)

    def epoch_iterator(epoch: int):
        # accelerate re-applies its own epoch counter on iter(); keep it equal to ours.
        loader.set_epoch(epoch)
        return iter(loader)

    observe = policy.observe if isinstance(policy, BatchObserver) else None  # online DoReMi's proxy step
    # A resumed sampler starts mid-epoch, at a whole number of global batches, so batch k of the epoch
    # still holds positions[k]: the positions never need an offset.
    iterator = epoch_iterator(start // steps_per_epoch)
    for step in range(start, min(steps, stop_after or steps)):
        epoch, k_in_epoch = divmod(step, steps_per_epoch)
        if k_in_epoch == 0 and step > start:
            iterator = epoch_iterator(epoch)
        batch = next(iterator)
        ids = sampler.ids_at(epoch, positions[k_in_epoch])
        row_domain = domain_t[ids].to(batch["input_ids"].device)
        model.train()
        loss, logits = objective(model, batch, ids, row_domain)
        ex_loss, _ = per_example_token_loss(logits.detach(), batch["labels"])
        store.add(ids, ex_loss, (batch["labels"][:, 1:] != -100).any(1))
        if observe is not None:
            observe(batch, row_domain)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done % update_every == 0 and done < steps:
            stats = store.flush(done)
            weights = np.asarray(policy.update(stats, schedule.current), dtype=np.float64)
            effective_at = done * global_batch + lookahead
            schedule.add(effective_at, weights)
            result.history.append({"step": done, "effective_at": effective_at, "weights": weights.tolist()})
        if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
            result.curve.append({"step": done, **eval_fn(unwrapped)})
        bar.update(1)
        if ckpt is not None and ckpt_every and (done % ckpt_every == 0 or done in (steps, stop_after)):
            result.seconds, result.steps = time.perf_counter() - t0, done
            _save(ckpt, parts, done)
    bar.close()
    result.seconds, result.steps = time.perf_counter() - t0, min(steps, stop_after or steps)
    result.optimizer = optimizer
    return result


@dataclass
class _Parts:
    """Everything a checkpoint holds, bundled so saving and loading name each part once."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: DomainMixtureSampler
    policy: Any
    store: ScoreStore
    objective: Any
    result: LoopResult
    steps_per_epoch: int
    global_batch: int


CKPT_HINT = "give this run another ckpt_dir"


def _run_settings(model, train_ds, domain_ids, domain_names, policy, objective, collate, steps, batch_size, lr) -> dict:
    """What a run's checkpoints belong to (:func:`dataflex.run_folder.claim_run_folder`): another policy, knob,
    objective, data labelling, initial model or schedule in the same ``ckpt_dir`` would otherwise continue this
    run's checkpoints as its own."""
    return {
        "policy": {"class": type(policy).__qualname__, **constructor_settings(policy)},
        "objective": {"class": type(objective).__qualname__, **constructor_settings(objective)},
        "data": {
            **DatasetFingerprint.from_labels(domain_ids, list(domain_names)).to_json(),
            "tokens": token_digest(train_ds),  # the labels say which domains; the text can change under them
        },
        "model": {"class": type(model).__qualname__, "initial_weights": weights_summary(model)},
        "collate": getattr(collate, "__qualname__", type(collate).__qualname__),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
    }


def _save(ckpt: Path, parts: _Parts, step: int) -> None:
    store_state = parts.store.state_dict()  # collective: every rank calls it
    if parts.accelerator.is_main_process:
        tensors = {
            "model": parts.accelerator.unwrap_model(parts.model).state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if isinstance(parts.policy, TensorStateful):
            tensors["policy"] = parts.policy.tensor_state_dict()
        # The loop consumes whole global batches, so the sampler position follows from the step.
        sampler_state = {
            **parts.sampler.state_dict(),
            "epoch": step // parts.steps_per_epoch,
            "position": (step % parts.steps_per_epoch) * parts.global_batch,
        }
        state = {
            "step": step,
            "world_size": parts.accelerator.num_processes,
            "global_batch": parts.global_batch,
            "sampler": sampler_state,
            "policy": parts.policy.state_dict(),
            "store": store_state,
            "objective": parts.objective.state_dict(),
            "history": parts.result.history,
            "curve": parts.result.curve,
            "seconds": parts.result.seconds,
        }
        save_step(ckpt, step, LOOP_STATE, state, tensors)
    dist.barrier()


def _load(ckpt: Path, parts: _Parts) -> int:
    state, tensors = load_state(ckpt, LOOP_STATE)
    saved = (state.get("world_size", parts.accelerator.num_processes), state.get("global_batch", parts.global_batch))
    if saved != (parts.accelerator.num_processes, parts.global_batch):
        raise ValueError(
            f"{ckpt} was written by {saved[0]} process(es) with a global batch of {saved[1]}, but this run has "
            f"{parts.accelerator.num_processes} process(es) and a global batch of {parts.global_batch}: the steps "
            "would map to other samples; resume with the same number of processes and batch size"
        )
    parts.accelerator.unwrap_model(parts.model).load_state_dict(tensors["model"])
    parts.optimizer.load_state_dict(tensors["optimizer"])
    parts.scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["torch_rng"])
    if isinstance(parts.policy, TensorStateful):
        parts.policy.load_tensor_state_dict(tensors["policy"])
    parts.sampler.load_state_dict(state["sampler"], restore_position=True)
    parts.policy.load_state_dict(state["policy"])
    parts.store.load_state_dict(state["store"])
    parts.objective.load_state_dict(state["objective"])
    parts.result.history = state["history"]
    parts.result.curve = state["curve"]
    parts.result.seconds = state["seconds"]
    return int(state["step"])
