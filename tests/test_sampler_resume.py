import numpy as np
import pytest
from conftest import DOMAINS, assert_resumes_exactly, make_domain_ids, make_sampler, run_loader, through_checkpoint

from dataflex.schedule import LateScheduleChangeError

SKEWED = [0.1, 0.2, 0.3, 0.4]
EVENTS = [(9, SKEWED), (70, [0.7, 0.1, 0.1, 0.1])]  # one before every stop point, one after most


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "replacement,when_exhausted", [(False, "reshuffle"), (False, "redistribute"), (True, "reshuffle")]
)
def test_resume_exact_at_several_stop_points(domain_ids, num_workers, replacement, when_exhausted):
    def build():
        return make_sampler(domain_ids, EVENTS, seed=3, replacement=replacement, when_exhausted=when_exhausted)

    ref = assert_resumes_exactly(build, stop_batches=[0, 1, 3, 10, 24], num_workers=num_workers)
    assert len(ref[0]) == len(domain_ids)
    assert ref[0] != ref[1], "epochs must differ"


def test_schedule_change_after_checkpoint_added_live(domain_ids):
    """A change scheduled while running (after the checkpoint) lands at the same sample either way."""

    def build():
        return make_sampler(domain_ids, [(9, SKEWED)], seed=1)

    full = build()
    it = iter(full)
    ref = [next(it) for _ in range(40)]
    full.schedule.add(60, [0.25, 0.25, 0.0, 0.5])
    ref += list(it)

    first = build()
    it = iter(first)
    head = [next(it) for _ in range(30)]
    state = through_checkpoint(first.state_dict())
    second = build()
    second.load_state_dict(state)
    second.schedule.add(60, [0.25, 0.25, 0.0, 0.5])
    assert head + list(second) == ref
    # the zero-weight domain "c" never appears after the change takes effect (with reshuffle)
    c_members = set(np.flatnonzero(domain_ids == 2).tolist())
    assert not c_members & set(ref[60:])


