"""``DataFlexCurriculumCallback``: easy-to-hard training on an unmodified ``transformers.Trainer``.

Same machinery as :class:`~dataflex.hf.callback.DataFlexCallback` (sampler inside the prepared
DataLoader, state in every checkpoint, exact resume, identical order on every rank); the decision is
a difficulty order paced by a :class:`~dataflex.curriculum.Curriculum`::

    curriculum = Curriculum(reference_losses, pacing="competence", c0=0.1)
    trainer = Trainer(..., callbacks=[DataFlexCurriculumCallback(curriculum)])

With a scorer-based curriculum and ``rescore_every=N`` the examples are re-ranked with the live model
every N steps; each new order takes effect at a deterministic sample index, like the other decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.curriculum import Curriculum
from dataflex.hf.callback import DataFlexCallback
from dataflex.samplers.curriculum import CurriculumSampler
from dataflex.schedule import OrderSchedule


class DataFlexCurriculumCallback(DataFlexCallback):
    """Train easiest-first with ``curriculum``'s pacing.

    Args:
        curriculum: difficulty source, pacing and direction.
        labels: optional per-example labels (for the dataset fingerprint).
        horizon_steps: optimizer steps until the whole pool is open; default: the run's ``max_steps``.
        rescore_every: re-rank with the curriculum's scorer every this many steps (0 = never).
        Other arguments as for :class:`DataFlexCallback`.
    """

    POLICY_METHODS = ("order", "state_dict", "load_state_dict")
    POLICY_KIND = "dataflex.curriculum.Curriculum"

    def __init__(
        self,
        curriculum: Curriculum,
        labels: Sequence[str] | None = None,
        *,
        horizon_steps: int | None = None,
        rescore_every: int = 0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if rescore_every and curriculum.scorer is None:
            raise ValueError("rescore_every needs a curriculum with a scorer (difficulty= is fixed)")
        if horizon_steps is not None and horizon_steps <= 0:
            raise ValueError(f"horizon_steps must be positive; got {horizon_steps}")
        super().__init__(curriculum, labels, update_every=rescore_every or 10**9, seed=seed, **kwargs)
        self.horizon_steps, self.rescore_every = horizon_steps, int(rescore_every)

    def _labels(self, dataset: Any) -> list[str]:
        if self.domains is None:
            return ["pool"] * len(dataset)
        return super()._labels(dataset)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._begin = (args, state, model, train_dataloader)
        super().on_train_begin(args, state, control, model=model, train_dataloader=train_dataloader, **kwargs)

    def _build_sampler(self, domain_ids: np.ndarray, seed: int, num_samples: int) -> CurriculumSampler:
        args, state, model, loader = self._begin
        if state.global_step > 0:  # resuming: the saved orders replace this placeholder
            order = np.arange(num_samples)
        else:
            order = self.policy.order(model, loader.dataset, loader.collate_fn)
        steps = self.horizon_steps or state.max_steps
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        labels = [self.domain_names[d] for d in domain_ids]
        return CurriculumSampler(OrderSchedule(order), self.policy.pacing, horizon=steps * per_step,
                                 pacing_name=self.policy.pacing_name, seed=seed, num_samples=num_samples,
                                 labels=labels)  # fmt: skip

    @property
    def open_fraction(self) -> float:
        """Fraction of the pool open at the most recently generated sample."""
        g = max(0, self.sampler.schedule.frontier)
        return self.sampler.open_count(g) / self.sampler.schedule.num_examples

    def _history_entry(self, step: int, effective_at: int) -> dict[str, Any]:
        return {"step": step, "effective_at": effective_at, "easiest": self.sampler.schedule.current[:10].tolist()}

    def _update(self, step: int) -> None:
        self.store.flush(step)
        order = self.policy.order(self._model, self._dataset, self._collate)
        effective_at = self.consumed_samples(step) + self._lookahead_samples
        self.sampler.schedule.add(effective_at, order)
        self.history.append(self._history_entry(step, effective_at))
        self._emit(step, {"dataflex/curriculum_open": self.open_fraction})
