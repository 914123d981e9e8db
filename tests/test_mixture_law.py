"""Mixture laws (fit, held-out error, save/load) and the constrained mixture search over them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataflex.mixture_law import LAW_KINDS, MixtureLaw, SwarmRuns
from dataflex.mixture_search import (
    objective_values,
    propose_mixture,
    propose_schedule,
    ranking_skill,
    repetition_caps,
)

DOMAINS = ["a", "b", "c", "d", "e"]


def synthetic_loglinear(seed: int = 0, runs: int = 40, noise: float = 0.002):
    """Runs drawn from a known law L_i = c_i + exp(log k_i + w @ t_i), its parameters in the mean-0 gauge."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-3, 1, (3, 5))
    c, log_k = rng.uniform(1, 2, 3), rng.uniform(-1, 0.5, 3)
    weights = rng.dirichlet(np.ones(5), runs)
    losses = c + np.exp(log_k + weights @ t.T) + rng.normal(0, noise, (runs, 3))
    truth = {"c": c, "log_k": log_k + t.mean(1), "t": t - t.mean(1, keepdims=True)}

    def law(w):
        return c + np.exp(log_k + np.atleast_2d(w) @ t.T)

    return SwarmRuns(weights, losses, DOMAINS, ["x", "y", "z"]), truth, law


def diagonal_law(seed: int = 1):
    """L_i = c_i + k_i exp(-s_i w_i): the mean's optimum solves k_i s_i exp(-s_i w_i) = lambda (KKT)."""
    rng = np.random.default_rng(seed)
    s, k, c = rng.uniform(2, 6, 5), rng.uniform(0.5, 2, 5), rng.uniform(1, 2, 5)
    weights = rng.dirichlet(np.ones(5), 60)
    runs = SwarmRuns(weights, c + k * np.exp(-weights * s), DOMAINS, DOMAINS)

    def optimum_for(lam):
        return np.maximum(0.0, (np.log(k * s) - np.log(lam)) / s)

    lo, hi = 1e-9, 1e3  # bisection on the multiplier until the weights sum to 1
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if optimum_for(mid).sum() > 1 else (lo, mid)
    return runs, optimum_for(lo)


def test_loglinear_fit_recovers_the_parameters_of_a_synthetic_law():
    runs, truth, law = synthetic_loglinear()
    fitted = MixtureLaw("loglinear").fit(runs)
    assert np.abs(fitted.params[:, 0] - truth["c"]).max() < 0.03
    assert np.abs(fitted.params[:, 1] - truth["log_k"]).max() < 0.1
    assert np.abs(fitted.params[:, 2:] - truth["t"]).max() < 0.15
    fresh = np.random.default_rng(9).dirichlet(np.ones(5), 200)
    assert np.abs(fitted.predict(fresh) - law(fresh)).mean() < 0.003


def test_every_kind_reports_its_held_out_error_and_the_right_law_fits_best():
    runs, _, _ = synthetic_loglinear()
    # (own_share needs every evaluated domain among the training domains; its own test is below)
    errors = {kind: MixtureLaw(kind).held_out_error(runs, folds=5) for kind in LAW_KINDS if kind != "own_share"}
    for kind, error in errors.items():
        assert len(error["mae"]) == 3 and np.isfinite(error["predicted"]).all(), kind
        assert error["mean_mae"] > 0
    assert errors["loglinear"]["mean_mae"] < 0.005 < errors["gbm"]["mean_mae"]
    with pytest.raises(ValueError, match=r"folds must be in \[2, runs=40\]; got 1"):
        MixtureLaw("gp").held_out_error(runs, folds=1)


def test_ranking_skill_is_the_rank_correlation_of_the_objective_over_held_out_runs():
    runs, _, _ = synthetic_loglinear(runs=30)
    held = MixtureLaw("loglinear").held_out_error(runs, folds=5)["predicted"]
    assert ranking_skill(held, runs.losses, runs.eval_domains, "mean") > 0.95  # a law that knows the truth orders
    # Spearman by hand on a small case: the objective of each row, then the correlation of their ranks.
    measured = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.5], [4.0, 0.0]])  # means 1.5, 2, 2.75, 2
    predicted = np.array([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])  # means 2, 1.5, 1, 0.5
    # worst: measured 2, 2, 3, 4 (ranks 1.5, 1.5, 3, 4); predicted 4, 3, 2, 1 (ranks 4, 3, 2, 1)
    assert ranking_skill(predicted, measured, ["a", "b"], "worst") == pytest.approx(-0.9486833, abs=1e-6)
    assert ranking_skill(predicted, measured, ["a", "b"], "b") != ranking_skill(predicted, measured, ["a", "b"], "a")
    assert np.isnan(ranking_skill(np.ones((4, 2)), measured, ["a", "b"], "mean"))  # a flat law has no order
    with pytest.raises(ValueError, match=r"one shape"):
        ranking_skill(predicted[:3], measured, ["a", "b"])
    with pytest.raises(ValueError, match=r"at least 3 runs; got 2"):
        ranking_skill(predicted[:2], measured[:2], ["a", "b"])


def test_a_law_without_ranking_skill_is_named_before_the_main_runs():
    from dataflex.recipes.mixture_law import warn_if_unskilled

    with pytest.warns(UserWarning, match=r"gbm law orders .* by their mean loss no better than chance .*-0\.20 over 7"):
        warn_if_unskilled("gbm", -0.2, "mean", 7)
    with pytest.warns(UserWarning, match=r"rank correlation \+nan"):
        warn_if_unskilled("gp", float("nan"), "worst", 7)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unskilled("gp", 0.4, "mean", 7)


