"""Online Data Mixing (ODM): domain weights from an EXP3 multi-armed bandit.

Albalak et al., "Efficient Online Data Mixing For Language Model Pre-Training", arXiv 2312.02406.
Each domain is an arm; the reward of an arm is the training loss of its data (high loss = much left
to learn). With ``K`` domains and update count ``t``::

    eps_t   = min(1/K, sqrt(ln K / (K t)))
    pi      = (1 - K eps_t) * softmax(eps_{t-1} * R) + eps_t
    R_i    <- alpha R_i + (1 - alpha) * L_i / pi_i        for every domain i seen in the window

In the paper a batch comes from a single domain, so one arm is pulled per step. Here batches mix
domains, so each domain is credited with the mean loss *of its own examples* in the window (never
the batch mean, never the first example's domain), importance-weighted by the probability it was
sampled with. With single-domain batches this reduces exactly to the paper's rule. A domain with no
example in the window keeps its estimate, as an unpulled arm does in EXP3.

When it starts to move: while ``eps_t = 1/K`` the mixture is exactly uniform, which lasts as long as
``sqrt(ln K / (K t)) >= 1/K``, i.e. for the first ``floor(K ln K)`` updates — 16 updates for 8 domains,
800 steps at ``update_every=50``. In a short run or a sweep that is indistinguishable from ``Uniform``.
``exploration_scale=c`` (a deviation from the paper, which uses ``c = 1``) sets
``eps_t = min(1/K, c sqrt(ln K / (K t)))``; the first update off uniform is then
``floor(c^2 K ln K) + 1`` (:meth:`ODM.first_adaptive_update`), e.g. the 2nd update for 8 domains and
``c = 0.25``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.checks import real_number
from dataflex.policies.base import BoundPolicy
from dataflex.state import saved_count, saved_vector
from dataflex.store import DomainStats
from dataflex.weights import apply_floor

__all__ = ["ODM"]


class ODM(BoundPolicy):
    """EXP3 online data mixing (arXiv 2312.02406).

    Args:
        alpha: smoothing of the reward estimate (the paper's moving-average factor).
        floor: minimum weight of any domain after the update (on top of the bandit's own eps_t).
        exploration_scale: ``c`` in ``eps_t = min(1/K, c sqrt(ln K / (K t)))``; below 1 the mixture leaves
            uniform earlier (see the module docstring); 1 is the paper's schedule.
    """

    def __init__(self, alpha: float = 0.9, floor: float = 1e-3, exploration_scale: float = 1.0) -> None:
        alpha, floor = real_number("alpha", alpha), real_number("floor", floor)
        exploration_scale = real_number("exploration_scale", exploration_scale)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1); got {alpha!r}")
        if not (np.isfinite(floor) and floor >= 0):
            raise ValueError(f"floor must be a finite number >= 0; got {floor!r}")
        if not (np.isfinite(exploration_scale) and exploration_scale > 0):
            raise ValueError(f"exploration_scale must be a finite number > 0; got {exploration_scale!r}")
        self.alpha = float(alpha)
        self.floor = float(floor)
        self.exploration_scale = float(exploration_scale)
        self.t = 0
        self.rewards: np.ndarray | None = None

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None:
        super().bind(domain_names, domain_sizes)
        if self.floor * self.num_domains >= 1:
            raise ValueError(f"floor={self.floor} too large for {self.num_domains} domains (need < 1/K)")
        self.rewards = np.zeros(self.num_domains)
        self.t = 0

    def exploration(self, t: int) -> float:
        k = self.num_domains
        if k == 1:
            return 1.0
        return min(1.0 / k, self.exploration_scale * math.sqrt(math.log(k) / (k * max(t, 1))))

    def first_adaptive_update(self) -> int:
        """The first update (1-based) whose weights can differ from uniform: ``floor(c^2 K ln K) + 1``."""
        self._require_bound()
        k = self.num_domains
        return 1 if k == 1 else math.floor(self.exploration_scale**2 * k * math.log(k)) + 1

    def adapting_within(self, updates: int) -> str:
        """The ``exploration_scale`` whose first move comes by half of ``updates`` ("" when none would)."""
        k = self.num_domains
        scale = math.floor(math.sqrt(max(updates // 2 - 1, 0) / (k * math.log(k))) * 100) / 100
        if scale <= 0:
            return ""
        return f"exploration_scale={scale:g} (its first move at update {math.floor(scale**2 * k * math.log(k)) + 1})"

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return np.full(self.num_domains, 1.0 / self.num_domains)

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray:
        self._require_bound()
        assert self.rewards is not None
        seen = stats.count > 0
        if seen.any():
            # Importance weight by the probability the domain was sampled with; floor it so a
            # near-zero weight cannot blow the estimate up to infinity.
            pi = np.maximum(np.asarray(current, dtype=np.float64), 1e-12)
            reward = stats.mean_loss / pi
            self.rewards = np.where(seen, self.alpha * self.rewards + (1 - self.alpha) * reward, self.rewards)
        self.t += 1
        k = self.num_domains
        eps_prev, eps = self.exploration(self.t - 1 if self.t > 1 else 1), self.exploration(self.t)
        logits = eps_prev * self.rewards
        logits = logits - logits.max()  # numerically safe softmax
        soft = np.exp(logits)
        soft /= soft.sum()
        return apply_floor((1 - k * eps) * soft + eps, self.floor)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "rewards": None if self.rewards is None else self.rewards.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = saved_count(state, "t", "ODM")
        if state["rewards"] is not None:
            rewards = saved_vector(state, "rewards", "ODM")
            if self.rewards is not None and rewards.shape != self.rewards.shape:
                raise ValueError(f"ODM state has {rewards.shape[0]} domains, this run has {self.rewards.shape[0]}")
            self.rewards = rewards
        self.t = t
