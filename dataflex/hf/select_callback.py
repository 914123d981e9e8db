"""``DataFlexSelectCallback``: dynamic per-example selection on an unmodified ``transformers.Trainer``.

Same machinery as :class:`~dataflex.hf.callback.DataFlexCallback` (sampler inside the prepared
DataLoader, per-example losses from the training forward, state in every checkpoint, exact resume),
but the decision is a *subset*: every ``update_every`` steps after ``warmup_steps`` the selector scores
a candidate pool with the current model (batched) and the :class:`~dataflex.samplers.SubsetSampler`
trains on the chosen examples from a deterministic sample index on::

    trainer = Trainer(..., callbacks=[DataFlexSelectCallback(LossFocus(0.25, "hard"), update_every=20)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.hf.callback import DataFlexCallback
from dataflex.samplers.subset import SubsetSampler
from dataflex.schedule import SubsetSchedule
from dataflex.selectors import SelectionContext, Selector


class DataFlexSelectCallback(DataFlexCallback):
    """Re-select the training subset every ``update_every`` steps with ``selector``.

    Args:
        selector: a :mod:`dataflex.selectors` selector (LossFocus, RhoLoss, Influence, RandomSelection).
        labels: optional per-example labels (e.g. task names), used for per-label logging and the
            dataset fingerprint; selection itself ignores them.
        score_batch_size: batch size of the candidate scoring passes.
        Other arguments as for :class:`DataFlexCallback`.
    """

    POLICY_METHODS = ("initial_subset", "select", "state_dict", "load_state_dict")
    POLICY_KIND = "dataflex.selectors"

    def __init__(
        self,
        selector: Selector,
        labels: Sequence[str] | None = None,
        *,
        update_every: int = 50,
        warmup_steps: int = 0,
        seed: int | None = None,
        score_batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(selector, labels, update_every=update_every, warmup_steps=warmup_steps, seed=seed, **kwargs)
        self.score_batch_size = int(score_batch_size)

    @property
    def selected(self) -> np.ndarray:
        """The most recently scheduled subset."""
        if self.sampler is None:
            raise RuntimeError("training has not started")
        return self.sampler.schedule.current

    def _labels(self, dataset: Any) -> list[str]:
        if self.domains is None:
            return ["pool"] * len(dataset)
        return super()._labels(dataset)

    def _build_sampler(self, domain_ids: np.ndarray, seed: int, num_samples: int) -> SubsetSampler:
        schedule = SubsetSchedule(num_samples, self.policy.initial_subset(num_samples))
        labels = [self.domain_names[d] for d in domain_ids]
        return SubsetSampler(schedule, seed=seed, num_samples=num_samples, labels=labels)

    def _history_entry(self, step: int, effective_at: int) -> dict[str, Any]:
        current = self.sampler.schedule.current
        return {"step": step, "effective_at": effective_at, "size": int(current.size), "ids": current.tolist()}

    def _update(self, step: int) -> None:
        stats = self.store.flush(step)  # per-example training losses: kept per example with their step
        context = SelectionContext(
            model=self._model,
            dataset=self._dataset,
            collate=self._collate,
            step=step,
            seed=self.sampler.seed,
            optimizer=self._optimizer,
            batch_size=self.score_batch_size,
            labels=self.store.domain_ids,
        )
        chosen = self.policy.select(context)
        if self.policy.last_scores is not None:
            self.store.record_scores(*self.policy.last_scores, step=step)
        effective_at = self.consumed_samples(step) + self._lookahead_samples
        self.sampler.schedule.add(effective_at, chosen)
        self.history.append(self._history_entry(step, effective_at))
        logs = {
            "dataflex/selected": float(chosen.size),
            "dataflex/non_finite": float(stats.non_finite),
            "dataflex/masked": float(stats.masked),
        }
        if self.policy.last_scores is not None:
            pool_scores = self.policy.last_scores[1]
            logs["dataflex/score_mean_pool"] = float(np.nanmean(pool_scores))
            logs["dataflex/score_mean_selected"] = float(np.nanmean(self.store.score[chosen]))
        if len(self.domain_names) > 1:  # share of each label in the selection
            shares = np.bincount(self.store.domain_ids[chosen], minlength=len(self.domain_names)) / chosen.size
            logs.update({f"dataflex/selected_share/{n}": float(x) for n, x in zip(self.domain_names, shares)})
        self._emit(step, logs)