def test_replicates_measure_how_reproducible_the_proxies_order_is_and_are_cached(tmp_path):
    """swarm.replicates reruns the first mixtures on another data order: a proxy whose losses follow the
    mixture reproduces its order (rank 1, no warning); one whose order flips with the data order is named."""
    import warnings
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from dataflex.recipes.mixture_law import replicate_noise

    weights = np.random.default_rng(0).dirichlet(np.ones(3), 6)
    slopes = np.array([1.0, 2.0, 3.0])
    truth = 2.0 - slopes * weights  # each domain's loss falls with its share (the mean too: slopes differ)
    runs = SwarmRuns(weights, truth, ["a", "b", "c"], ["a", "b", "c"])
    cfg = OmegaConf.create({"seed": 3, "swarm": {"replicates": 4}, "propose": {"objective": "mean"}})
    calls = []

    def proxy(w, index, seed, work_name, flip=False):
        calls.append((index, seed, work_name))
        assert np.array_equal(w, weights[index]) and seed != cfg.seed  # another data order, the same mixture
        losses = 2.0 + (1 if flip else -1) * slopes * weights[index] + [0.0, 0.001 * index, 0.0]
        return {"losses": dict(zip("abc", losses.tolist())), "seconds": 1.5}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noise = replicate_noise(cfg, SimpleNamespace(folder=tmp_path), runs, proxy)
    assert [c[0] for c in calls] == [0, 1, 2, 3] and noise["runs"] == 4 and noise["seconds"] == 6.0
    assert noise["domain_rank"]["a"] == pytest.approx(1.0) and noise["replicate_sd"] < 0.002
    assert noise["between_sd"] == pytest.approx(np.std(truth.mean(1), ddof=1))
    again = replicate_noise(cfg, SimpleNamespace(folder=tmp_path), runs, proxy)
    assert len(calls) == 4 and again["losses"] == noise["losses"]  # cached: no run redone

    flipped = tmp_path / "flipped"
    flipped.mkdir()
    cfg.propose.objective = "a"
    with pytest.warns(UserWarning, match=r"do not reproduce their order of mixtures by a loss .*-1\.00 over 4"):
        noise = replicate_noise(cfg, SimpleNamespace(folder=flipped), runs, lambda *a, **k: proxy(*a, **k, flip=True))
    assert noise["objective_rank"] == pytest.approx(-1.0)


