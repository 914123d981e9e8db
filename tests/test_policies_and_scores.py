import math

import numpy as np
import pytest
import torch
from conftest import through_checkpoint

from dataflex.losses import per_example_token_loss
from dataflex.policies import ADO, ODM, LawCorrected, Natural, Static, Temperature, Uniform
from dataflex.proxies.doremi import DoReMiOffline, PreparedDoReMiOnline
from dataflex.selectors import LossFocus
from dataflex.store import DomainStats, ScoreStore

NAMES = ["a", "b", "c"]
SIZES = np.array([100.0, 10.0, 1.0])


def bound(policy):
    policy.bind(NAMES, SIZES)
    return policy


def assert_valid(w, floor=0.0):
    assert np.isfinite(w).all() and math.isclose(w.sum(), 1.0, abs_tol=1e-9) and (w >= floor - 1e-12).all(), w


def test_static_policies():
    assert np.allclose(bound(Uniform()).initial_weights(), 1 / 3)
    assert np.allclose(bound(Natural()).initial_weights(), SIZES / SIZES.sum())
    t = bound(Temperature(2.0)).initial_weights()
    assert np.allclose(t, np.sqrt(SIZES) / np.sqrt(SIZES).sum())
    assert np.allclose(bound(Static({"a": 0.5, "c": 0.5})).initial_weights(), [0.5, 0, 0.5])
    with pytest.raises(ValueError, match=r"unknown domain name\(s\) \['z'\]"):
        bound(Static({"a": 0.5, "z": 0.5})).initial_weights()
    with pytest.raises(ValueError, match="tau must be a positive"):
        Temperature(0)


def stats(loss_sum, count, non_finite=0, masked=0):
    count = np.asarray(count)
    return DomainStats(np.asarray(loss_sum, float), count, non_finite, masked)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ODM(alpha="abc"), r"alpha must be a number; got 'abc' \(str\)"),
        (lambda: ODM(floor=None), r"floor must be a number; got None"),
        (lambda: Temperature(tau="2"), r"tau must be a number; got '2' \(str\)"),
        (lambda: ADO(gamma1=True), r"gamma1 must be a number; got True \(bool\)"),
        (lambda: ADO(warmup_updates=4.5), r"warmup_updates must be an integer; got 4.5"),
        (
            lambda: ADO(s=-1),
            r"s must be a finite number >= 0 \(0 ignores the credit score; the paper uses 0.5\); got -1",
        ),
        (lambda: ADO(s=float("inf")), r"s must be a finite number >= 0 .*got inf"),
        (lambda: ADO(delta_min=-0.01), r"delta_min must be >= 0 .*got -0.01"),
        # DoReMi's settings are checked when made, not after its reference and proxy runs have trained
        (lambda: DoReMiOffline(eta=-1), r"eta must be a finite number > 0 .*got -1"),
        (lambda: DoReMiOffline(smoothing=1.5), r"smoothing must be in \[0, 1\) .*got 1.5"),
        (lambda: DoReMiOffline(reference_mixture="zipf"), r"reference_mixture='zipf'; valid values"),
        (lambda: DoReMiOffline(proxy_steps=0), r"proxy_steps must be a positive integer or null"),
        (lambda: PreparedDoReMiOnline(lr=-1), r"lr must be a finite number > 0 .*got -1"),
        (lambda: PreparedDoReMiOnline(floor=2), r"floor must be in \[0, 1\) .*got 2"),
        (lambda: PreparedDoReMiOnline(use_average="no"), r"use_average must be True or False; got 'no'"),
        (lambda: LawCorrected({"a": 1.0}, {"a": 1.0}, radius="0.1"), r"radius must be a number; got '0.1'"),
        (lambda: LawCorrected({"a": 1.0}, {"a": True}), r"predicted losses must be finite and > 0; got \{'a': True\}"),
        (lambda: LossFocus("0.5"), r"fraction must be a number; got '0.5'"),
    ],
)
def test_settings_of_the_wrong_type_are_refused_by_name(make, message):
    """What a config override typed as text would pass: refused naming the setting, not a TypeError from a
    comparison deep inside."""
    with pytest.raises(ValueError, match=message):
        make()


