"""Mixture laws: how each domain's validation loss depends on the training mixture, fitted on small runs.

A *swarm* of small runs, each trained on a mixture ``w`` (a point of the simplex over the training domains)
and evaluated on a set of validation domains, gives rows ``(w, losses)``. A law maps a mixture to the
predicted loss of every evaluated domain; :mod:`dataflex.mixture_search` then optimises over it.

Kinds:

* ``"loglinear"`` — the Data Mixing Law of Ye et al. (arXiv 2403.16952, eq. 1): per evaluated domain ``i``,
  ``L_i(w) = c_i + k_i * exp(sum_j t_ij * w_j)``, fitted by non-linear least squares (``scipy``), started
  from a linear fit of ``log(L_i - c_i)`` at a grid of offsets ``c_i`` below the smallest observed loss.
  Since mixtures sum to 1, only ``t_i`` up to a constant is identified; it is reported with mean 0.
  Smooth, so the search can refine its optimum with gradients; extrapolates in a controlled way.
* ``"gbm"`` — gradient-boosted trees per domain (RegMix, Liu et al., arXiv 2407.01492, uses LightGBM;
  scikit-learn's ``GradientBoostingRegressor`` plays that part here). Non-linear, piecewise constant.
* ``"gp"`` — a Gaussian process per domain (RBF + white noise kernel), one of AI2's OLMix regressors.
* ``"own_share"`` — each evaluated domain's loss depends on its own share only:
  ``L_i(w) = a_i - b_i * log(max(w_i, OWN_SHARE_FLOOR))`` with ``b_i >= 0``, fitted by least squares (two
  numbers per domain). It is the log-linear first-order form of a per-domain data scaling law
  (``L = E + A / D^alpha`` with ``D = w_i * tokens``, as in Ye et al.'s and RegMix's per-domain analyses),
  with every cross-domain transfer term dropped: a deliberately biased law that small swarms can still fit
  (a full law has ``d + 2`` parameters per domain; a swarm as costly as one main run has fewer runs than
  that). ``b_i >= 0`` because more of a domain's own data does not raise its own loss at these budgets;
  a negative fit is noise, and the constrained fit is then ``b_i = 0``. Under the mean objective the
  unconstrained optimum is ``w_i ∝ b_i``. Every evaluated domain must be a training domain (by name).

:meth:`MixtureLaw.held_out_error` reports each kind's error on runs it was not fitted on (k-fold over runs),
the number that says how far to trust a proposal. A law is saved as JSON with the runs it came from; the
non-parametric kinds are refitted from them (deterministically) on load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflex.state import read_json, write_json_atomic

__all__ = ["LAW_KINDS", "MixtureLaw", "SwarmRuns"]

LAW_KINDS = ("loglinear", "gbm", "gp", "own_share")
SMOOTH_KINDS = ("loglinear", "own_share")  # kinds with a gradient (the search refines their optimum with SLSQP)
T_MAX = 10.0  # bound on each loglinear t_ij (see _fit_loglinear)
# own_share: shares below this predict as this (log w -> -inf at 0, and a domain absent from training still has
# a finite loss through transfer; no swarm run samples so little of a domain that the law could say more).
OWN_SHARE_FLOOR = 1e-3


class SwarmRuns:
    """The rows a law is fitted on: ``weights`` ``(runs, train domains)``, ``losses`` ``(runs, eval domains)``."""

    def __init__(
        self,
        weights: np.ndarray,
        losses: np.ndarray,
        train_domains: Sequence[str],
        eval_domains: Sequence[str],
    ) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        if weights.ndim != 2 or weights.shape[1] != len(train_domains):
            raise ValueError(
                f"weights must have shape (runs, {len(train_domains)}) for domains {list(train_domains)}; "
                f"got {weights.shape}"
            )
        if losses.shape != (weights.shape[0], len(eval_domains)):
            raise ValueError(
                f"losses must have shape ({weights.shape[0]}, {len(eval_domains)}) (one row per run, one column "
                f"per evaluated domain {list(eval_domains)}); got {losses.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(weights).all(1) | (weights < 0).any(1) | (np.abs(weights.sum(1) - 1) > 1e-6))
        if bad.size:
            raise ValueError(f"runs {bad.tolist()} have weights that are not a mixture (finite, >= 0, sum 1)")
        bad = np.flatnonzero(~np.isfinite(losses).all(1))
        if bad.size:
            raise ValueError(f"runs {bad.tolist()} have non-finite losses; drop them or rerun them")
        self.weights, self.losses = weights, losses
        self.train_domains, self.eval_domains = list(train_domains), list(eval_domains)

    def __len__(self) -> int:
        return self.weights.shape[0]

    def subset(self, rows: np.ndarray) -> SwarmRuns:
        return SwarmRuns(self.weights[rows], self.losses[rows], self.train_domains, self.eval_domains)

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_domains": self.train_domains,
            "eval_domains": self.eval_domains,
            "weights": self.weights.tolist(),
            "losses": self.losses.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SwarmRuns:
        return cls(
            np.asarray(state["weights"]), np.asarray(state["losses"]), state["train_domains"], state["eval_domains"]
        )


class MixtureLaw:
    """Predict each evaluated domain's loss from the training mixture; see the module docstring for kinds."""

    def __init__(self, kind: str = "loglinear", seed: int = 0) -> None:
        if kind not in LAW_KINDS:
            raise ValueError(f"kind={kind!r}; valid kinds are {', '.join(LAW_KINDS)}")
        self.kind, self.seed = kind, int(seed)
        self.runs: SwarmRuns | None = None
        self.params: np.ndarray | None = None  # loglinear: (eval, 2 + train domains) = c, log k, t; own_share: a, b
        self._models: list[Any] = []
        self._jackknife: list[MixtureLaw] = []  # leave-one-run-out refits, made on first use (predict_spread)

    # -- fitting ---------------------------------------------------------------------------------
    @staticmethod
    def runs_needed(kind: str, num_domains: int) -> int:
        """The fewest runs a fit of ``kind`` over ``num_domains`` training domains accepts."""
        return num_domains + 2 if kind == "loglinear" else 3  # own_share: 2 parameters and one spare run

    def fit(self, runs: SwarmRuns) -> MixtureLaw:
        d = len(runs.train_domains)
        needed = self.runs_needed(self.kind, d)
        if len(runs) < needed:
            raise ValueError(f"a {self.kind} law over {d} domains needs at least {needed} runs; got {len(runs)}")
        self.runs, self._jackknife = runs, []
        if self.kind == "loglinear":
            self.params = np.stack(
                [_fit_loglinear(runs.weights, runs.losses[:, i]) for i in range(runs.losses.shape[1])]
            )
        elif self.kind == "own_share":
            own = _own_columns(runs)
            self.params = np.stack([_fit_own_share(runs.weights[:, j], runs.losses[:, i]) for i, j in enumerate(own)])
        else:
            self._models = [self._regressor().fit(runs.weights, runs.losses[:, i]) for i in range(runs.losses.shape[1])]
        return self

    def _regressor(self) -> Any:
        if self.kind == "gbm":
            from sklearn.ensemble import GradientBoostingRegressor

            return GradientBoostingRegressor(
                n_estimators=200, max_depth=2, learning_rate=0.05, subsample=0.8, random_state=self.seed
            )
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        kernel = ConstantKernel(1.0) * RBF(length_scale=0.3, length_scale_bounds=(1e-2, 1e2)) + WhiteKernel(
            1e-3, noise_level_bounds=(1e-10, 1.0)
        )
        return GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=self.seed)

    # -- prediction ------------------------------------------------------------------------------
    def predict(self, weights: np.ndarray) -> np.ndarray:
        """Predicted losses ``(mixtures, eval domains)`` for ``weights`` ``(mixtures, train domains)``."""
        if self.runs is None:
            raise RuntimeError("fit the law (or load one) before predicting")
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if w.shape[1] != len(self.runs.train_domains):
            raise ValueError(
                f"mixtures must have {len(self.runs.train_domains)} weights ({self.runs.train_domains}); "
                f"got shape {w.shape}"
            )
        if self.kind == "loglinear":
            c, log_k, t = self.params[:, 0], self.params[:, 1], self.params[:, 2:]
            return c[None, :] + np.exp(log_k[None, :] + w @ t.T)
        if self.kind == "own_share":
            share = np.maximum(w[:, _own_columns(self.runs)], OWN_SHARE_FLOOR)
            return self.params[:, 0][None, :] - self.params[:, 1][None, :] * np.log(share)
        return np.stack([m.predict(w) for m in self._models], axis=1)

    def predict_spread(self, weights: np.ndarray) -> np.ndarray:
        """How uncertain the law is about each prediction, ``(mixtures, eval domains)``, in loss units.

        ``gp``: the posterior standard deviation (it grows away from the swarm's runs, which is the point:
        a proposal in a region no run visited is a guess). The other kinds have no posterior; their spread
        is the jackknife standard error — the standard deviation of the predictions of the laws refitted
        with one run left out, times ``sqrt(runs - 1)`` (Efron's leave-one-out variance) — large where the
        prediction leans on a single run. Used by :func:`~dataflex.mixture_search.propose_mixture`'s
        ``pessimism``."""
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        self.predict(w[:1])  # the same checks as a prediction
        if self.kind == "gp":
            return np.stack([m.predict(w, return_std=True)[1] for m in self._models], axis=1)
        if not self._jackknife:
            runs = self.runs
            if len(runs) - 1 < self.runs_needed(self.kind, len(runs.train_domains)):
                raise ValueError(
                    f"a {self.kind} law's spread refits it without each run: that needs "
                    f"{self.runs_needed(self.kind, len(runs.train_domains)) + 1} runs; it has {len(runs)}"
                )
            self._jackknife = [
                MixtureLaw(self.kind, self.seed).fit(runs.subset(np.delete(np.arange(len(runs)), i)))
                for i in range(len(runs))
            ]
        predictions = np.stack([law.predict(w) for law in self._jackknife])
        return predictions.std(0) * np.sqrt(len(predictions) - 1)

    def gradient(self, weights: np.ndarray) -> np.ndarray | None:
        """``d L_i / d w_j`` ``(eval domains, train domains)`` at one mixture; None for the tree and GP kinds."""
        if self.kind == "own_share":
            w = np.asarray(weights, dtype=np.float64)
            own = _own_columns(self.runs)
            grad = np.zeros((len(own), w.size))
            # Below the floor the prediction is flat, so its derivative there is 0.
            share = w[own]
            above = share > OWN_SHARE_FLOOR
            grad[np.arange(len(own)), own] = np.where(above, -self.params[:, 1] / np.where(above, share, 1.0), 0.0)
            return grad
        if self.kind != "loglinear":
            return None
        log_k, t = self.params[:, 1], self.params[:, 2:]
        return np.exp(log_k + t @ np.asarray(weights, dtype=np.float64))[:, None] * t

    def held_out_error(self, runs: SwarmRuns, folds: int = 5) -> dict[str, Any]:
        """Error on runs left out of the fit (``folds``-fold over runs, seeded): per evaluated domain and mean,
        as mean absolute error and RMSE, and the held-out predictions themselves."""
        if not 2 <= folds <= len(runs):
            raise ValueError(f"folds must be in [2, runs={len(runs)}]; got {folds!r}")
        order = np.random.default_rng(np.random.SeedSequence([self.seed, 0x1A])).permutation(len(runs))
        predicted = np.full(runs.losses.shape, np.nan)
        for held in np.array_split(order, folds):
            train = np.setdiff1d(order, held)
            predicted[held] = MixtureLaw(self.kind, self.seed).fit(runs.subset(train)).predict(runs.weights[held])
        error = predicted - runs.losses
        return {
            "mae": np.abs(error).mean(0).tolist(),
            "rmse": np.sqrt((error**2).mean(0)).tolist(),
            "mean_mae": float(np.abs(error).mean()),
            "mean_rmse": float(np.sqrt((error**2).mean())),
            "predicted": predicted.tolist(),
        }

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        if self.runs is None:
            raise RuntimeError("nothing to save: the law is not fitted")
        state = {"kind": self.kind, "seed": self.seed, "runs": self.runs.state_dict()}
        if self.params is not None:
            state["params"] = self.params.tolist()
        write_json_atomic(Path(path), state, digest=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MixtureLaw:
        state = read_json(Path(path))
        for key in ("kind", "seed", "runs"):
            if key not in state:
                raise ValueError(f"{path}: not a saved mixture law (no {key!r})")
        law = cls(state["kind"], state["seed"])
        runs = SwarmRuns.from_state(state["runs"])
        if law.kind in SMOOTH_KINDS and "params" in state:
            params = np.asarray(state["params"], dtype=np.float64)
            width = 2 + len(runs.train_domains) if law.kind == "loglinear" else 2
            expected = (len(runs.eval_domains), width)
            if params.shape != expected or not np.isfinite(params).all():
                raise ValueError(f"{path}: params must be finite with shape {expected}; got {params.shape}")
            law.runs, law.params = runs, params
            return law
        return law.fit(runs)


def _fit_loglinear(weights: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """``[c, log k, t_1..t_d]`` minimising the squared error of ``c + exp(log k + w @ t)`` on one domain.

    Starts: for offsets ``c`` below the smallest loss, ``log(L - c)`` is linear in ``w`` (least squares);
    the best start is refined by ``scipy.optimize.least_squares`` with ``c`` kept below every observed loss.
    """
    from scipy.optimize import least_squares

    lowest, spread = float(loss.min()), float(np.ptp(loss)) + 1e-6
    design = np.hstack([np.ones((len(loss), 1)), weights])
    best, best_error = None, np.inf
    for gap in (0.05, 0.2, 0.5, 1.0, 2.0, 5.0):
        c = lowest - gap * spread
        coef, *_ = np.linalg.lstsq(design, np.log(loss - c), rcond=None)
        start = np.concatenate([[c], coef])
        error = float(np.sum((c + np.exp(design @ coef) - loss) ** 2))
        if error < best_error:
            best, best_error = start, error

    def residual(p: np.ndarray) -> np.ndarray:
        return p[0] + np.exp(np.clip(design @ p[1:], -50, 50)) - loss

    # Bounds: the floor stays below every observed loss (else exp would have to be negative), and each t_ij
    # within +-T_MAX (a domain going from 0 to all of the mixture changes the reducible loss at most e^T_MAX
    # fold): with nearly flat losses (short proxies) unbounded t fit noise and explode on held-out mixtures.
    lower = np.r_[-np.inf, -np.inf, np.full(best.size - 2, -T_MAX)]
    upper = np.r_[lowest, np.inf, np.full(best.size - 2, T_MAX)]
    start = best.copy()
    start[1] += start[2:].mean()  # the mean-0 gauge, then inside the bounds
    start[2:] = np.clip(start[2:] - start[2:].mean(), -T_MAX + 1e-6, T_MAX - 1e-6)
    start[0] = min(start[0], lowest - 1e-9)
    p = least_squares(residual, start, bounds=(lower, upper), method="trf").x
    # Mixtures sum to 1, so t_i + a and log k - a predict the same: report the gauge with mean_j t_ij = 0.
    shift = p[2:].mean()
    return np.concatenate([[p[0], p[1] + shift], p[2:] - shift])


def _own_columns(runs: SwarmRuns) -> list[int]:
    """For each evaluated domain, the column of its own share among the training domains (own_share law)."""
    missing = [name for name in runs.eval_domains if name not in runs.train_domains]
    if missing:
        raise ValueError(
            f"an own_share law predicts each evaluated domain from its own training share, but {missing} "
            f"are not training domains ({runs.train_domains}); use kind loglinear, gp or gbm for them"
        )
    return [runs.train_domains.index(name) for name in runs.eval_domains]


def _fit_own_share(share: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """``[a, b]`` minimising the squared error of ``a - b * log(max(share, floor))`` with ``b >= 0``.

    One inequality on a two-parameter least squares: the unconstrained solution if its ``b`` is >= 0, else the
    best with ``b = 0`` (the mean loss), since the problem is convex and its boundary is that line.
    """
    x = -np.log(np.maximum(share, OWN_SHARE_FLOOR))
    if np.ptp(x) > 0:
        (a, b), *_ = np.linalg.lstsq(np.c_[np.ones_like(x), x], loss, rcond=None)
        if b >= 0:
            return np.array([a, b])
    return np.array([float(loss.mean()), 0.0])