def test_a_training_domain_the_law_cannot_evaluate_is_named_before_any_run():
    import warnings

    from dataflex.recipes.mixture_law import warn_of_unevaluated_domains

    with pytest.warns(UserWarning, match=r"training domains \['trivia'\] have no validation examples"):
        warn_of_unevaluated_domains(["code", "trivia"], ["code", "code", "held_out_target"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_of_unevaluated_domains(["code"], ["code", "held_out_target"])  # a target-only domain is fine


@pytest.mark.parametrize("kind", LAW_KINDS)
def test_a_saved_law_predicts_the_same_after_loading(tmp_path, kind):
    runs = diagonal_law()[0].subset(np.arange(25))
    law = MixtureLaw(kind, seed=3).fit(runs)
    law.save(tmp_path / "law.json")
    again = MixtureLaw.load(tmp_path / "law.json")
    probe = np.random.default_rng(2).dirichlet(np.ones(5), 20)
    assert again.kind == kind and np.allclose(again.predict(probe), law.predict(probe), rtol=0, atol=1e-9)
    assert again.runs.state_dict() == runs.state_dict()  # saved with the runs it came from


def test_bad_runs_and_saved_laws_are_refused(tmp_path):
    runs, _, _ = synthetic_loglinear(runs=12)
    bad = runs.weights.copy()
    bad[3] = [0.5, 0.5, 0.5, -0.5, 0.0]
    with pytest.raises(ValueError, match=r"runs \[3\] have weights that are not a mixture"):
        SwarmRuns(bad, runs.losses, DOMAINS, ["x", "y", "z"])
    losses = runs.losses.copy()
    losses[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"runs \[5\] have non-finite losses"):
        SwarmRuns(runs.weights, losses, DOMAINS, ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"losses must have shape \(12, 2\)"):
        SwarmRuns(runs.weights, runs.losses, DOMAINS, ["x", "y"])
    with pytest.raises(ValueError, match="needs at least 7 runs; got 5"):
        MixtureLaw("loglinear").fit(runs.subset(np.arange(5)))
    with pytest.raises(ValueError, match="kind='linear'; valid kinds are loglinear, gbm, gp, own_share"):
        MixtureLaw("linear")
    MixtureLaw("loglinear").fit(runs).save(tmp_path / "law.json")
    state = json.loads((tmp_path / "law.json").read_text())
    state["params"][0][2] = None
    del state["sha256"]  # a hand-edited law (no digest): its values are still checked
    (tmp_path / "law.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"params must be finite with shape \(3, 7\)"):
        MixtureLaw.load(tmp_path / "law.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved mixture law"):
        MixtureLaw.load(tmp_path / "other.json")


def synthetic_own_share(seed: int = 0, runs: int = 12, noise: float = 0.002):
    """Runs from L_i = a_i - b_i log w_i (one domain's slope 0), evaluated on the training domains."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(1, 3, 5), np.array([0.2, 0.05, 0.0, 0.1, 0.15])
    weights = rng.dirichlet(np.full(5, 4.0), runs)
    return SwarmRuns(weights, a - b * np.log(weights) + rng.normal(0, noise, (runs, 5)), DOMAINS, DOMAINS), a, b


def test_own_share_law_recovers_its_parameters_and_its_optimum_is_proportional_to_the_slopes():
    runs, a, b = synthetic_own_share()
    law = MixtureLaw("own_share").fit(runs)
    assert np.abs(law.params[:, 0] - a).max() < 0.02 and np.abs(law.params[:, 1] - b).max() < 0.01
    assert law.params[2, 1] >= 0  # a slope that noise makes negative is fitted as 0, never below
    # A domain whose loss rises with its own share (noise) gets slope 0 and its mean loss: the best line with b >= 0.
    rising = SwarmRuns(
        runs.weights, runs.losses + 0.3 * np.log(runs.weights[:, [2]]) * (np.arange(5) == 2), DOMAINS, DOMAINS
    )
    flat = MixtureLaw("own_share").fit(rising)
    assert flat.params[2, 1] == 0 and flat.params[2, 0] == pytest.approx(rising.losses[:, 2].mean())
    # The gradient is the law's derivative (finite differences), zero off the diagonal and below the floor.
    w = np.array([0.3, 0.2, 0.1, 0.25, 0.15])
    numeric = np.stack(
        [(law.predict((w + 1e-6 * e)[None])[0] - law.predict((w - 1e-6 * e)[None])[0]) / 2e-6 for e in np.eye(5)], 1
    )
    assert np.allclose(law.gradient(w), numeric, atol=1e-5)
    assert law.gradient(np.array([0.0, 0.25, 0.25, 0.25, 0.25]))[0, 0] == 0
    # Mean objective: the optimum of sum_i a_i - b_i log w_i on the simplex is w = b / sum(b) (KKT); with a floor
    # m, the floored domains sit at m and the rest share what is left in proportion to their slopes.
    assert np.abs(propose_mixture(law, "mean").weights - law.params[:, 1] / law.params[:, 1].sum()).max() < 2e-3
    floored = propose_mixture(law, "mean", min_weight=0.1).weights
    # Slopes 0.2, 0.05, 0, 0.1, 0.15: b and c fall below 0.1 at the optimum (0.05 / 0.45 * 0.8 < 0.1), the others
    # share the remaining 0.8 in proportion to their slopes.
    free = np.array([True, False, False, True, True])
    expected = np.full(5, 0.1)
    expected[free] = law.params[free, 1] / law.params[free, 1].sum() * 0.8
    assert (floored >= 0.1 - 1e-9).all() and np.abs(floored - expected).max() < 2e-3, (floored, expected)
    # "No domain worse than at uniform" would admit only uniform itself under this law: refused, not a silent no-op.
    with pytest.raises(ValueError, match="no_worse_than cannot be used with an own_share law"):
        propose_mixture(law, "mean", no_worse_than=np.full(5, 0.2))


def test_own_share_law_names_an_evaluated_domain_it_cannot_predict():
    runs, _, _ = synthetic_loglinear(runs=12)  # evaluated on x, y, z; trained on a..e
    with pytest.raises(ValueError, match=r"\['x', 'y', 'z'\] are not training domains.*use kind loglinear, gp or gbm"):
        MixtureLaw("own_share").fit(runs)


def test_the_search_finds_the_known_optimum_of_a_synthetic_law():
    runs, optimum = diagonal_law()
    assert optimum.sum() == pytest.approx(1.0) and (optimum > 0.1).sum() >= 3  # an interior optimum
    for kind, tolerance in (("loglinear", 2e-3), ("gp", 0.05)):
        proposal = propose_mixture(MixtureLaw(kind).fit(runs), "mean")
        assert np.abs(proposal.weights - optimum).max() < tolerance, (kind, proposal.weights, optimum)
    # one domain's loss alone is lowest when that domain takes everything
    target = propose_mixture(MixtureLaw("loglinear").fit(runs), "c")
    assert target.weights[2] > 0.99


def test_worst_domain_objective_is_no_worse_than_the_mean_optimum_or_uniform():
    runs, _ = diagonal_law()
    law = MixtureLaw("loglinear").fit(runs)
    worst = propose_mixture(law, "worst")
    mean = propose_mixture(law, "mean")
    assert worst.predicted.max() <= mean.predicted.max() + 1e-9
    assert worst.predicted.max() <= law.predict(np.full(5, 0.2))[0].max()


def test_no_worse_than_keeps_every_domain_at_or_below_the_reference_and_gives_up_mean_only_for_that():
    # Eval domains depend on every training domain (transfer), so some mixtures beat uniform everywhere.
    # (With diagonal_law each domain learns from itself only: uniform is Pareto-optimal and is returned.)
    runs, _, _ = synthetic_loglinear(seed=4)
    law = MixtureLaw("loglinear").fit(runs)
    uniform = np.full(5, 0.2)
    ceiling = law.predict(uniform[None])[0]
    free = propose_mixture(law, "mean")
    assert (free.predicted > ceiling + 0.05).any()  # the unconstrained mean optimum makes a domain worse
    bound = propose_mixture(law, "mean", no_worse_than=uniform)
    assert (bound.predicted <= ceiling + 1e-12).all()
    assert free.objective <= bound.objective < ceiling.mean()  # still better on the mean than the reference
    with pytest.raises(ValueError, match="no_worse_than must be a mixture of the 5 training domains"):
        propose_mixture(law, "mean", no_worse_than=[0.5, 0.5])
    with pytest.raises(ValueError, match="inside the constraints"):
        propose_mixture(law, "mean", no_worse_than=[0.6, 0.1, 0.1, 0.1, 0.1], max_l1=0.3)
    diagonal = MixtureLaw("loglinear").fit(diagonal_law()[0])
    assert np.allclose(propose_mixture(diagonal, "mean", no_worse_than=uniform).weights, uniform)


def test_a_law_is_uncertain_away_from_its_runs_and_the_jackknife_needs_one_spare_run():
    runs, _, _ = synthetic_loglinear(seed=4, runs=12, noise=0.0)
    corners = np.eye(5)
    gp = MixtureLaw("gp").fit(runs)
    assert (gp.predict_spread(corners).min(0) > 2 * gp.predict_spread(runs.weights).max(0)).all()  # per domain
    # Leave-one-run-out refits of an exact law agree wherever the runs pin it down; noise makes them differ.
    exact = MixtureLaw("loglinear").fit(runs).predict_spread(runs.weights)
    noisy_runs, _, _ = synthetic_loglinear(seed=4, runs=12, noise=0.02)
    noisy = MixtureLaw("loglinear").fit(noisy_runs).predict_spread(noisy_runs.weights)
    assert exact.shape == (12, 3) and exact.max() < 1e-3 < noisy.mean()
    with pytest.raises(ValueError, match="that needs 8 runs; it has 7"):
        MixtureLaw("loglinear").fit(runs.subset(np.arange(7))).predict_spread(runs.weights)


@pytest.mark.slow  # (seconds of training; .ci/run runs it)
def test_pessimism_keeps_the_proposal_where_the_runs_give_evidence():
    """Runs in a tight cluster around uniform: the plain GP's optimum lies far from every run, where it
    guesses; one spread of pessimism brings the proposal toward the runs and, here, to a better true loss.
    No proposal's upper bound breaks the ceilings, and pessimism 0 is the plain search."""
    _, _, true_law = synthetic_loglinear(seed=4)
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(5, 10.0), 12)
    runs = SwarmRuns(weights, true_law(weights) + rng.normal(0, 0.002, (12, 3)), DOMAINS, ["x", "y", "z"])
    law = MixtureLaw("gp").fit(runs)
    plain = propose_mixture(law, "mean", max_l1=1.5)
    careful = propose_mixture(law, "mean", max_l1=1.5, pessimism=1.0)
    nearest = [np.abs(runs.weights - p.weights).sum(1).min() for p in (plain, careful)]
    assert nearest[1] < nearest[0] - 0.3, nearest
    assert true_law(careful.weights).mean() < true_law(plain.weights).mean() - 0.05
    assert np.allclose(careful.predicted, law.predict(careful.weights[None])[0])  # the law's own prediction
    assert np.array_equal(propose_mixture(law, "mean", max_l1=1.5, pessimism=0).weights, plain.weights)
    uniform = np.full(5, 0.2)
    bounded = propose_mixture(law, "mean", max_l1=1.5, pessimism=1.0, no_worse_than=uniform)
    upper = law.predict(bounded.weights[None]) + law.predict_spread(bounded.weights[None])
    assert (upper <= law.predict(uniform[None]) + law.predict_spread(uniform[None]) + 1e-12).all()
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match=f"pessimism must be a finite number >= 0.*got {bad!r}"):
            propose_mixture(law, "mean", pessimism=bad)


@pytest.mark.slow  # (seconds of training; .ci/run runs it)
def test_averaging_the_top_candidates_stays_feasible_and_is_their_mean():
    """Top-k averaging: the answer is the mean of the best point and the k - 1 best candidates, inside
    every constraint (the region is convex; a ceiling is checked), near the best point, and k = 1 is the plain
    search."""
    runs, optimum = diagonal_law()
    law = MixtureLaw("gp").fit(runs)
    best = propose_mixture(law, "mean", min_weight=0.05, max_l1=0.5)
    assert np.array_equal(
        propose_mixture(law, "mean", min_weight=0.05, max_l1=0.5, average_top=1).weights, best.weights
    )
    averaged = propose_mixture(law, "mean", min_weight=0.05, max_l1=0.5, average_top=50)
    w = averaged.weights
    assert w.sum() == pytest.approx(1.0, abs=1e-9) and (w >= 0.05 - 1e-9).all()
    assert np.abs(w - 0.2).sum() <= 0.5 + 1e-6
    assert 0 < np.abs(w - best.weights).max() < 0.1  # a different point, close to the best one
    assert averaged.objective <= law.predict(np.full((1, 5), 0.2)).mean() and np.allclose(
        averaged.predicted, law.predict(w[None])[0]
    )
    # Under a ceiling the mean is checked too: every domain stays at or below the reference's prediction.
    loglinear, _, _ = synthetic_loglinear(seed=4)
    fitted = MixtureLaw("gbm").fit(loglinear)
    uniform = np.full(5, 0.2)
    bounded = propose_mixture(fitted, "mean", no_worse_than=uniform, average_top=200)
    assert (bounded.predicted <= fitted.predict(uniform[None])[0] + 1e-12).all()
    # (here the mean of the 200 is above a ceiling: the answer moved back toward the best point, not onto it)
    assert not np.array_equal(bounded.weights, propose_mixture(fitted, "mean", no_worse_than=uniform).weights)
    for bad in (0, 1.5, True, "3", 20001):
        with pytest.raises(ValueError, match="average_top must be"):
            propose_mixture(law, "mean", average_top=bad)


def test_the_search_respects_every_constraint():
    runs, optimum = diagonal_law()
    law = MixtureLaw("loglinear").fit(runs)
    prior = np.array([0.1, 0.1, 0.2, 0.3, 0.3])
    caps = repetition_caps([1e6, 2e6, 4e6, 1e7, 1e7], budget_tokens=2e7, max_epochs=2)
    assert caps.tolist() == [0.1, 0.2, 0.4, 1.0, 1.0]
    for kwargs in (
        {"min_weight": 0.1},
        {"max_weight": caps},
        {"prior": prior, "max_kl": 0.02},
        {"prior": prior, "max_l1": 0.1},
        {"prior": prior, "max_kl": 0.05, "min_weight": 0.05, "max_weight": caps},
    ):
        w = propose_mixture(law, "mean", **kwargs).weights
        assert w.sum() == pytest.approx(1.0, abs=1e-9) and (w >= kwargs.get("min_weight", 0) - 1e-9).all()
        if "max_weight" in kwargs:
            assert (w <= caps + 1e-9).all(), w
        if "max_kl" in kwargs:
            assert np.sum(w * np.log(np.where(w > 0, w, 1) / prior)) <= kwargs["max_kl"] + 1e-6
        if "max_l1" in kwargs:
            assert np.abs(w - prior).sum() <= kwargs["max_l1"] + 1e-6
        assert np.abs(w - optimum).max() > 1e-3, kwargs  # every case binds: the free optimum is infeasible


def test_infeasible_or_bad_constraints_are_named():
    runs, _ = diagonal_law()
    law = MixtureLaw("loglinear").fit(runs)
    with pytest.raises(ValueError, match=r"no mixture meets min_weight=0.3 .* floors sum to 1.5"):
        propose_mixture(law, min_weight=0.3)
    with pytest.raises(ValueError, match="caps to 0.5"):
        propose_mixture(law, max_weight=[0.1] * 5)
    with pytest.raises(ValueError, match=r"no mixture within max_kl=0.01 of the prior meets the weight bounds"):
        propose_mixture(law, prior=[0.6, 0.1, 0.1, 0.1, 0.1], max_kl=0.01, max_weight=[0.3] * 5)
    with pytest.raises(ValueError, match="give at most one of max_kl and max_l1"):
        propose_mixture(law, max_kl=0.1, max_l1=0.1)
    with pytest.raises(ValueError, match=r"objective='q'; valid: 'mean', 'worst', a domain of"):
        propose_mixture(law, "q")
    with pytest.raises(ValueError, match="objective weights must be >= 0 over evaluated domains"):
        objective_values(np.ones((2, 5)), DOMAINS, {"zz": 1.0})
    with pytest.raises(ValueError, match="prior must sum to 1"):
        propose_mixture(law, prior=[0.5, 0.5, 0.5, 0.0, 0.0])


class Killed(Exception):
    pass


def test_an_interrupted_swarm_resumes_without_redoing_finished_runs(tmp_path):
    from dataflex.swarm import Swarm

    runs, _, law = synthetic_loglinear()
    calls = []

    def train(weights, index):
        calls.append(index)
        if index == 5 and calls.count(5) == 1:
            raise Killed  # the process dies half-way through the swarm
        losses = law(weights)[0]
        return {
            "losses": dict(zip(["x", "y", "z"], losses.tolist())),
            "tokens": {d: 100.0 * w for d, w in zip(DOMAINS, weights)},
        }

    swarm = Swarm(tmp_path / "swarm", DOMAINS, size=10, concentration=4.0, seed=7, extra={"steps": 50})
    with pytest.raises(Killed):
        swarm.run(train, progress=False)
    assert calls == [0, 1, 2, 3, 4, 5] and swarm.pending() == [5, 6, 7, 8, 9]
    again = Swarm(tmp_path / "swarm", DOMAINS, size=10, concentration=4.0, seed=7, extra={"steps": 50})
    assert again.run(train, progress=False) == [5, 6, 7, 8, 9]
    assert calls == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9] and again.pending() == []
    collected = again.collect()
    assert len(collected) == 10 and collected.eval_domains == ["x", "y", "z"]
    # a run's mixture is a pure function of the settings and its index (any order, any process)
    assert np.array_equal(
        collected.weights[3], Swarm(tmp_path / "other", DOMAINS, size=10, concentration=4.0, seed=7).mixture(3)
    )
    assert np.allclose(again.tokens().sum(1), 100.0)
    with pytest.raises(ValueError, match=r"holds a swarm made with other settings .*'seed': \(7, 8\)"):
        Swarm(tmp_path / "swarm", DOMAINS, size=10, concentration=4.0, seed=8, extra={"steps": 50})
    with pytest.raises(ValueError, match=r"run index 12 is outside the swarm's 0..9"):
        again.pending([12])