def test_odm_exploration_schedule_and_reward_credit():
    odm = bound(ODM(floor=0.01))
    w = odm.initial_weights()
    assert np.allclose(w, 1 / 3)
    # domain b has the highest loss of its own examples; a's loss is low although a dominates the batch
    for _ in range(200):
        w = odm.update(stats([100 * 1.0, 5 * 4.0, 1 * 2.0], [100, 5, 1]), w)
        assert_valid(w, 0.01)
    assert w[1] == w.max(), w
    # exploration: eps_t = min(1/K, sqrt(ln K / (K t)))
    assert odm.exploration(1) == pytest.approx(1 / 3)
    assert odm.exploration(10_000) == pytest.approx(math.sqrt(math.log(3) / (3 * 10_000)))


@pytest.mark.parametrize("scale,expected", [(1.0, 17), (0.5, 5), (0.25, 2)])
def test_odm_leaves_uniform_exactly_at_the_stated_update(scale, expected):
    """8 domains: the paper's schedule is exactly uniform for floor(K ln K) = 16 updates; a smaller
    exploration_scale c moves at update floor(c^2 K ln K) + 1."""
    names = [f"d{i}" for i in range(8)]
    odm = ODM(floor=0.0, exploration_scale=scale)
    odm.bind(names, np.full(8, 10))
    assert odm.first_adaptive_update() == expected
    w = odm.initial_weights()
    losses = np.linspace(1.0, 3.0, 8)
    for t in range(1, expected + 1):
        w = odm.update(stats(losses * 5, np.full(8, 5)), w)
        if t < expected:
            assert np.array_equal(w, np.full(8, 1 / 8)), (t, w)
    assert np.abs(w - 1 / 8).max() > 1e-3 and w.argmax() == 7
    with pytest.raises(ValueError, match="exploration_scale must be a finite number > 0; got 0"):
        ODM(exploration_scale=0)


def test_odm_is_invariant_to_relabelling_domains():
    perm = [2, 0, 1]
    a, b = bound(ODM()), ODM()
    b.bind([NAMES[i] for i in perm], SIZES[perm])
    wa, wb = a.initial_weights(), b.initial_weights()
    rng = np.random.default_rng(0)
    for _ in range(50):
        loss = rng.uniform(1, 5, 3)
        wa = a.update(stats(loss * 10, [10, 10, 10]), wa)
        wb = b.update(stats((loss * 10)[perm], [10, 10, 10]), wb)
    assert np.allclose(wa[perm], wb)


def test_odm_survives_nan_and_missing_domains():
    odm = bound(ODM(floor=0.02))
    w = odm.initial_weights()
    for i in range(30):
        s = stats([np.nan if i % 3 == 0 else 3.0, 0.0, 2.0], [0 if i % 3 == 0 else 4, 0, 2], non_finite=1)
        w = odm.update(s, w)
        assert_valid(w, 0.02)


def test_per_example_loss_matches_manual_and_masks():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[1, 2:] = -100
    labels[2, 1:] = -100  # after the shift nothing is counted
    loss, valid = per_example_token_loss(logits, labels)
    for i in range(2):
        keep = labels[i, 1:] != -100
        manual = torch.nn.functional.cross_entropy(logits[i, :-1][keep], labels[i, 1:][keep])
        assert torch.allclose(loss[i], manual, atol=1e-6)
    assert valid.tolist() == [True, True, False] and torch.isnan(loss[2])
    with pytest.raises(ValueError, match="expected logits"):
        per_example_token_loss(logits[0], labels)


