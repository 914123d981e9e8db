"""Propose a training mixture from a fitted :class:`~dataflex.mixture_law.MixtureLaw`, under the constraints a
main run needs.

Objective (lower is better) over the law's evaluated domains: ``"mean"``, ``"worst"`` (the largest predicted
loss), one domain's name, or a mapping ``{domain: weight}`` (a weighted mean, e.g. a target set).

Constraints, every one checked on the answer:

* ``min_weight`` — a floor for every training domain;
* ``max_weight`` — a cap per domain; :func:`repetition_caps` turns a main run's token budget, each domain's
  size and the number of epochs a domain may be repeated into these caps (repeating data past a few epochs
  stops paying, Muennighoff et al., arXiv 2305.16264; OLMix constrains repetition the same way);
* ``max_kl`` / ``max_l1`` — the distance to a ``prior`` (KL(w || prior), or the L1 distance): stay near a
  known-good mixture where the law was fitted, since a law fitted on a swarm around the prior extrapolates
  poorly far from it;
* ``no_worse_than`` — a reference mixture (e.g. uniform): no evaluated domain may be predicted worse than
  at the reference, so a better mean cannot be bought with a worse domain (a Pareto improvement, as the
  law sees it). The reference itself always qualifies, so the answer is predicted no worse anywhere.

Pessimism (``pessimism = k > 0``): every prediction the search compares — in the objective and in the
ceilings, the reference's included — is the law's upper bound ``L + k * spread``
(:meth:`~dataflex.mixture_law.MixtureLaw.predict_spread`: the GP's posterior standard deviation, else the
jackknife standard error). A swarm of a few runs over many domains leaves most of the simplex unvisited,
and a law's optimum there is often an artefact — e.g. a domain starved to its floor because no run showed
what that costs; the upper bound ranks such guesses behind mixtures the runs support (the conservative
counterpart of the optimism in Bayesian optimisation, where uncertainty attracts the next *experiment*;
here the main run is not an experiment one can afford to waste). ``k = 0`` is the plain law.

Search (RegMix's recipe, arXiv 2407.01492: score many random mixtures with the law, keep the best): seeded
Dirichlet candidates around the prior at several concentrations, plus the prior, uniform and the swarm's own
mixtures, are projected onto the box-simplex ``{min <= w <= max, sum w = 1}`` and pulled toward a feasible
anchor until the distance constraint holds (the feasible set is convex, so the segment stays inside); the
best candidates are refined by a shrinking local search, and for the smooth laws (``loglinear``,
``own_share``) by SLSQP with the law's gradient. The result is the best *feasible* point found. With
``average_top = k > 1`` it is the mean of the best point and the ``k - 1`` best random candidates instead
(top-k averaging of the scored candidates): a law fitted on a few runs ranks many mixtures within its own
error of the best one, and their mean depends less on which of them the fit's noise happened to put first.

Schedules (:func:`propose_schedule`): with laws fitted on the swarm's losses at several fractions of its
runs, the proposal becomes piecewise — stage ``s`` trains on ``w_s`` over fractions ``[f_(s-1), f_s)``.
The laws were fitted on constant-mixture runs, so they are applied to the *cumulative* mixture a stage end
has seen, ``c_s = sum_(r<=s) (f_r - f_(r-1)) w_r / f_s`` (the model at ``f_s`` is taken to depend on how
much of each domain it has seen, not on the order — the assumption the laws themselves make). The final
cumulative mixture is the static proposal (so the end of the run is predicted as good as with it); going
backward, each earlier ``c_s`` minimises its own law's objective over the box that keeps the next stage's
mixture within the weight bounds (``c_s = c_(s+1)`` always qualifies, so no stage end is predicted worse
than keeping the next stage end's mixture; with two stages that is the static proposal — with more, the
static proposal may not be feasible at an early stage end, and ``static_objective`` reports it for
comparison). What this aims at is a better run at intermediate points (for a run that may be stopped
early, or whose checkpoints are used), at no predicted cost at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataflex.checks import whole_number
from dataflex.mixture_law import SMOOTH_KINDS, MixtureLaw

__all__ = [
    "MixtureRegion",
    "Proposal",
    "ScheduleProposal",
    "objective_values",
    "propose_mixture",
    "propose_schedule",
    "ranking_skill",
    "repetition_caps",
]

_TOL = 1e-9


@dataclass
class Proposal:
    """The proposed mixture, the law's predicted loss per evaluated domain there, and the objective value."""

    weights: np.ndarray
    predicted: np.ndarray
    objective: float
    train_domains: list[str]
    eval_domains: list[str]

    def as_mapping(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.train_domains, self.weights)}