def test_a_swarm_refuses_bad_settings_and_results(tmp_path):
    from dataflex.swarm import Swarm

    with pytest.raises(ValueError, match="prior must be 2 weights > 0"):
        Swarm(tmp_path / "a", ["p", "q"], prior=[1.0, 0.0])
    with pytest.raises(ValueError, match="size must be a positive integer; got 0"):
        Swarm(tmp_path / "b", ["p", "q"], size=0)
    swarm = Swarm(tmp_path / "c", ["p", "q"], size=2)
    with pytest.raises(ValueError, match=r"run 0: non-finite validation losses \{'v': nan\}"):
        swarm.run(lambda w, i: {"losses": {"v": float("nan")}, "tokens": {"p": 1, "q": 1}}, progress=False)
    with pytest.raises(ValueError, match=r"run 0: train must return 'tokens' for exactly the domains \['p', 'q'\]"):
        swarm.run(lambda w, i: {"losses": {"v": 1.0}, "tokens": {"p": 1}}, progress=False)
    assert swarm.pending() == [0, 1]  # nothing written for a refused result


def law_stats(losses, counts=None):
    from dataflex.store import DomainStats

    losses = np.asarray(losses, dtype=np.float64)
    counts = np.ones(losses.size) if counts is None else np.asarray(counts, dtype=np.float64)
    return DomainStats(loss_sum=losses * counts, count=counts, non_finite=0, masked=0)