def test_negative_control_wrong_state_is_detected_or_differs(domain_ids):
    full = make_sampler(domain_ids, EVENTS, seed=3)
    ref = run_loader(full, 4, 0)
    first = make_sampler(domain_ids, EVENTS, seed=3)
    head = run_loader(first, 4, 0, num_batches=5)
    # forgetting the state: the resumed loader replays from the start, so the concatenation is wrong
    fresh = make_sampler(domain_ids, EVENTS, seed=3)
    assert head + run_loader(fresh, 4, 0)[: len(ref) - len(head)] != ref
    # a state from a different seed is refused
    state = first.state_dict(consumed=len(head))
    other = make_sampler(domain_ids, EVENTS, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    # a state from a different dataset is refused by the fingerprint
    foreign = make_sampler(make_domain_ids(seed=9), EVENTS, seed=3)
    with pytest.raises(ValueError, match="different dataset"):
        foreign.load_state_dict(state)


def test_order_is_pure_function_of_seed_epoch_schedule(domain_ids):
    a = make_sampler(domain_ids, EVENTS, seed=5)
    b = make_sampler(domain_ids, EVENTS, seed=5)
    assert a.epoch_order(1).tolist() == b.epoch_order(1).tolist()
    b.set_epoch(1)
    assert list(b) == a.epoch_order(1).tolist()
    c = make_sampler(domain_ids, [(9, SKEWED)], seed=5)  # same up to the second event
    assert c.epoch_order(0)[:70].tolist() == a.epoch_order(0)[:70].tolist()
    assert c.epoch_order(0)[70:].tolist() != a.epoch_order(0)[70:].tolist()


def test_late_schedule_change_raises(domain_ids):
    s = make_sampler(domain_ids, seed=0)
    it = iter(s)
    for _ in range(20):
        next(it)
    with pytest.raises(LateScheduleChangeError, match="sample 19"):
        s.schedule.add(19, SKEWED)
    s.schedule.add(20, SKEWED)  # the next sample is still open


def test_weights_are_honoured_with_very_different_domain_sizes():
    ids = make_domain_ids([5000, 500, 50, 5])
    target = np.array([0.1, 0.2, 0.3, 0.4])
    s = make_sampler(ids, [(1, target)], seed=0, chunk_size=4096)
    order = s.epoch_order(0)
    shares = np.bincount(ids[order], minlength=4) / len(order)
    assert np.allclose(shares, target, atol=0.02), shares
    # without replacement, the tiny domain is reshuffled: every member appears, none far more than others
    tiny = order[ids[order] == 3]
    counts = np.bincount(tiny, minlength=len(ids))[np.flatnonzero(ids == 3)]
    assert counts.max() - counts.min() <= 1


def test_redistribute_never_repeats_and_covers_everything(domain_ids):
    s = make_sampler(domain_ids, [(1, [0.05, 0.05, 0.1, 0.8])], seed=2, when_exhausted="redistribute")
    order = s.epoch_order(0)
    assert sorted(order.tolist()) == list(range(len(domain_ids)))
    # the heavily weighted tiny domain runs dry early and is sampled first
    d_positions = np.flatnonzero(domain_ids[order] == 3)
    assert d_positions.max() < len(order) // 4


def test_replacement_draws_from_the_right_domain():
    ids = make_domain_ids([30, 30, 30, 30])
    s = make_sampler(ids, [(1, [1.0, 0.0, 0.0, 0.0])], seed=0, replacement=True)
    order = s.epoch_order(0)
    assert set(ids[order[1:]].tolist()) == {0}


def test_bad_sampler_arguments(domain_ids):
    with pytest.raises(ValueError, match="when_exhausted='sometimes'"):
        make_sampler(domain_ids, when_exhausted="sometimes")
    with pytest.raises(ValueError, match="num_samples"):
        make_sampler(domain_ids, num_samples=0)
    with pytest.raises(ValueError, match=r"domain\(s\) \['d'\] have no examples"):
        make_sampler(np.array([0, 1, 2, 0, 2]), events=[], seed=0).__class__(
            np.array([0, 1, 2, 0, 2]),
            __import__("dataflex.schedule", fromlist=["WeightSchedule"]).WeightSchedule(DOMAINS, [0.25] * 4),
        )


def test_state_saved_before_a_setting_existed_resumes_with_its_old_meaning():
    ids = make_domain_ids()
    state = through_checkpoint(make_sampler(ids, seed=2).state_dict(consumed=8))
    del state["stratified"]  # as written by dataflex before stratified sampling existed
    make_sampler(ids, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="stratified=False but this sampler has stratified=True"):
        make_sampler(ids, seed=2, stratified=True).load_state_dict(state)
    del state["chunk_size"]
    with pytest.raises(ValueError, match="no setting 'chunk_size'"):
        make_sampler(ids, seed=2).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(replacement=True), dict(when_exhausted="redistribute"), dict(stratified=True)],
)
def test_many_domain_code_path_gives_the_same_order(domain_ids, monkeypatch, kwargs):
    """With many domains the sampler sorts and binary-searches instead of comparing (K x chunk) tables;
    both paths must give the identical order (the determinism contract does not depend on K)."""
    import dataflex.samplers.mixture as mixture

    events = [(37, [0.7, 0.1, 0.1, 0.1]), (120, [0.1, 0.2, 0.3, 0.4])]
    few = make_sampler(domain_ids, events, seed=5, chunk_size=32, **kwargs)
    expected = [few.epoch_order(e) for e in range(2)]
    monkeypatch.setattr(mixture, "_FEW_DOMAINS", 0)
    many = make_sampler(domain_ids, events, seed=5, chunk_size=32, **kwargs)
    assert all(np.array_equal(a, many.epoch_order(e)) for e, a in enumerate(expected))


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(stratified=True), dict(replacement=True), dict(when_exhausted="redistribute")]
)
def test_resume_deep_into_an_epoch_continues_the_order(kwargs):
    """A resume at position k computes only the per-domain counts of the chunks before k (many chunks at
    once where one cdf holds): the rest of the epoch must equal the uninterrupted order, for changes
    inside chunks and on chunk boundaries alike."""
    ids = np.random.default_rng(0).integers(0, 4, 3000)
    events = [
        (37, [0.7, 0.1, 0.1, 0.1]),
        (1000, [0.1, 0.2, 0.3, 0.4]),
        (1003, [0.4, 0.3, 0.2, 0.1]),
        (2500, [0.25] * 4),
        (4000, [0.1, 0.1, 0.1, 0.7]),
    ]
    for epoch in (0, 1):
        full = make_sampler(ids, events, seed=2, **kwargs).epoch_order(epoch)
        for k in (15, 16, 500, 1001, 1600, 2999):
            state = {
                **make_sampler(ids, events, seed=2, **kwargs).state_dict(consumed=0),
                "epoch": epoch,
                "position": k,
            }
            resumed = make_sampler(ids, events, seed=2, **kwargs)
            resumed.load_state_dict(state)
            assert np.array_equal(np.array(list(resumed)), full[k:]), (epoch, k)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(stratified=True), dict(replacement=True), dict(when_exhausted="redistribute")]
)
def test_saved_carry_resumes_like_a_replay_without_replaying(kwargs, monkeypatch):
    """A state saved mid-epoch holds the per-domain draws at its chunk: the resume starts there (no chunk
    before it is computed) and continues exactly the uninterrupted order."""
    ids = np.random.default_rng(0).integers(0, 4, 3000)
    events = [(37, [0.7, 0.1, 0.1, 0.1]), (1003, [0.4, 0.3, 0.2, 0.1]), (4000, [0.1, 0.1, 0.1, 0.7])]
    for epoch in (0, 1):
        full = make_sampler(ids, events, seed=2, chunk_size=64, **kwargs).epoch_order(epoch)
        for k in (70, 1001, 2999):
            first = make_sampler(ids, events, seed=2, chunk_size=64, **kwargs)
            first.set_epoch(epoch)
            it = iter(first)
            [next(it) for _ in range(min(k + 5, 3000))]  # a prefetching loader runs ahead of the consumer
            state = through_checkpoint(first.state_dict(consumed=k))
            assert state["carry"]["start"] == k - k % 64
            resumed = make_sampler(ids, events, seed=2, chunk_size=64, **kwargs)
            monkeypatch.setattr(type(resumed), "_advance_span", _no_replay)
            resumed.load_state_dict(state)
            assert np.array_equal(np.array(list(resumed)), full[k:]), (epoch, k)
            monkeypatch.undo()
            replayed = make_sampler(ids, events, seed=2, chunk_size=64, **kwargs)
            replayed.load_state_dict({key: v for key, v in state.items() if key != "carry"})
            assert np.array_equal(np.array(list(replayed)), full[k:]), (epoch, k)