def repetition_caps(domain_tokens: Sequence[float], budget_tokens: float, max_epochs: float) -> np.ndarray:
    """Per-domain weight caps so that no domain is seen more than ``max_epochs`` times in a main run of
    ``budget_tokens`` tokens: ``min(1, max_epochs * tokens_d / budget)``."""
    tokens = np.asarray(domain_tokens, dtype=np.float64)
    if not (np.isfinite(tokens).all() and (tokens >= 0).all()):
        raise ValueError(f"domain_tokens must be finite and >= 0; got {tokens.tolist()}")
    if not budget_tokens > 0 or not max_epochs > 0:
        raise ValueError(f"budget_tokens and max_epochs must be > 0; got {budget_tokens!r}, {max_epochs!r}")
    return np.minimum(1.0, max_epochs * tokens / float(budget_tokens))


def objective_values(
    predicted: np.ndarray, eval_domains: Sequence[str], objective: str | Mapping[str, float]
) -> np.ndarray:
    """The objective of each row of ``predicted`` ``(mixtures, eval domains)``."""
    predicted = np.atleast_2d(predicted)
    if objective == "mean":
        return predicted.mean(1)
    if objective == "worst":
        return predicted.max(1)
    names = list(eval_domains)
    if isinstance(objective, str):
        if objective not in names:
            raise ValueError(f"objective={objective!r}; valid: 'mean', 'worst', a domain of {names} or a mapping")
        return predicted[:, names.index(objective)]
    unknown = sorted(set(objective) - set(names))
    weights = np.array([float(objective.get(n, 0.0)) for n in names])
    if unknown or not (weights >= 0).all() or weights.sum() <= 0:
        raise ValueError(
            f"objective weights must be >= 0 over evaluated domains {names}, not all 0; got {dict(objective)}"
        )
    return predicted @ (weights / weights.sum())