def bound_corrector(**kwargs):
    from dataflex.policies import LawCorrected

    policy = LawCorrected(dict(zip(DOMAINS, [0.3, 0.3, 0.2, 0.1, 0.1])), dict.fromkeys(DOMAINS, 2.0), **kwargs)
    policy.bind(DOMAINS, np.full(5, 100))
    return policy


def test_the_online_corrector_moves_toward_a_lagging_domain_and_stays_in_its_trust_region():
    policy = bound_corrector(radius=0.2, step=3.0, max_weight=dict(zip(DOMAINS, [1, 1, 1, 1, 0.15])))
    w0 = policy.initial_weights()
    assert w0.tolist() == [0.3, 0.3, 0.2, 0.1, 0.1]
    lagging = policy.update(law_stats([2.0, 2.0, 2.0, 2.0, 3.0]), w0)  # e: higher than predicted, vs the rest
    assert lagging[4] > 0.1 and lagging[4] <= 0.15 + 1e-12 and abs(lagging.sum() - 1) < 1e-12
    rng = np.random.default_rng(0)
    current = lagging
    for _ in range(200):  # any loss pattern, any missing domain: always inside the region
        losses = rng.uniform(0.5, 8.0, 5)
        counts = rng.integers(0, 3, 5)
        current = policy.update(law_stats(losses, counts), current)
        assert np.abs(current - w0).sum() <= 0.2 + 1e-9 and current.max() <= 1 and current[4] <= 0.15 + 1e-9
        assert (current >= 0).all() and abs(current.sum() - 1) < 1e-9
    frozen = bound_corrector(radius=0.0)
    assert np.allclose(frozen.update(law_stats([1, 9, 1, 9, 1]), w0), w0)  # radius 0 is Static(w0)


def test_the_online_corrector_resumes_exactly_and_refuses_bad_state():
    rng = np.random.default_rng(1)
    windows = [law_stats(rng.uniform(1, 4, 5), rng.integers(0, 3, 5)) for _ in range(12)]
    full = bound_corrector()
    w = full.initial_weights()
    reference = []
    for stats in windows:
        w = full.update(stats, w)
        reference.append(w)
    first = bound_corrector()
    w = first.initial_weights()
    for stats in windows[:5]:
        w = first.update(stats, w)
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as a checkpoint does
    second = bound_corrector()
    second.load_state_dict(state)
    for i, stats in enumerate(windows[5:], start=5):
        w = second.update(stats, w)
        assert np.array_equal(w, reference[i])
    with pytest.raises(ValueError, match="LawCorrected state has 3 domains, this run has 5"):
        bound_corrector().load_state_dict({"t": 1, "ratio": [0.1, None, 0.2]})
    with pytest.raises(ValueError, match="LawCorrected state 't' must be an integer >= 0; got -1"):
        bound_corrector().load_state_dict({"t": -1, "ratio": None})
    with pytest.raises(ValueError, match="radius must be in"):
        bound_corrector(radius=3)
    with pytest.raises(ValueError, match=r"the proposal .* is outside the weight bounds"):
        bound_corrector(max_weight={"a": 0.1})


