"""Deciders: what the Trainer adapter decides at an update — a domain mixture, a subset, or a curriculum order.

The adapter (:mod:`dataflex.hf.adapter`) owns the Trainer events, batch tracking, loss capture and
checkpoints; a :class:`Decider` owns one kind of decision. It builds the sampler the adapter installs
in the DataLoader, turns the window's statistics into the next schedule value at an update, says
what to log and what to remember, and saves its own state. Three implementations, no shared base:

* :class:`MixingDecider` — a :class:`~dataflex.policies.MixingPolicy` → domain weights
  (:class:`~dataflex.samplers.DomainMixtureSampler`);
* :class:`SelectionDecider` — a :class:`~dataflex.selectors.Selector` → the training subset
  (:class:`~dataflex.samplers.SubsetSampler`);
* :class:`CurriculumDecider` — a :class:`~dataflex.curriculum.Curriculum` → an easiest-first order
  paced over the run (:class:`~dataflex.samplers.CurriculumSampler`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dataflex import dist
from dataflex.cadence import count_decisions, start_policy, warn_no_decision
from dataflex.checks import flag, whole_number
from dataflex.curriculum import Curriculum
from dataflex.policies.base import BatchObserver, MixingPolicy
from dataflex.samplers.base import ScheduledSampler
from dataflex.samplers.curriculum import CurriculumSampler
from dataflex.samplers.mixture import DomainMixtureSampler, ExhaustionMode
from dataflex.samplers.subset import SubsetSampler
from dataflex.schedule import OrderSchedule, SubsetSchedule, WeightSchedule
from dataflex.selectors import FixedSubset, SelectionContext, Selector
from dataflex.state import TensorStateful
from dataflex.store import DomainStats, ScoreStore
from dataflex.weights import entropy

__all__ = ["CurriculumDecider", "Decider", "MixingDecider", "RunContext", "SelectionDecider"]


@dataclass
class RunContext:
    """What a decider may use, fixed for one ``Trainer.train()`` call (built in ``on_train_begin``)."""

    model: torch.nn.Module  # to call between steps: the FSDP wrapper under FSDP1 (adapter.model_to_call)
    dataset: Any  # the DataLoader's dataset: dataset[i] -> features
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer | None
    domain_ids: np.ndarray  # label id of every example
    domain_names: list[str]
    seed: int
    num_samples: int  # samples per epoch
    samples_per_step: int  # global samples per optimizer step
    max_steps: int
    resuming: bool  # the schedule will be replaced by the checkpoint's
    warmup_steps: int = 0  # no decision before this step
    dynamics: Any = None  # dataflex.dynamics.TrainingDynamics when the run keeps one (gathered before decide)


class Decider(Protocol):
    """One kind of decision. ``decide`` runs on every rank with identical inputs and must return identical values."""

    #: Optimizer steps between decisions; None: decide only at the start.
    update_every: int | None
    #: Whether ``observe`` uses the micro-batches (online DoReMi's proxy steps on them).
    observes_batches: bool

    def build_sampler(self, run: RunContext) -> ScheduledSampler: ...

    def decide(self, step: int, stats: DomainStats, store: ScoreStore, run: RunContext) -> tuple[Any, dict[str, float]]:
        """The next schedule value and the metrics to log."""
        ...

    def history_entry(self, sampler: ScheduledSampler) -> dict[str, Any]:
        """What to remember of the schedule's current value (the adapter adds step and effective_at)."""
        ...

    def observe(self, batch: dict[str, torch.Tensor], row_domain: torch.Tensor) -> None:
        """Every training micro-batch (most deciders ignore it)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def tensor_state_dict(self) -> dict[str, Any] | None:
        """Tensors to checkpoint beside the JSON state, or None."""
        ...

    def load_tensor_state_dict(self, state: dict[str, Any] | None) -> None: ...


def _require_methods(obj: Any, methods: tuple[str, ...], kind: str) -> None:
    for method in methods:
        if not callable(getattr(obj, method, None)):
            raise TypeError(f"{obj!r} has no {method}(); expected {kind}")


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_class(saved: dict[str, Any], obj: Any, what: str) -> None:
    """Refuse a checkpoint written by another kind of policy/selector (its state would be misread or ignored)."""
    if saved.get("class") != _class_name(obj):
        raise ValueError(
            f"the checkpoint's {what} is {saved.get('class')!r} but this run uses {_class_name(obj)!r}; "
            f"resume with the same {what} or start a new run"
        )


def _tensor_state(obj: Any) -> dict[str, Any] | None:
    return obj.tensor_state_dict() if isinstance(obj, TensorStateful) else None


def _load_tensor_state(obj: Any, state: dict[str, Any] | None, what: str) -> None:
    if isinstance(obj, TensorStateful):
        if state is None:
            raise FileNotFoundError(f"the checkpoint has no tensor state for the {what} {type(obj).__name__}")
        obj.load_tensor_state_dict(state)


# Fewer than this many examples per domain on average, with at least this many domains, is not a mixture.
FEW_PER_DOMAIN, MANY_DOMAINS = 2.0, 32


def _warn_if_labels_look_like_ids(sizes: np.ndarray) -> None:
    """A label column with (nearly) one value per example — an id, a text, a per-row hash given as the domain
    column — would train "mixing" over thousands of one-example domains without a word; say so."""
    domains, examples = sizes.size, int(sizes.sum())
    if domains >= MANY_DOMAINS and examples < FEW_PER_DOMAIN * domains:
        warnings.warn(
            f"the domain labels have {domains} distinct values for {examples} examples ({examples / domains:.2f} "
            "per domain, most with one example): this looks like a per-example column (an id or the text) "
            "rather than domains; check label_column / domains=",
            stacklevel=3,
        )


class MixingDecider:
    """Domain weights from a mixing policy, for :class:`~dataflex.samplers.DomainMixtureSampler`."""

    def __init__(
        self,
        policy: MixingPolicy,
        *,
        update_every: int,
        replacement: bool = False,
        when_exhausted: ExhaustionMode = "reshuffle",
        stratified: bool = False,
    ) -> None:
        _require_methods(
            policy,
            ("bind", "initial_weights", "update", "state_dict", "load_state_dict"),
            "a mixing policy from dataflex.policies",
        )
        self.policy, self.update_every = policy, update_every
        replacement, stratified = flag("replacement", replacement), flag("stratified", stratified)
        if when_exhausted not in ("reshuffle", "redistribute"):  # checked here too, before training starts
            raise ValueError(f"when_exhausted={when_exhausted!r}; valid values are 'reshuffle', 'redistribute'")
        self.replacement, self.when_exhausted, self.stratified = replacement, when_exhausted, stratified
        self.observes_batches = isinstance(policy, BatchObserver)
        self.sampler: DomainMixtureSampler | None = None

    def build_sampler(self, run: RunContext) -> DomainMixtureSampler:
        sizes = np.bincount(run.domain_ids, minlength=len(run.domain_names))
        _warn_if_labels_look_like_ids(sizes)
        start_policy(
            self.policy,
            run.domain_names,
            sizes,
            steps=run.max_steps,
            update_every=self.update_every,
            warmup_steps=run.warmup_steps,
        )
        schedule = WeightSchedule(run.domain_names, self.policy.initial_weights())
        self.sampler = DomainMixtureSampler(
            run.domain_ids,
            schedule,
            seed=run.seed,
            num_samples=run.num_samples,
            replacement=self.replacement,
            when_exhausted=self.when_exhausted,
            stratified=self.stratified,
        )
        return self.sampler

    def decide(self, step, stats, store, run):
        current = self.sampler.schedule.current
        proposed = np.asarray(self.policy.update(stats, current), dtype=np.float64)
        rejected = not (np.isfinite(proposed).all() and (proposed >= 0).all() and abs(proposed.sum() - 1) < 1e-6)
        if rejected:
            warnings.warn(
                f"{type(self.policy).__name__} returned invalid weights {proposed.tolist()} at step {step}; "
                "keeping the current mixture",
                stacklevel=2,
            )
            proposed = current
        logs = {f"dataflex/weight/{n}": float(w) for n, w in zip(run.domain_names, proposed)}
        logs["dataflex/entropy"] = entropy(proposed)
        logs["dataflex/non_finite"] = float(stats.non_finite)
        logs["dataflex/masked"] = float(stats.masked)
        logs["dataflex/non_finite_total"] = float(store.total_non_finite)
        logs["dataflex/rejected_update"] = float(rejected)
        return proposed, logs

    def history_entry(self, sampler):
        return {"weights": sampler.schedule.current.tolist()}

    def observe(self, batch, row_domain):
        if self.observes_batches:  # online DoReMi: the proxy steps on this very micro-batch
            self.policy.observe(batch, row_domain)

    def state_dict(self):
        return {"class": _class_name(self.policy), "policy": self.policy.state_dict()}

    def load_state_dict(self, state):
        _check_class(state, self.policy, "mixing policy")
        self.policy.load_state_dict(state["policy"])

    def tensor_state_dict(self):
        return _tensor_state(self.policy)

    def load_tensor_state_dict(self, state):
        _load_tensor_state(self.policy, state, "mixing policy")


class SelectionDecider:
    """A subset re-chosen by a selector every ``update_every`` steps, for :class:`~dataflex.samplers.SubsetSampler`."""

    def __init__(self, selector: Selector, *, update_every: int, score_batch_size: int = 32) -> None:
        _require_methods(
            selector,
            ("initial_subset", "select", "state_dict", "load_state_dict"),
            "a selector from dataflex.selectors",
        )
        if score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1; got {score_batch_size!r}")
        self.selector, self.update_every, self.score_batch_size = selector, update_every, int(score_batch_size)
        self.observes_batches = False
        self.needs_dynamics = bool(getattr(selector, "needs_dynamics", False))
        self.positional_input: str | None = getattr(selector, "positional_input", None)

    def build_sampler(self, run: RunContext) -> SubsetSampler:
        if count_decisions(run.max_steps, self.update_every, run.warmup_steps) == 0 and not isinstance(
            self.selector, FixedSubset
        ):
            warn_no_decision(
                f"{type(self.selector).__name__} selection",
                "the whole pool",
                steps=run.max_steps,
                update_every=self.update_every,
                warmup_steps=run.warmup_steps,
            )
        schedule = SubsetSchedule(run.num_samples, self.selector.initial_subset(run.num_samples))
        labels = [run.domain_names[d] for d in run.domain_ids]
        return SubsetSampler(schedule, seed=run.seed, num_samples=run.num_samples, labels=labels)

    def decide(self, step, stats, store, run):
        context = SelectionContext(
            model=run.model,
            dataset=run.dataset,
            collate=run.collate,
            step=step,
            seed=run.seed,
            optimizer=run.optimizer,
            batch_size=self.score_batch_size,
            labels=run.domain_ids,
            dynamics=run.dynamics,
        )
        chosen = self.selector.select(context)
        scores = getattr(self.selector, "last_scores", None)
        if scores is not None:
            store.record_scores(*scores, step=step)
        logs = {
            "dataflex/selected": float(chosen.size),
            "dataflex/non_finite": float(stats.non_finite),
            "dataflex/masked": float(stats.masked),
        }
        if scores is not None:
            logs["dataflex/score_mean_pool"] = float(np.nanmean(scores[1]))
            logs["dataflex/score_mean_selected"] = float(np.nanmean(store.score[chosen]))
        if len(run.domain_names) > 1:  # share of each label in the selection
            shares = np.bincount(run.domain_ids[chosen], minlength=len(run.domain_names)) / chosen.size
            logs.update({f"dataflex/selected_share/{n}": float(x) for n, x in zip(run.domain_names, shares)})
        return chosen, logs

    def history_entry(self, sampler):
        current = sampler.schedule.current
        return {"size": int(current.size), "ids": current.tolist()}

    def observe(self, batch, row_domain):
        return None

    def state_dict(self):
        return {"class": _class_name(self.selector), "selector": self.selector.state_dict()}

    def load_state_dict(self, state):
        _check_class(state, self.selector, "selector")
        self.selector.load_state_dict(state["selector"])

    def tensor_state_dict(self):
        return _tensor_state(self.selector)

    def load_tensor_state_dict(self, state):
        _load_tensor_state(self.selector, state, "selector")


class CurriculumDecider:
    """An easiest-first order opened by the curriculum's pacing, optionally re-ranked every ``rescore_every`` steps."""

    def __init__(self, curriculum: Curriculum, *, horizon_steps: int | None = None, rescore_every: int = 0) -> None:
        _require_methods(curriculum, ("order", "state_dict", "load_state_dict"), "a dataflex.curriculum.Curriculum")
        rescore_every = whole_number("rescore_every", rescore_every)
        if rescore_every and getattr(curriculum, "scorer", None) is None:
            raise ValueError("rescore_every needs a curriculum with a scorer (difficulty= is fixed)")
        if rescore_every < 0:
            raise ValueError(f"rescore_every must be >= 0 (0 = never); got {rescore_every!r}")
        horizon_steps = None if horizon_steps is None else whole_number("horizon_steps", horizon_steps)
        if horizon_steps is not None and horizon_steps <= 0:
            raise ValueError(f"horizon_steps must be positive; got {horizon_steps}")
        self.curriculum, self.horizon_steps = curriculum, horizon_steps
        self.update_every = int(rescore_every) or None
        self.observes_batches = False
        self.positional_input: str | None = getattr(curriculum, "positional_input", None)
        self.sampler: CurriculumSampler | None = None

    def build_sampler(self, run: RunContext) -> CurriculumSampler:
        # When resuming, the checkpoint's orders replace this placeholder (no scoring pass needed).
        order = np.arange(run.num_samples) if run.resuming else self._order(run)
        steps = self.horizon_steps or run.max_steps
        labels = [run.domain_names[d] for d in run.domain_ids]
        self.sampler = CurriculumSampler(
            OrderSchedule(order),
            self.curriculum.pacing,
            horizon=steps * run.samples_per_step,
            pacing_name=self.curriculum.pacing_name,
            seed=run.seed,
            num_samples=run.num_samples,
            labels=labels,
        )
        if steps > run.max_steps:  # a horizon in samples, or one kept from a longer run, would hide this
            share = self.sampler.open_count(run.max_steps * run.samples_per_step) / run.num_samples
            warnings.warn(
                f"horizon_steps={steps} is past this run's max_steps={run.max_steps}: the curriculum opens only "
                f"{share:.0%} of the pool (the easiest) by the end, so the rest is never trained on; set "
                "horizon_steps <= max_steps (None: the run's length) if that is not meant",
                stacklevel=3,
            )
        return self.sampler

    def open_fraction(self) -> float:
        """Fraction of the pool open at the most recently generated sample."""
        g = max(0, self.sampler.schedule.frontier)
        return self.sampler.open_count(g) / self.sampler.schedule.num_examples

    def _order(self, run: RunContext) -> np.ndarray:
        """The curriculum's order, rank 0's on every rank: each rank runs the scorer (under DeepSpeed ZeRO-3 its
        forwards are collective), but a scorer's results can differ between ranks (GPU kernels that are not
        deterministic, dropout left on, a random subsample), and ranks dealing batches from different orders
        would train some examples twice and others never."""
        order = self.curriculum.order(run.model, run.dataset, run.collate)
        return order if getattr(self.curriculum, "scorer", None) is None else dist.from_rank_zero(order)

    def decide(self, step, stats, store, run):
        return self._order(run), {"dataflex/curriculum_open": self.open_fraction()}

    def history_entry(self, sampler):
        return {"easiest": sampler.schedule.current[:10].tolist()}

    def observe(self, batch, row_domain):
        return None

    def state_dict(self):
        return {"class": _class_name(self.curriculum), "curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state):
        _check_class(state, self.curriculum, "curriculum")
        self.curriculum.load_state_dict(state["curriculum"])

    def tensor_state_dict(self):
        return None

    def load_tensor_state_dict(self, state):
        return None
