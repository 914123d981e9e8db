"""ADO: Adaptive Data Optimization with per-domain scaling laws (Jiang et al., arXiv 2410.11820).

For every domain ``k`` fit ``L_k(n) = eps_k + beta_k * n ** (-alpha_k)`` to its training loss as a
function of the samples ``n`` drawn from it so far. The fitted curve forecasts how fast the domain's
loss is still falling, ``-dL_k/dn = alpha_k (L_k(n) - eps_k) / n``. With a prior ``mu`` (natural
proportions by default) and a credit score ``h`` (moving average of the policy)::

    rho_k   ∝ mu_k * h_k ** s * (-dL_k/dn)
    pi      = normalise(gamma2 * rho + (1 - gamma2) * rho_bar)       rho_bar = running mean of rho
    pi      = max(pi, delta_min), renormalised
    h       = gamma1 * pi + (1 - gamma1) * h

No proxy model, no extra forward. Defaults follow the paper (gamma1 = gamma2 = 0.1, s = 0.5,
delta_min = 0.01). The fit here is a small deterministic grid search over ``alpha`` with a
non-negative least-squares solve for ``(eps, beta)`` at each ``alpha``: no optimiser, no randomness,
identical on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from dataflex.checks import real_number, whole_number
from dataflex.policies.base import BoundPolicy
from dataflex.state import saved_count, saved_vector
from dataflex.store import DomainStats

__all__ = ["ADO", "ALPHA_GRID", "fit_power_law"]

ALPHA_GRID = np.linspace(0.01, 0.8, 80)  # the paper bounds the exponent to (0, 0.8]


def fit_power_law(n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of ``loss ≈ eps + beta * n**-alpha`` with ``eps, beta >= 0``.

    Returns ``(eps, beta, alpha)``. For each alpha on a grid the model is linear in ``(eps, beta)``;
    the best non-negative solution over the grid wins.
    """
    n = np.asarray(n, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    keep = np.isfinite(y) & (n > 0)
    n, y = n[keep], y[keep]
    if n.size < 3:
        raise ValueError(f"need at least 3 finite points to fit a power law; got {n.size}")
    best = (np.inf, float(y.min()), 0.0, ALPHA_GRID[0])
    for alpha in ALPHA_GRID:
        x = n**-alpha
        xm, ym = x.mean(), y.mean()
        var = ((x - xm) ** 2).sum()
        beta = max(0.0, float(((x - xm) * (y - ym)).sum() / var)) if var > 0 else 0.0
        eps = ym - beta * xm
        if eps < 0:  # clamp and refit beta through the origin
            eps = 0.0
            beta = max(0.0, float((x * y).sum() / (x * x).sum()))
        sse = float(((eps + beta * x - y) ** 2).sum())
        if sse < best[0]:
            best = (sse, eps, beta, float(alpha))
    return best[1], best[2], best[3]


class ADO(BoundPolicy):
    """Adaptive Data Optimization (arXiv 2410.11820).

    Args:
        prior: ``"natural"`` (domain sizes, the paper's choice) or ``"uniform"``.
        warmup_updates: updates that only collect history before the first fit.
        gamma1, gamma2, s, delta_min: as in the paper.
    """

    def __init__(
        self,
        prior: Literal["natural", "uniform"] = "natural",
        warmup_updates: int = 5,
        gamma1: float = 0.1,
        gamma2: float = 0.1,
        s: float = 0.5,
        delta_min: float = 0.01,
    ) -> None:
        if prior not in ("natural", "uniform"):
            raise ValueError(f"prior={prior!r}; valid values are 'natural', 'uniform'")
        gamma1, gamma2 = real_number("gamma1", gamma1), real_number("gamma2", gamma2)
        s, delta_min = real_number("s", s), real_number("delta_min", delta_min)
        warmup_updates = whole_number("warmup_updates", warmup_updates)
        for name, v in (("gamma1", gamma1), ("gamma2", gamma2)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must lie in (0, 1]; got {v}")
        if not 0 <= s < float("inf"):  # s < 0 would favour the domains the policy starved (the credit reversed);
            # s = inf sends every credit below 1 to 0
            raise ValueError(
                f"s must be a finite number >= 0 (0 ignores the credit score; the paper uses 0.5); got {s}"
            )
        if delta_min < 0:
            raise ValueError(f"delta_min must be >= 0 (the floor on every domain's weight); got {delta_min}")
        if warmup_updates < 3:
            raise ValueError(f"warmup_updates must be >= 3 (a power law has 3 parameters); got {warmup_updates}")
        self.prior, self.warmup_updates = prior, int(warmup_updates)
        self.gamma1, self.gamma2, self.s, self.delta_min = float(gamma1), float(gamma2), float(s), float(delta_min)

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None:
        super().bind(domain_names, domain_sizes)
        if self.delta_min * self.num_domains >= 1:
            raise ValueError(f"delta_min={self.delta_min} too large for {self.num_domains} domains (need < 1/K)")
        k = self.num_domains
        self.mu = self.domain_sizes / self.domain_sizes.sum() if self.prior == "natural" else np.full(k, 1 / k)
        self.h = self.mu.copy()
        self.rho_bar = self.mu.copy()
        self.seen = np.zeros(k)  # samples drawn per domain so far
        self.history_n: list[list[float]] = []  # cumulative samples per domain at each update
        self.history_loss: list[list[float]] = []  # mean loss per domain at each update (NaN if absent)
        self.t = 0

    def first_adaptive_update(self) -> int:
        """The first update (1-based) that fits the power laws and can move off the prior: ``warmup_updates``."""
        return self.warmup_updates

    def adapting_within(self, updates: int) -> str:
        """The smallest warmup (3, a power law's parameter count) when the run makes enough updates for it."""
        return "warmup_updates=3" if updates >= 3 else ""

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return self.mu.copy()

    def learning_speed(self) -> np.ndarray:
        """``-dL_k/dn`` from each domain's fitted power law (0 where it cannot be fitted)."""
        n_hist = np.asarray(self.history_n)
        l_hist = np.asarray(self.history_loss)
        speed = np.zeros(self.num_domains)
        for k in range(self.num_domains):
            try:
                eps, beta, alpha = fit_power_law(n_hist[:, k], l_hist[:, k])
            except ValueError:
                continue
            n_now = max(self.seen[k], 1.0)
            predicted = eps + beta * n_now**-alpha
            speed[k] = alpha * (predicted - eps) / n_now
        return speed

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray:
        self._require_bound()
        self.seen += stats.count
        self.history_n.append(self.seen.tolist())
        self.history_loss.append(stats.mean_loss.tolist())
        self.t += 1
        if self.t < self.warmup_updates:
            return np.asarray(current, dtype=np.float64)
        rho = self.mu * self.h**self.s * self.learning_speed()
        rho = rho / rho.sum() if rho.sum() > 0 and np.isfinite(rho).all() else self.mu.copy()
        pi = self.gamma2 * rho + (1 - self.gamma2) * self.rho_bar
        pi = np.maximum(pi / pi.sum(), self.delta_min)
        pi /= pi.sum()
        self.h = self.gamma1 * pi + (1 - self.gamma1) * self.h
        weight = 1.0 / (self.t + 1.0)
        self.rho_bar = weight * rho + (1 - weight) * self.rho_bar
        return pi

    def state_dict(self) -> dict[str, Any]:
        def clean(rows: list[list[float]]) -> list[list[float | None]]:
            return [[v if np.isfinite(v) else None for v in row] for row in rows]

        return {
            "h": self.h.tolist(),
            "rho_bar": self.rho_bar.tolist(),
            "seen": self.seen.tolist(),
            "history_n": self.history_n,
            "history_loss": clean(self.history_loss),
            "t": self.t,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        h = saved_vector(state, "h", "ADO")
        k = h.shape[0]
        rho_bar = saved_vector(state, "rho_bar", "ADO", k, nonnegative=True)
        seen = saved_vector(state, "seen", "ADO", k, nonnegative=True)
        history_n = [list(r) for r in state["history_n"]]
        history_loss = [[np.nan if v is None else v for v in r] for r in state["history_loss"]]
        if len(history_n) != len(history_loss) or any(len(r) != k for r in history_n + history_loss):
            raise ValueError(f"ADO state histories must be {k}-domain rows of equal count")
        self.h, self.rho_bar, self.seen, self.t = h, rho_bar, seen, saved_count(state, "t", "ADO")
        self.history_n, self.history_loss = history_n, history_loss