@pytest.mark.slow
def test_mixture_law_recipe_runs_every_stage_and_continues_where_it_stopped(tmp_path):
    """One command: swarm -> fit -> propose -> main runs and the table; a swarm member alone (a parallel job)
    first, then the whole command, which skips it; a rerun trains nothing."""
    import subprocess
    import sys

    base = [
        sys.executable,
        "-m",
        "dataflex.recipes.mixture_law",
        "swarm.size=6",
        "swarm.steps=4",
        "law.folds=2",
        "law.kinds=[gp,gbm]",
        "main.steps=4",
        "main.update_every=2",
        "main.ckpt_every=2",
        "data.val_per_domain=4",
        "data.train_per_domain=20",
        "work_dir=work",
    ]
    one = subprocess.run([*base, "stage=swarm", "swarm.run_index=2"], capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    work = tmp_path / "work" / "seed0"
    (folder,) = work.glob("swarm-*")
    assert sorted(p.name for p in folder.glob("run-*.json")) == ["run-00002.json"]
    first_member = (folder / "run-00002.json").read_text()
    done = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(folder.glob("run-*.json"))) == 6
    assert (folder / "run-00002.json").read_text() == first_member  # not redone
    summary = json.loads((work / "results.json").read_text())
    assert set(summary["arms"]) == {"law", "law_static", "law_schedule", "uniform", "natural"}
    assert summary["swarm_steps"] == 24
    own = sum(json.loads(p.read_text())["seconds"] for p in folder.glob("run-*.json"))
    assert summary["swarm_seconds"] == pytest.approx(own) and summary["proposal"]["spread"] is None
    stages = summary["proposal"]["schedule"]["stages"]  # swarm.stages=2: a half-way law, a switch at step 2
    assert [s for s, _ in stages] == [0, 2] and all(abs(sum(w.values()) - 1) < 1e-9 for _, w in stages)
    assert json.loads((folder / "run-00002.json").read_text())["losses_at"][0]["fraction"] == 0.5
    proposal = summary["proposal"]["weights"]
    assert abs(sum(proposal.values()) - 1) < 1e-9 and min(proposal.values()) >= 0.02 - 1e-9
    assert set(summary["held_out_rank"]) == {"gp", "gbm"}
    assert "| **mean** |" in done.stdout and (work / "predicted_vs_measured.png").is_file()
    again = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "swarm:" not in again.stderr  # every stage cached
    assert json.loads((work / "results.json").read_text()) == summary
    # Other proposal settings: a new proposal and new law arms; the swarm, the law and the baselines are reused.
    before = {p.name for p in (work / "main").glob("*.json")}
    other = subprocess.run(
        [*base, "propose.min_weight=0.05", "propose.pessimism=1"], capture_output=True, text=True, cwd=tmp_path
    )
    assert other.returncode == 0, other.stderr[-3000:]
    assert len(list(work.glob("proposal-*.json"))) == 2 and len(list(work.glob("law-*.json"))) == 1
    new = {p.name for p in (work / "main").glob("*.json")} - before
    assert sorted(n.rsplit("-", 1)[0] for n in new) == ["law", "law_schedule", "law_static"]
    careful = json.loads((work / "results.json").read_text())["proposal"]
    assert min(careful["weights"].values()) >= 0.05 - 1e-9
    assert set(careful["spread"]) == set(careful["predicted"]) and min(careful["spread"].values()) > 0
    # A weighted objective: proposed for it, and its value per arm in the table beside mean and worst.
    weighted = [*base, "propose.objective={code:2,fiction:1}"]
    weighted = subprocess.run(weighted, capture_output=True, text=True, cwd=tmp_path)
    assert weighted.returncode == 0, weighted.stderr[-3000:]
    summary = json.loads((work / "results.json").read_text())
    assert summary["objective"] == {"code": 2.0, "fiction": 1.0}
    law_test = summary["arms"]["law"]["test"]
    label = "| **objective (code 2, fiction 1)** |"
    row = next(line for line in weighted.stdout.splitlines() if line.startswith(label))
    assert row.split("|")[3].strip() == f"{(2 * law_test['code'] + law_test['fiction']) / 3:.3f}"  # (the law arm)


@pytest.mark.parametrize(
    "override,message",
    [
        ("stage=train", "stage='train'; valid values are swarm, fit, propose, main, all"),
        ("swarm.size=0", "swarm.size must be a positive integer; got 0"),
        ("swarm.run_index=20", r"swarm.run_index=20 is outside the swarm's 0..13"),
        ("swarm.val_per_domain=0", "swarm.val_per_domain must be a positive integer; got 0"),
        ("swarm.prior=zipf", "swarm.prior='zipf'; valid values are uniform, natural"),
        ("swarm.replicates=2", r"swarm.replicates=2: rerun 0 \(none\) or between 3 .* swarm.size=14"),
        ("swarm.replicates=15", r"swarm.replicates=15: rerun 0"),
        ("swarm.replicates=-1", r"swarm.replicates must be an integer >= 0; got -1"),
        ("law.kinds=[linear]", "law.kinds='linear'; valid values are loglinear, gbm, gp, own_share"),
        ("law.folds=1", r"law.folds must be in \[2, swarm.size=14\]; got 1"),
        ("propose.max_kl=0.1", "give at most one of propose.max_kl and propose.max_l1"),
        ("propose.min_weight=1", r"propose.min_weight must be a number in \[0, 1\); got 1"),
        ("propose.no_worse_than=uniform", "propose.no_worse_than must be null or prior; got 'uniform'"),
        (
            "propose.no_worse_than=prior law.kinds=[gp,own_share]",
            "no_worse_than=prior with law.kinds=.*cannot be used with an own_share law",
        ),
        ("correct.radius=-1", r"correct.radius must be a number in \[0, 2\]; got -1"),
        ("propose.pessimism=-0.5", "propose.pessimism must be a number >= 0 .* got -0.5"),
        ("main.steps=abc", "main.steps must be a positive integer; got 'abc'"),
        ("seed=-3", r"seed must be an integer in \[0, 2\*\*32\); got -3"),
        ("swarm.stages=3", "swarm.steps=50 must be a multiple of swarm.stages=3"),
        (
            "main.update_every=60",
            r"start at main steps \[350.0\], and \[350.0\] are not multiples of main.update_every=60",
        ),
        (
            "main.baselines=[uniform,doremii]",
            "main.baselines='doremii'; valid values are uniform, natural, odm, doremi",
        ),
        ("main.baselines=doremii", "main.baselines='doremii'; valid values are"),  # (one name alone: not its letters)
        ("propose.objective={code:abc}", r"propose.objective must be .*\{domain: weight\}.*got \{'code': 'abc'\}"),
        ("propose.objective={code:0}", r"propose.objective must be .*not all 0; got \{'code': 0\}"),
        ("propose.objective=[code]", r"propose.objective must be mean, worst, .*got \['code'\]"),
    ],
)
def test_bad_mixture_law_overrides_name_the_key(override, message):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dataflex.recipes.mixture_law import STAGES
    from dataflex.recipes.settings import check_mixture_law_settings

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        check_mixture_law_settings(compose(config_name="mixture_law"), STAGES)
        cfg = compose(config_name="mixture_law", overrides=override.split(" "))
    with pytest.raises(ValueError, match=message):
        check_mixture_law_settings(cfg, STAGES)