def test_store_masks_and_counts_non_finite():
    domain_ids = np.array([0, 1, 2, 0, 1, 2])
    store = ScoreStore(domain_ids, 3)
    store.add(np.array([0, 1, 2]), torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([True, True, True]))
    store.add(np.array([3, 4, 5]), torch.tensor([3.0, 2.0, float("nan")]), torch.tensor([True, True, False]))
    s = store.flush(step=7)
    assert s.count.tolist() == [2, 1, 0] and s.loss_sum.tolist() == [4.0, 2.0, 0.0]
    assert s.non_finite == 2 and s.masked == 1
    assert np.isnan(s.mean_loss[2])
    odm = bound(ODM())
    w = odm.update(s, odm.initial_weights())
    assert_valid(w)


def test_store_state_keeps_pending_records():
    store = ScoreStore(np.array([0, 1, 0]), 2)
    store.add(np.array([0, 1]), torch.tensor([1.5, float("inf")]), torch.tensor([True, True]))

    state = through_checkpoint(store.state_dict())
    other = ScoreStore(np.array([0, 1, 0]), 2)
    other.load_state_dict(state)
    s = other.flush(step=1)
    assert s.loss_sum.tolist() == [1.5, 0.0] and s.non_finite == 1


def test_store_scores_resume_and_step_records_of_any_integer_width_load():
    store = ScoreStore(np.array([0, 1, 0, 1]), 2)
    store.record_scores(np.array([1, 3]), np.array([0.25, -2.0]), step=70_000)  # beyond int16: narrowed to int32
    state = through_checkpoint(store.state_dict())
    other = ScoreStore(np.array([0, 1, 0, 1]), 2)
    other.load_state_dict(state)
    assert other.score_step.tolist() == [-1, 70_000, -1, 70_000] and other.score_step.dtype == np.int32
    assert np.array_equal(other.score, store.score, equal_nan=True)

    older = {**store.state_dict(), "score_step": np.array([-1, 5, -1, 5], dtype=np.int64)}  # earlier versions
    other.load_state_dict(older)
    assert other.score_step.tolist() == [-1, 5, -1, 5]
    for bad in ([-2, 5, -1, 5], [-1, 2**31, -1, 5]):
        with pytest.raises(ValueError, match="'score_step' must hold steps >= 0 or -1"):
            other.load_state_dict({**older, "score_step": np.array(bad, dtype=np.int64)})


def test_odm_warns_when_the_run_ends_before_its_mixture_can_leave_uniform():
    """40 domains: exactly uniform for floor(40 ln 40) = 147 updates; 11 updates would train as Uniform."""
    from dataflex.cadence import warn_if_never_adaptive

    odm = ODM()
    odm.bind([f"d{i}" for i in range(40)], np.full(40, 10))
    with pytest.warns(
        UserWarning,
        match=r"ODM over 40 domains .* until its update 148, .* makes 11 updates .* "
        r"exploration_scale=0\.16 \(its first move at update 4\)",
    ):
        warn_if_never_adaptive(odm, 11, 5)
    suggested = ODM(exploration_scale=0.16)
    suggested.bind(odm.domain_names, odm.domain_sizes)
    assert suggested.first_adaptive_update() == 4
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_never_adaptive(suggested, 11, 5)
        warn_if_never_adaptive(odm, 148, 5)
        warn_if_never_adaptive(Uniform(), 1, 5)  # a policy without an exploration phase is not checked


def test_ado_warns_when_the_run_ends_inside_its_warmup():
    from dataflex.cadence import warn_if_never_adaptive

    ado = ADO(warmup_updates=6)
    ado.bind(NAMES, SIZES)
    with pytest.warns(
        UserWarning,
        match=r"ADO over 3 domains keeps its initial mixture until its update 6, but this "
        r"run makes 5 updates .* Use warmup_updates=3, a smaller update_every",
    ):
        warn_if_never_adaptive(ado, 5, 10)
    w = ado.initial_weights()
    for _ in range(5):  # the warning is right: five updates leave the prior untouched
        w = ado.update(stats([5.0, 10.0, 15.0], [5, 5, 5]), w)
    assert np.array_equal(w, ado.initial_weights())
