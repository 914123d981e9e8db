"""Start from a mixture law's proposal and correct it online, inside a trust region around it.

A mixture law (:mod:`dataflex.mixture_law`) fitted on a swarm of small runs predicts each domain's loss at
the proposed mixture ``w0``. The main run is larger and its losses are measured mid-training, so their level
is not comparable with the prediction; their *pattern across domains* is. At every update, for each domain
``i`` that the law evaluates and the window saw::

    r_i   <- alpha * r_i + (1 - alpha) * log(L_i / P_i)        (EMA of the log ratio measured / predicted)
    d_i    = r_i - mean_j r_j                                     (over domains with an estimate)
    w      = region(w0 * exp(step * d)  normalised)

so a domain whose loss stands higher, relative to the others, than the law said gets more weight, one that
is doing better than predicted gets less (the multiplicative-weights step of DoReMi's and ODM's rules,
driven by the law's residual instead of a reference model's excess loss). ``region`` is the trust region:
the L1 ball of ``radius`` around ``w0`` intersected with the weight bounds, mapped with
:class:`~dataflex.mixture_search.MixtureRegion` — every weight vector returned is inside it. With
``radius=0`` this is ``Static(w0)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dataflex.checks import is_real, real_number
from dataflex.mixture_search import MixtureRegion
from dataflex.policies.base import BoundPolicy
from dataflex.state import saved_count
from dataflex.store import DomainStats
from dataflex.weights import validate_weights

__all__ = ["LawCorrected"]


class LawCorrected(BoundPolicy):
    """The proposal ``weights`` corrected by the measured-vs-predicted loss pattern (see the module docstring).

    Args:
        weights: the law's proposed mixture ``{domain: weight}`` (sums to 1).
        predicted: the law's predicted loss ``{domain: loss}`` at that mixture; domains missing here are
            never corrected (they keep their share of the correction's normalisation only).
        radius: L1 trust region around ``weights``; 0 keeps the proposal unchanged.
        step: multiplicative step size on the centred log ratio.
        alpha: EMA factor of the log ratio across updates.
        min_weight / max_weight: bounds every returned weight respects (e.g. the search's repetition caps).
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        predicted: Mapping[str, float],
        *,
        radius: float = 0.1,
        step: float = 2.0,
        alpha: float = 0.8,
        min_weight: float = 0.0,
        max_weight: Mapping[str, float] | None = None,
    ) -> None:
        radius, step, alpha = real_number("radius", radius), real_number("step", step), real_number("alpha", alpha)
        min_weight = real_number("min_weight", min_weight)
        bad = {k: v for k, v in predicted.items() if not (is_real(v) and np.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"predicted losses must be finite and > 0; got {bad}")
        if not (np.isfinite(radius) and 0 <= radius <= 2):
            raise ValueError(f"radius must be in [0, 2] (an L1 distance between mixtures); got {radius!r}")
        if not (np.isfinite(step) and step >= 0):
            raise ValueError(f"step must be a finite number >= 0; got {step!r}")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1); got {alpha!r}")
        self.weights, self.predicted = dict(weights), dict(predicted)
        self.radius, self.step, self.alpha = float(radius), float(step), float(alpha)
        self.min_weight, self.max_weight = float(min_weight), None if max_weight is None else dict(max_weight)
        self.t = 0
        self.ratio: np.ndarray | None = None  # EMA of log(measured / predicted); NaN until a domain is seen

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None:
        super().bind(domain_names, domain_sizes)
        self.w0 = validate_weights(self.weights, self.domain_names, what="LawCorrected proposal")
        unknown = sorted(set(self.predicted) - set(self.domain_names))
        if unknown:
            raise ValueError(f"predicted losses for {unknown}, which are not domains {self.domain_names}")
        self.prediction = np.array([self.predicted.get(d, np.nan) for d in self.domain_names])
        caps = None
        if self.max_weight is not None:
            caps = np.array([float(self.max_weight.get(d, 1.0)) for d in self.domain_names])
        high = np.ones(self.num_domains) if caps is None else caps
        if (self.w0 < self.min_weight - 1e-9).any() or (self.w0 > high + 1e-9).any():
            raise ValueError(
                f"the proposal {dict(zip(self.domain_names, self.w0.round(4).tolist()))} is outside the weight "
                f"bounds (min_weight={self.min_weight}, max_weight={self.max_weight})"
            )
        self.region = MixtureRegion(self.num_domains, self.w0, self.min_weight, caps, max_kl=None, max_l1=self.radius)
        self.ratio = np.full(self.num_domains, np.nan)
        self.t = 0

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return self.w0.copy()

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray:
        self._require_bound()
        measured = stats.mean_loss
        usable = np.isfinite(measured) & (measured > 0) & np.isfinite(self.prediction)
        log_ratio = np.log(np.where(usable, measured, 1.0) / np.where(usable, self.prediction, 1.0))
        fresh = usable & np.isnan(self.ratio)
        self.ratio = np.where(fresh, log_ratio, self.ratio)
        blend = usable & ~fresh
        self.ratio = np.where(blend, self.alpha * self.ratio + (1 - self.alpha) * log_ratio, self.ratio)
        self.t += 1
        known = np.isfinite(self.ratio)
        if known.sum() < 2:  # a pattern across domains needs two of them
            return self.w0.copy()
        departure = np.where(known, self.ratio - self.ratio[known].mean(), 0.0)
        target = self.w0 * np.exp(self.step * departure)
        return self.region.make(target / target.sum())[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "ratio": None if self.ratio is None else [None if np.isnan(x) else float(x) for x in self.ratio],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = saved_count(state, "t", "LawCorrected")
        ratio = state.get("ratio")
        if ratio is not None:
            values = np.array([np.nan if x is None else x for x in ratio], dtype=np.float64)
            if self.ratio is not None and values.shape != self.ratio.shape:
                raise ValueError(f"LawCorrected state has {values.size} domains, this run has {self.ratio.size}")
            if np.isinf(values).any():
                raise ValueError(f"LawCorrected state ratio must be finite or null; got {ratio}")
            self.ratio = values
        self.t = t