def test_one_name_where_a_list_belongs_and_a_weighted_objective_are_taken_as_meant(tmp_path):
    """``law.kinds=gp`` on a command line was checked letter by letter ("law.kinds='g'"); a weighted objective,
    which the search takes, was refused by the recipe; and an objective naming a domain that is not evaluated was
    refused only after the whole swarm had run."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dataflex.recipes.mixture_law import STAGES, run_stages
    from dataflex.recipes.settings import check_mixture_law_settings
    from dataflex.testbeds.tiny import default_data_dir

    configs = Path(__file__).resolve().parents[1] / "configs"
    overrides = ["law.kinds=gp", "main.baselines=natural", "propose.objective={code:2,fiction:1}"]
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="mixture_law", overrides=overrides)
        check_mixture_law_settings(cfg, STAGES)
        assert list(cfg.law.kinds) == ["gp"] and list(cfg.main.baselines) == ["natural"]
        assert dict(cfg.propose.objective) == {"code": 2.0, "fiction": 1.0}
        cfg = compose(
            config_name="mixture_law", overrides=["propose.objective={code:1,cod:1}", "data.train_per_domain=5"]
        )
    with pytest.raises(
        ValueError, match=r"propose.objective weights must be >= 0 over evaluated domains \['biomedical'"
    ):
        run_stages(cfg, lambda: None, default_data_dir() / "textmix", tmp_path / "work")
    assert not (tmp_path / "work").exists()  # before any proxy run


def test_a_swarm_too_small_for_the_law_is_refused_before_any_run(tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dataflex.recipes.mixture_law import run_stages
    from dataflex.testbeds.tiny import default_data_dir

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="mixture_law", overrides=["swarm.size=6", "law.folds=2", "data.train_per_domain=5"])
    with pytest.raises(ValueError, match="law kind loglinear needs 10 runs per fit over 8 domains; with swarm.size=6"):
        run_stages(cfg, lambda: None, default_data_dir() / "textmix", tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_swarm_made_with_another_model_or_data_is_never_reused(tmp_path):
    """The swarm's losses depend on the proxy model and the data splits, not only on the mixtures: reusing a
    swarm made with another model width or validation subset would fit the law on other runs silently. Each
    gets its own folder, and a folder holding another swarm is refused."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from dataflex.recipes.mixture_law import run_stages
    from dataflex.testbeds.tiny import default_data_dir

    configs = Path(__file__).resolve().parents[1] / "configs"
    common = ["stage=swarm", "swarm.run_index=0", "swarm.steps=2", "data.train_per_domain=5", "law.kinds=[gp]"]
    for extra in ([], ["data.val_per_domain=3"], ["model.n_embd=32"], ["swarm.val_per_domain=1"]):
        with initialize_config_dir(config_dir=str(configs), version_base=None):
            cfg = compose(config_name="mixture_law", overrides=[*common, "data.val_per_domain=2", *extra])

        def make_model(cfg=cfg):
            return instantiate(cfg.model, seed=cfg.seed)

        run_stages(cfg, make_model, default_data_dir() / "textmix", tmp_path / "work")
    folders = sorted((tmp_path / "work").glob("swarm-*"))
    assert len(folders) == 4 and all(len(list(f.glob("run-*.json"))) == 1 for f in folders)
    from dataflex.swarm import Swarm

    saved = json.loads((folders[0] / "swarm.json").read_text())
    with pytest.raises(ValueError, match=r"holds a swarm made with other settings .*'steps': \(2, 3\)"):
        Swarm(
            folders[0],
            saved["domains"],
            seed=saved["seed"],
            concentration=saved["concentration"],
            prior=saved["prior"],
            extra={**{k: saved[k] for k in ("stages", "batch_size", "lr", "model", "data")}, "steps": 3},
        )