def _no_replay(self, epoch, start, stop, carry):
    raise AssertionError(f"replayed chunks {start}..{stop} although the state held the carry")


def _carry_edits():
    def wrong_start(s):
        s["carry"]["start"] += 64

    def altered(s):
        s["carry"]["value"][0] += 1
        s["carry"]["value"][1] -= 1

    def impossible(s):  # a value that cannot be the draws before the chunk, with a matching digest
        s["carry"]["value"][0] += 1

    return {
        "wrong start": (wrong_start, r"'carry' is for chunk 1024, but a resume at position 1001 starts at chunk 960"),
        "altered": (altered, r"'carry' does not match its digest"),
        "impossible": (impossible, r"'carry' value \[.*\] cannot be the draws before position 960"),
        "malformed": (lambda s: s["carry"].pop("digest"), r"'carry' must hold start, value and digest"),
        "negative position": (lambda s: s.__setitem__("position", -5), r"'position' must be an integer >= 0; got -5"),
        "position past the epoch": (lambda s: s.__setitem__("position", 3000), r"'position' must lie in \[0, 3000\)"),
        "text epoch": (lambda s: s.__setitem__("epoch", "1"), r"'epoch' must be an integer >= 0; got '1'"),
    }


@pytest.mark.parametrize("name", list(_carry_edits()))
def test_a_damaged_position_or_carry_is_refused(name):
    ids = np.random.default_rng(0).integers(0, 4, 3000)
    first = make_sampler(ids, EVENTS, seed=2, chunk_size=64)
    state = through_checkpoint(first.state_dict(consumed=1001))
    edit, message = _carry_edits()[name]
    edit(state)
    if name == "impossible":
        state["carry"]["digest"] = first._carry_digest(0, 960, state["carry"]["value"])
    with pytest.raises(ValueError, match=message):
        make_sampler(ids, EVENTS, seed=2, chunk_size=64).load_state_dict(state)


# Digests of two epochs of each sampler setting below, taken from the code that defined the order
# (the determinism contract: the order is a pure function of seed, epoch and schedule). A change that
# alters any of them changes every saved run's continuation: version the sampler state and say so.
PINNED_ORDERS = {
    "without": "f81c64d95431fa14",
    "with_replacement": "739274dcb8232f58",
    "redistribute": "a8d882c6b845f48b",
    "stratified": "7a1bed571880c270",
    "subset": "19fe60c1bc8a3f6e",
}


@pytest.mark.parametrize("setting", sorted(PINNED_ORDERS))
def test_sample_orders_are_pinned_across_versions(setting):
    import hashlib

    from dataflex.samplers import DomainMixtureSampler, SubsetSampler
    from dataflex.schedule import SubsetSchedule, WeightSchedule

    if setting == "subset":
        subsets = SubsetSchedule(3000)
        subsets.add(500, np.arange(0, 3000, 3))
        sampler = SubsetSampler(subsets, seed=7)
    else:
        weights = WeightSchedule(list("abcd"), [0.25] * 4)
        weights.add(1000, [0.1, 0.2, 0.3, 0.4])
        options = {
            "without": {},
            "with_replacement": {"replacement": True},
            "redistribute": {"when_exhausted": "redistribute"},
            "stratified": {"stratified": True},
        }[setting]
        ids = np.random.default_rng(0).integers(0, 4, 5000)
        sampler = DomainMixtureSampler(ids, weights, seed=7, **options)
    digest = hashlib.sha256()
    for epoch in range(2):
        digest.update(np.asarray(sampler.epoch_order(epoch), dtype=np.int64).tobytes())
    assert digest.hexdigest()[:16] == PINNED_ORDERS[setting]
