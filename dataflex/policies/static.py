"""Static baselines: the mixtures every benchmark must compare against.

Aioli (arXiv 2411.05735) found that uniform-over-domains is hard to beat consistently, so it and the
natural proportions are always in the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dataflex.policies.base import BoundPolicy
from dataflex.weights import validate_weights

__all__ = ["Natural", "Static", "Temperature", "Uniform"]


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
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive finite number; got {tau!r}")
        self.tau = float(tau)

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        w = self.domain_sizes ** (1.0 / self.tau)
        return w / w.sum()


class Static(BoundPolicy):
    """Fixed user-given weights, by domain name (``{"code": 0.5, ...}``) or in domain order."""

    def __init__(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        self.weights = dict(weights) if isinstance(weights, Mapping) else list(weights)

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return validate_weights(self.weights, self.domain_names, what="Static weights")