def test_a_proxy_is_scored_once_per_stage_on_its_validation_subset(tmp_path, monkeypatch):
    """swarm.val_per_domain scores the proxies on that many validation examples per domain; the losses a
    proxy keeps (half-way and final) are those of its model on exactly those examples."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from dataflex.recipes.mixture import load_split
    from dataflex.recipes.mixture_law import run_stages
    from dataflex.testbeds.tiny import default_data_dir, per_domain_loss

    configs = Path(__file__).resolve().parents[1] / "configs"
    overrides = ["stage=swarm", "swarm.run_index=0", "swarm.steps=2", "data.train_per_domain=5", "law.kinds=[gp]"]
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="mixture_law", overrides=[*overrides, "swarm.val_per_domain=2"])
    models, evaluated = [], []
    real = per_domain_loss

    def counting(model, ds, domains, **kw):
        evaluated.append(len(ds))
        return real(model, ds, domains, **kw)

    def make_model():
        models.append(instantiate(cfg.model, seed=cfg.seed))
        return models[-1]

    root = default_data_dir() / "textmix"
    monkeypatch.setattr("dataflex.recipes.mixture.per_domain_loss", counting)
    run_stages(cfg, make_model, root, tmp_path / "work")
    assert evaluated == [16, 16]  # half-way and end, 2 examples x 8 domains; no extra pass afterwards
    (run,) = (tmp_path / "work").glob("swarm-*/run-00000.json")
    kept = json.loads(run.read_text())["losses"]
    subset = load_split(root, "validation", cfg.data.max_len, 2)
    assert kept == pytest.approx(per_domain_loss(models[-1], subset, subset["domain"]), rel=1e-6)


def test_a_proposed_schedule_ends_at_the_static_proposal_and_does_better_before():
    """Stage ends are scored by the law fitted at their fraction on the cumulative mixture: the end is the
    static proposal, the half-way point the best mixture the bounds allow there (checked by brute force)."""
    final_law = MixtureLaw("loglinear").fit(diagonal_law(1)[0])
    half_law = MixtureLaw("loglinear").fit(diagonal_law(4)[0])
    final = propose_mixture(final_law, "mean", min_weight=0.02, max_l1=0.8)
    plan = propose_schedule({0.5: half_law}, final, "mean", min_weight=0.02, max_l1=0.8)
    assert plan.starts == [0.0, 0.5] and np.allclose(plan.cumulative[-1], final.weights)
    assert np.allclose(plan.weights.sum(1), 1.0) and (plan.weights >= 0.02 - 1e-9).all()
    assert np.allclose(0.5 * plan.weights[0] + 0.5 * plan.weights[1], final.weights, atol=1e-6)
    assert np.abs(plan.cumulative - 0.2).sum(1).max() <= 0.8 + 1e-6  # every cumulative mixture near the prior
    assert plan.objective[-1] == pytest.approx(plan.static_objective[-1])
    assert plan.objective[0] < plan.static_objective[0] - 1e-3  # the laws differ: the first half gains
    # brute force over mixtures that keep both stages feasible (a domain at the floor in the static
    # proposal is pinned there in both halves)
    rng = np.random.default_rng(0)
    pinned = final.weights <= 0.02 + 1e-9
    c0 = np.tile(final.weights, (200_000, 1))
    c0[:, ~pinned] = (1 - final.weights[pinned].sum()) * rng.dirichlet(np.ones((~pinned).sum()), 200_000)
    second = 2 * final.weights - c0
    ok = (c0 >= 0.02 - 1e-12).all(1) & (second >= 0.02 - 1e-12).all(1) & (np.abs(c0 - 0.2).sum(1) <= 0.8)
    assert ok.sum() > 1000
    brute = objective_values(half_law.predict(c0[ok]), DOMAINS, "mean").min()
    assert plan.objective[0] <= brute + 1e-6
    schedule = plan.to_weight_schedule(1000)
    assert np.allclose(schedule.weights_at(499), plan.weights[0]) and np.allclose(
        schedule.weights_at(500), plan.weights[1]
    )


def test_schedule_proposals_refuse_bad_fractions():
    law = MixtureLaw("loglinear").fit(diagonal_law(1)[0])
    final = propose_mixture(law, "mean")
    for bad in ({1.0: law}, {0.0: law}, {}):
        with pytest.raises(ValueError, match="fractions strictly between 0 and 1"):
            propose_schedule(bad, final)


def test_a_piecewise_policy_switches_at_its_stage_steps_and_resumes():
    from dataflex.policies import Piecewise

    w0, w1 = [0.6, 0.1, 0.1, 0.1, 0.1], dict(zip(DOMAINS, [0.1, 0.1, 0.1, 0.1, 0.6]))
    policy = Piecewise([(0, w0), (100, w1)], update_every=50)
    policy.bind(DOMAINS, np.full(5, 10))
    stats = law_stats(np.ones(5))
    seen = [policy.initial_weights()] + [policy.update(stats, None) for _ in range(3)]
    assert np.allclose([w[0] for w in seen], [0.6, 0.6, 0.1, 0.1])  # steps 0, 50, 100, 150
    again = Piecewise([(0, w0), (100, w1)], update_every=50)
    again.bind(DOMAINS, np.full(5, 10))
    fresh = Piecewise([(0, w0), (100, w1)], update_every=50)
    fresh.bind(DOMAINS, np.full(5, 10))
    fresh.update(stats, None)
    again.load_state_dict(json.loads(json.dumps(fresh.state_dict())))
    assert again.update(stats, None)[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"stage starts \[75\] are not multiples of update_every=50"):
        Piecewise([(0, w0), (75, w1)], update_every=50)
    with pytest.raises(ValueError, match=r"must begin at step 0 and increase strictly; got \[10, 100\]"):
        Piecewise([(10, w0), (100, w1)], update_every=10)
    with pytest.raises(ValueError, match="'t' must be an integer >= 0; got -1"):
        again.load_state_dict({"t": -1})


def test_a_swarm_keeps_losses_along_its_runs_for_a_schedule(tmp_path):
    from dataflex.swarm import Swarm

    def train(weights, index):
        losses = {"x": 1.0 + weights[0], "y": 2.0}
        early = {"x": 3.0 + weights[1], "y": 4.0}
        return {
            "losses": losses,
            "tokens": dict.fromkeys(DOMAINS, 1.0),
            "losses_at": [{"fraction": 0.5, "losses": early}],
        }

    swarm = Swarm(tmp_path / "s", DOMAINS, size=4)
    swarm.run(train, progress=False)
    assert swarm.fractions() == [0.5]
    assert np.allclose(swarm.collect(0.5).losses[:, 0], 3.0 + swarm.collect().weights[:, 1])
    assert np.allclose(swarm.collect().losses[:, 0], 1.0 + swarm.collect().weights[:, 0])
    with pytest.raises(ValueError, match=r"not all evaluated at fraction 0.25; they were at \[0.5\]"):
        swarm.collect(0.25)
    bad = Swarm(tmp_path / "b", DOMAINS, size=1)
    with pytest.raises(ValueError, match="each 'losses_at' entry needs a fraction in"):
        bad.run(
            lambda w, i: {**train(w, i), "losses_at": [{"fraction": 1.5, "losses": {"x": 1.0, "y": 1.0}}]},
            progress=False,
        )