def ranking_skill(
    predicted: np.ndarray,
    measured: np.ndarray,
    eval_domains: Sequence[str],
    objective: str | Mapping[str, float] = "mean",
) -> float:
    """How well a law *orders* runs it was not fitted on by ``objective``: Spearman's rank correlation, across
    runs, between the objective of the held-out predictions (:meth:`MixtureLaw.held_out_error`'s
    ``predicted``) and the objective of the measured losses, both ``(runs, eval domains)``.

    A proposal is the law's best-ranked mixture, so what it needs from the law is the order of mixtures, not
    the level of their losses; a small absolute error can hide an order no better than chance (a law that
    predicts every run's mean loss nearly as the swarm's average has a small error and no order). ``<= 0``:
    the law orders held-out runs by the objective no better than chance, so its proposal is not expected to
    beat the prior. NaN when either side is constant across runs (no order to compare)."""
    predicted, measured = np.atleast_2d(predicted), np.atleast_2d(measured)
    if predicted.shape != measured.shape:
        raise ValueError(f"predicted {predicted.shape} and measured {measured.shape} losses must have one shape")
    if predicted.shape[0] < 3:
        raise ValueError(f"an order needs at least 3 runs; got {predicted.shape[0]}")
    a = objective_values(predicted, eval_domains, objective)
    b = objective_values(measured, eval_domains, objective)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def _project_box_simplex(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto ``{lo <= w <= hi, sum w = 1}`` (bisection on the shift)."""
    v = np.atleast_2d(v)
    low = (v - hi).min(1) - 1.0
    high = (v - lo).max(1) + 1.0
    for _ in range(80):
        mid = (low + high) / 2
        total = np.clip(v - mid[:, None], lo, hi).sum(1)
        low = np.where(total > 1, mid, low)
        high = np.where(total > 1, high, mid)
    return np.clip(v - ((low + high) / 2)[:, None], lo, hi)


def _distance(w: np.ndarray, prior: np.ndarray, kind: str) -> np.ndarray:
    w = np.atleast_2d(w)
    if kind == "l1":
        return np.abs(w - prior).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(w > 0, w * np.log(w / prior), 0.0)
    return terms.sum(1)


class MixtureRegion:
    """The constraint set: the box-simplex ``{min_weight <= w <= max_weight, sum w = 1}`` and an optional
    distance ball (``max_kl`` or ``max_l1``) around ``prior``. :meth:`make` maps any vector inside it;
    :meth:`check` tells whether a mixture is inside. Shared by the search and the online corrector."""

    def __init__(self, d: int, prior, min_weight, max_weight, max_kl, max_l1) -> None:
        self.prior = np.full(d, 1.0 / d) if prior is None else np.asarray(prior, dtype=np.float64)
        if self.prior.shape != (d,) or not np.isfinite(self.prior).all() or (self.prior < 0).any():
            raise ValueError(f"prior must be {d} weights >= 0 summing to 1; got {np.asarray(prior).tolist()}")
        if abs(self.prior.sum() - 1) > 1e-6:
            raise ValueError(f"prior must sum to 1; got {self.prior.sum():.6g}")
        self.lo = np.broadcast_to(np.asarray(min_weight, dtype=np.float64), (d,)).copy()  # a floor, or one per domain
        self.hi = np.ones(d) if max_weight is None else np.asarray(max_weight, dtype=np.float64)
        if self.hi.shape != (d,) or not (self.hi >= 0).all():
            raise ValueError(f"max_weight must be {d} caps >= 0; got {np.asarray(max_weight).tolist()}")
        if not ((0 <= self.lo) & (self.lo <= 1)).all():
            raise ValueError(f"min_weight must be in [0, 1]; got {min_weight!r}")
        if (self.lo > self.hi + _TOL).any() or self.lo.sum() > 1 + _TOL or self.hi.sum() < 1 - _TOL:
            raise ValueError(
                f"no mixture meets min_weight={min_weight} and caps {np.round(self.hi, 4).tolist()}: the floors "
                f"sum to {self.lo.sum():.4g} and the caps to {self.hi.sum():.4g} (need floors <= 1 <= caps)"
            )
        if max_kl is not None and max_l1 is not None:
            raise ValueError("give at most one of max_kl and max_l1")
        self.kind, self.budget = ("kl", max_kl) if max_kl is not None else ("l1", max_l1)
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"max_{self.kind} must be >= 0; got {self.budget!r}")
        if self.kind == "kl" and self.budget is not None and (self.prior == 0).any():
            raise ValueError("max_kl needs a prior with every weight > 0 (KL to a zero weight is infinite)")
        # The feasible point closest to the prior: the anchor candidates are pulled toward.
        self.anchor = _project_box_simplex(self.prior, self.lo, self.hi)[0]
        if self.budget is not None and _distance(self.anchor, self.prior, self.kind)[0] > self.budget + _TOL:
            raise ValueError(
                f"no mixture within max_{self.kind}={self.budget} of the prior meets the weight bounds (the "
                f"closest is at {_distance(self.anchor, self.prior, self.kind)[0]:.4g})"
            )

    def make(self, v: np.ndarray) -> np.ndarray:
        """Rows mapped into the feasible set: projected onto the box-simplex, then pulled toward the anchor."""
        w = _project_box_simplex(v, self.lo, self.hi)
        if self.budget is None:
            return w
        lo, hi = np.zeros(len(w)), np.ones(len(w))
        ok = _distance(w, self.prior, self.kind) <= self.budget
        lo[ok] = 1.0
        for _ in range(50):  # the distance is convex along the segment anchor -> w: bisection on the step
            mid = (lo + hi) / 2
            inside = _distance(self.anchor + mid[:, None] * (w - self.anchor), self.prior, self.kind) <= self.budget
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        return self.anchor + lo[:, None] * (w - self.anchor)

    def check(self, w: np.ndarray, tol: float = 1e-6) -> bool:
        ok = abs(w.sum() - 1) <= tol and (w >= self.lo - tol).all() and (w <= self.hi + tol).all()
        if self.budget is not None:
            ok = ok and _distance(w, self.prior, self.kind)[0] <= self.budget + tol
        return bool(ok)


# Under an own_share law a domain is predicted worse as soon as its own share drops, so "no domain worse than at
# the reference" admits (almost) only the reference itself: a silent no-op, refused instead.
OWN_SHARE_CEILING = (
    "no_worse_than cannot be used with an own_share law: it predicts each domain from its own share alone, so "
    "every domain whose share drops is predicted worse and the only admissible mixture is the reference itself; "
    "drop no_worse_than, or use law kind loglinear, gp or gbm (they model transfer between domains)"
)


def propose_mixture(
    law: MixtureLaw,
    objective: str | Mapping[str, float] = "mean",
    *,
    prior: Sequence[float] | np.ndarray | None = None,
    max_kl: float | None = None,
    max_l1: float | None = None,
    min_weight: float | Sequence[float] | np.ndarray = 0.0,
    max_weight: Sequence[float] | np.ndarray | None = None,
    no_worse_than: Sequence[float] | np.ndarray | None = None,
    pessimism: float = 0.0,
    average_top: int = 1,
    candidates: int = 20000,
    seed: int = 0,
) -> Proposal:
    """The feasible mixture with the lowest predicted ``objective``; see the module docstring.
    ``min_weight`` is one floor for every domain or one per domain; ``pessimism`` the multiple of the law's
    spread added to every prediction compared (0: the law's predictions as they are); ``average_top`` > 1
    answers the mean of that many best candidates instead of the single best (module docstring)."""
    if law.runs is None:
        raise RuntimeError("fit the law before proposing a mixture")
    average_top = whole_number("average_top", average_top)
    if not 1 <= average_top <= candidates:
        raise ValueError(f"average_top must be in [1, candidates={candidates}]; got {average_top!r}")
    if isinstance(pessimism, bool) or not (
        isinstance(pessimism, (int, float)) and np.isfinite(pessimism) and pessimism >= 0
    ):
        raise ValueError(f"pessimism must be a finite number >= 0 (a multiple of the law's spread); got {pessimism!r}")

    def bound(w: np.ndarray) -> np.ndarray:
        """What the search compares: the prediction, plus ``pessimism`` spreads."""
        predicted = law.predict(w)
        return predicted + pessimism * law.predict_spread(w) if pessimism > 0 else predicted

    train, evaluated = law.runs.train_domains, law.runs.eval_domains
    d = len(train)
    region = MixtureRegion(d, prior, min_weight, max_weight, max_kl, max_l1)
    reference, ceiling = None, None
    if no_worse_than is not None:
        if law.kind == "own_share":
            raise ValueError(OWN_SHARE_CEILING)
        reference = np.asarray(no_worse_than, dtype=np.float64)
        if reference.shape != (d,) or not region.check(reference):
            raise ValueError(
                f"no_worse_than must be a mixture of the {d} training domains inside the constraints (weight "
                f"bounds, distance to the prior); got {reference.tolist()}"
            )
        ceiling = bound(reference[None])[0]

    def excess(predicted: np.ndarray) -> np.ndarray:
        """How far each row's worst domain is predicted above its ceiling (0 when none is)."""
        return np.zeros(len(predicted)) if ceiling is None else np.maximum(predicted - ceiling, 0).max(1)

    def score(w: np.ndarray) -> np.ndarray:
        # A row above a ceiling ranks after every row within them (the reference itself is within).
        predicted = bound(w)  # once per call: the search calls this on tens of thousands of rows
        over = excess(predicted)
        return np.where(over > 0, 1e6 + over, objective_values(predicted, evaluated, objective))

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x3C]))
    base = np.maximum(region.prior, 1e-3)
    draws = [
        rng.dirichlet(alpha * base / base.sum() * d, size=max(1, candidates // 5)) for alpha in (0.3, 1, 3, 10, 50)
    ]
    extra = [] if reference is None else [reference]
    pool = np.vstack([region.prior, np.full(d, 1.0 / d), law.runs.weights, *extra, *draws])
    pool = region.make(pool)
    values = score(pool)
    order = np.argsort(values, kind="stable")[:8]
    best_w, best_v = pool[order[0]], float(values[order[0]])
    for start in pool[order]:  # local search around the best candidates, with a shrinking step
        w, v = start.copy(), float(score(start[None])[0])
        for step in (0.3, 0.1, 0.03, 0.01, 0.003):
            for _ in range(6):
                trial = region.make(w + rng.normal(0, step, size=(64, d)) * np.maximum(w, step))
                tv = score(trial)
                if tv.min() < v:
                    w, v = trial[int(np.argmin(tv))], float(tv.min())
        if v < best_v:
            best_w, best_v = w, v
    if law.kind in SMOOTH_KINDS and ceiling is None and pessimism == 0:  # SLSQP knows neither ceilings nor spreads
        refined = _refine_smooth(law, objective, region, best_w)
        if refined is not None:
            rv = float(score(refined[None])[0])
            if rv < best_v:
                best_w, best_v = refined, rv
    if average_top > 1:
        best_w, best_v = _average_of_best(pool, values, best_w, average_top, region, score)
    predicted = law.predict(best_w[None])
    if not region.check(best_w) or excess(bound(best_w[None]))[0] > 0:
        raise RuntimeError(f"internal error: the proposed mixture {best_w.tolist()} violates the constraints")
    return Proposal(best_w, predicted[0], best_v, list(train), list(evaluated))


def _average_of_best(
    pool: np.ndarray, values: np.ndarray, best: np.ndarray, k: int, region: MixtureRegion, score: Any
) -> tuple[np.ndarray, float]:
    """The mean of the search's ``best`` and the ``k - 1`` best of ``pool`` (top-k averaging).

    The feasible region is convex, so the mean is inside it. A ceiling (``no_worse_than``) need not be under a
    non-linear law: when the mean is above one, the answer moves back along the segment to ``best`` (halving
    the distance, at most 6 times; ``best`` itself is within every ceiling).
    """
    mean = np.vstack([best[None], pool[np.argsort(values, kind="stable")][: k - 1]]).mean(axis=0)
    for t in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125):
        w = region.make((best + t * (mean - best))[None])[0]
        v = float(score(w[None])[0])
        if v < 1e6:  # within every ceiling (score ranks a row above one at 1e6 and beyond)
            return w, v
    return best, float(score(best[None])[0])


def _refine_smooth(law: MixtureLaw, objective: Any, region: MixtureRegion, start: np.ndarray) -> np.ndarray | None:
    """SLSQP from ``start`` on a smooth law (loglinear, own_share; epigraph form for ``"worst"``); None if it fails."""
    from scipy.optimize import minimize

    d = start.size
    names = law.runs.eval_domains
    worst = objective == "worst"
    if not worst:
        mix = objective_values(np.eye(len(names)), names, objective)  # the objective's weight per eval domain

    def split(x):
        return (x[:d], x[d]) if worst else (x, None)

    def fun(x):
        w, s = split(x)
        return s if worst else float(law.predict(w[None])[0] @ mix)

    def jac(x):
        w, _ = split(x)
        if worst:
            g = np.zeros(d + 1)
            g[d] = 1.0
            return g
        return mix @ law.gradient(w)

    constraints = [
        {"type": "eq", "fun": lambda x: split(x)[0].sum() - 1.0, "jac": lambda x: np.r_[np.ones(d), 0][: x.size]}
    ]
    if worst:
        constraints.append(
            {
                "type": "ineq",
                "fun": lambda x: x[d] - law.predict(x[None, :d])[0],
                "jac": lambda x: np.hstack([-law.gradient(x[:d]), np.ones((len(names), 1))]),
            }
        )
    if region.budget is not None:
        constraints.append(
            {"type": "ineq", "fun": lambda x: region.budget - _distance(split(x)[0], region.prior, region.kind)[0]}
        )
    bounds = [(lo, hi) for lo, hi in zip(region.lo, region.hi)] + ([(None, None)] if worst else [])
    x0 = np.r_[start, law.predict(start[None])[0].max()] if worst else start
    try:
        result = minimize(
            fun,
            x0,
            jac=jac,
            bounds=bounds,
            constraints=constraints,
            method="SLSQP",
            options={"maxiter": 300, "ftol": 1e-12},
        )
    except (ValueError, ArithmeticError):
        return None
    w = np.clip(split(result.x)[0], region.lo, region.hi)
    w = w / w.sum()
    return w if region.check(w) else None


@dataclass
class ScheduleProposal:
    """A piecewise mixture: stage ``s`` trains on ``weights[s]`` from fraction ``starts[s]`` of the run.

    ``cumulative[s]`` is the mixture seen by the end of stage ``s``, ``predicted[s]`` the law's losses there
    (per evaluated domain), ``objective[s]`` their objective and ``static_objective[s]`` the same law's
    objective for the static proposal at that point (what the schedule is compared with).
    """

    starts: list[float]
    weights: np.ndarray
    cumulative: np.ndarray
    predicted: np.ndarray
    objective: list[float]
    static_objective: list[float]
    train_domains: list[str]
    eval_domains: list[str]

    def stages(self) -> list[tuple[float, dict[str, float]]]:
        return [(f, {d: float(x) for d, x in zip(self.train_domains, w)}) for f, w in zip(self.starts, self.weights)]

    def to_weight_schedule(self, total_samples: int) -> Any:
        """The schedule as a :class:`~dataflex.schedule.WeightSchedule` over a run of ``total_samples``."""
        from dataflex.schedule import WeightSchedule

        if not (isinstance(total_samples, int) and total_samples > 0):
            raise ValueError(f"total_samples must be a positive integer; got {total_samples!r}")
        schedule = WeightSchedule(self.train_domains, self.weights[0])
        for f, w in zip(self.starts[1:], self.weights[1:]):
            schedule.add(round(f * total_samples), w)
        return schedule


def propose_schedule(
    laws: Mapping[float, MixtureLaw],
    final: Proposal,
    objective: str | Mapping[str, float] = "mean",
    *,
    prior: Sequence[float] | np.ndarray | None = None,
    max_kl: float | None = None,
    max_l1: float | None = None,
    min_weight: float = 0.0,
    max_weight: Sequence[float] | np.ndarray | None = None,
    candidates: int = 20000,
    seed: int = 0,
) -> ScheduleProposal:
    """A piecewise schedule ending at ``final`` (a :func:`propose_mixture` result for the whole run), from
    ``laws`` fitted on the swarm's losses at fractions ``0 < f < 1`` of its runs; see the module docstring.
    The constraints are :func:`propose_mixture`'s: the bounds hold for every stage's mixture, the distance
    to the prior for every cumulative one."""
    ends = sorted(float(f) for f in laws)
    if not ends or ends[0] <= 0 or ends[-1] >= 1:
        raise ValueError(f"laws must be keyed by training fractions strictly between 0 and 1; got {ends}")
    train = final.train_domains
    for f in ends:
        if laws[f].runs is None or list(laws[f].runs.train_domains) != list(train):
            raise ValueError(f"the law at fraction {f} is not fitted on the training domains {train}")
    d = len(train)
    full = MixtureRegion(d, prior, min_weight, max_weight, max_kl, max_l1)
    bounds = [*ends, 1.0]
    cumulative = [np.asarray(final.weights, dtype=np.float64)]
    for s in range(len(ends) - 1, -1, -1):  # backward: each stage end given the next one
        f, nxt, later = bounds[s], bounds[s + 1], cumulative[0]
        span = nxt - f
        lo = np.maximum(full.lo, (nxt * later - span * full.hi) / f)
        hi = np.minimum(full.hi, (nxt * later - span * full.lo) / f)
        law = laws[f]

        def score(w: np.ndarray, law: MixtureLaw = law) -> float:
            return float(objective_values(law.predict(w[None]), law.runs.eval_domains, objective)[0])

        best = later.copy()  # keeping the next stage's cumulative mixture is always feasible
        try:
            found = propose_mixture(
                law,
                objective,
                prior=full.prior,
                max_kl=max_kl,
                max_l1=max_l1,
                min_weight=np.minimum(lo, later),
                max_weight=np.maximum(hi, later),
                candidates=candidates,
                seed=seed + s + 1,
            ).weights
            if score(found) < score(best):
                best = found
        except ValueError:  # the box and the distance ball meet only near ``later``: keep it
            pass
        cumulative.insert(0, best)
    cumulative_arr = np.array(cumulative)
    fractions = np.array(bounds)
    mass = cumulative_arr * fractions[:, None]  # data seen per domain by each stage end (in run fractions)
    weights = np.diff(np.vstack([np.zeros(d), mass]), axis=0) / np.diff(np.r_[0.0, fractions])[:, None]
    outside = (weights < full.lo - 1e-6) | (weights > full.hi + 1e-6)
    if outside.any():
        raise RuntimeError(f"internal error: stage mixtures {weights.tolist()} violate the weight bounds")
    weights = np.clip(weights, full.lo, full.hi)  # rounding only (checked above)
    weights /= weights.sum(1, keepdims=True)
    stage_laws = [*(laws[f] for f in ends), None]
    predicted, values, static = [], [], []
    for law, c in zip(stage_laws, cumulative_arr):
        if law is None:  # the final stage: the final proposal's own law
            predicted.append(final.predicted)
            values.append(final.objective)
            static.append(final.objective)
            continue
        p = law.predict(c[None])[0]
        predicted.append(p)
        values.append(float(objective_values(p[None], law.runs.eval_domains, objective)[0]))
        static.append(float(objective_values(law.predict(final.weights[None]), law.runs.eval_domains, objective)[0]))
    return ScheduleProposal(
        starts=[0.0, *ends],
        weights=weights,
        cumulative=cumulative_arr,
        predicted=np.array(predicted),
        objective=values,
        static_objective=static,
        train_domains=list(train),
        eval_domains=list(final.eval_domains),
    )
