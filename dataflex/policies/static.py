"""Static baselines: the mixtures every benchmark must compare against.

Aioli (arXiv 2411.05735) found that uniform-over-domains is hard to beat consistently, so it and the
natural proportions are always in the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dataflex.checks import real_number
from dataflex.policies.base import BoundPolicy
from dataflex.state import saved_count
from dataflex.store import DomainStats
from dataflex.weights import user_weights

__all__ = ["Natural", "Piecewise", "Static", "Temperature", "Uniform"]


class Uniform(BoundPolicy):
    """Every domain gets ``1/K`` of the samples, whatever its size."""

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return np.full(self.num_domains, 1.0 / self.num_domains)


class Natural(BoundPolicy):
    """Domains in proportion to their number of examples (what shuffling the union would give)."""

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return self.domain_sizes / self.domain_sizes.sum()


class Temperature(BoundPolicy):
    """``w_i ∝ n_i ** (1 / tau)``: tau = 1 is natural, tau → ∞ is uniform (multilingual-BERT style).

    For example sizes (100, 10_000) with tau = 2 give weights (0.09, 0.91) instead of (0.01, 0.99).
    """

    def __init__(self, tau: float = 2.0) -> None:
        tau = real_number("tau", tau)
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive finite number; got {tau!r}")
        self.tau = float(tau)

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        w = self.domain_sizes ** (1.0 / self.tau)
        return w / w.sum()


class Static(BoundPolicy):
    """Fixed user-given weights, by domain name (``{"code": 0.5, ...}``) or in domain order (sorted names; a list is
    refused for names that are numbers, whose sorted text is not their numeric order)."""

    def __init__(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        self.weights = dict(weights) if isinstance(weights, Mapping) else list(weights)

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return user_weights(self.weights, self.domain_names, what="Static weights")


class Piecewise(BoundPolicy):
    """Fixed weights by training step: ``stages`` is ``[(start_step, weights), ...]`` from step 0 on.

    A schedule proposed by :func:`dataflex.mixture_search.propose_schedule` (stages by training fraction)
    becomes one with ``start_step = fraction * total_steps``. Weights change only at policy updates, which
    come every ``update_every`` steps, so every start must be a multiple of it (refused otherwise, rather
    than moved to the next update without a word).
    """

    def __init__(self, stages: Sequence[tuple[int, Mapping[str, float] | Sequence[float]]], update_every: int) -> None:
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive integer; got {update_every!r}")
        starts = [s for s, _ in stages]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"stage starts must begin at step 0 and increase strictly; got {starts}")
        off = [s for s in starts if not isinstance(s, int) or s % update_every]
        if off:
            raise ValueError(
                f"stage starts {off} are not multiples of update_every={update_every}: the weights can only "
                "change at a policy update"
            )
        self.stages = [(int(s), dict(w) if isinstance(w, Mapping) else list(w)) for s, w in stages]
        self.update_every = update_every
        self.t = 0  # updates so far: the run is at step t * update_every

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None:
        super().bind(domain_names, domain_sizes)
        self._weights = [
            user_weights(w, self.domain_names, what=f"Piecewise weights of the stage from step {s}")
            for s, w in self.stages
        ]

    def check_cadence(self, update_every: int, warmup_steps: int = 0) -> None:
        """Refuse a run whose updates do not come at ``t * update_every`` — the steps the stages are counted in.

        The policy counts its updates; a callback deciding every 50 steps would otherwise start a stage meant
        for step 100 at step 500, and a warmup of ``w >= update_every`` steps would shift every stage by it.
        """
        if update_every != self.update_every:
            raise ValueError(
                f"Piecewise(update_every={self.update_every}) is driven by updates every {update_every} steps: its "
                f"stages would start at {update_every / self.update_every:g}x their steps; give both the same "
                "update_every"
            )
        if warmup_steps >= update_every:
            raise ValueError(
                f"warmup_steps={warmup_steps} delays the first update past step {update_every}, which would shift "
                "every Piecewise stage; use warmup_steps=0 (a stage from step 0 already fixes the start)"
            )

    def _at(self, step: int) -> np.ndarray:
        stage = max(i for i, (s, _) in enumerate(self.stages) if s <= step)
        return self._weights[stage].copy()

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return self._at(0)

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray:
        self.t += 1
        return self._at(self.t * self.update_every)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = saved_count(state, "t", "Piecewise")
