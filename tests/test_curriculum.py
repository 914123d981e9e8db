"""Curricula: pacing functions, the curriculum sampler (resume, ranks) and the Trainer callback."""

from __future__ import annotations

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from conftest import assert_resumes_exactly, through_checkpoint
from hf_helpers import CrashAt, StepRecorder, make_trainer, small_dataset
from torch.utils.data import BatchSampler

from dataflex import DataFlexCurriculumCallback
from dataflex.curriculum import Curriculum, length_difficulty, loss_difficulty
from dataflex.pacing import PACINGS, make_pacing
from dataflex.ranking import rank_ids
from dataflex.samplers import CurriculumSampler
from dataflex.schedule import LateScheduleChangeError, OrderSchedule

N = 40


@pytest.mark.parametrize("name", PACINGS)
@pytest.mark.parametrize("c0", [0.05, 0.3])
def test_pacing_is_monotone_starts_at_c0_and_reaches_one(name, c0):
    pace = make_pacing(name, c0)
    ts = np.linspace(0, 1, 1001)
    values = np.array([pace(t) for t in ts])
    assert np.all(np.diff(values) >= -1e-12)
    assert values[0] == pytest.approx(c0) and values[-1] == pytest.approx(1.0)
    assert pace(1.7) == pytest.approx(1.0)  # past the horizon everything stays open
    assert (values > 0).all() and (values <= 1 + 1e-12).all()


def test_competence_is_platanios_sqrt_and_bad_settings_are_refused():
    pace = make_pacing("competence", 0.1)
    assert pace(0.5) == pytest.approx(np.sqrt(0.5 * (1 - 0.01) + 0.01))
    assert make_pacing("linear", 0.2)(0.5) == pytest.approx(0.6)
    assert make_pacing("step", 0.2, steps=4)(0.3) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="pacing='cosine'; valid values are linear, root, competence, step"):
        make_pacing("cosine")
    with pytest.raises(ValueError, match="c0 .* must lie in \\(0, 1\\]; got 0"):
        make_pacing("linear", 0)


def build(events=(), pacing="competence", seed=3, order=None):
    schedule = OrderSchedule(rank_ids(np.arange(N)[::-1].astype(float)) if order is None else order)
    for at, o in events:
        schedule.add(at, o)
    return CurriculumSampler(
        schedule, make_pacing(pacing, 0.1), horizon=2 * N, pacing_name=pacing, seed=seed, chunk_size=16
    )


def test_early_samples_come_from_the_easiest_examples_then_the_pool_opens():
    sampler = build()
    easiest_first = sampler.schedule.current  # difficulty N-1-i: the highest ids are easiest
    assert easiest_first[:3].tolist() == [N - 1, N - 2, N - 3]
    order = np.concatenate([sampler.epoch_order(0), sampler.epoch_order(1)])
    for g, example in enumerate(order):
        rank = int(np.flatnonzero(easiest_first == example)[0])
        assert rank < sampler.open_count(g)
    assert sampler.open_count(0) == 4 and sampler.open_count(2 * N) == N
    assert set(order[:2].tolist()) <= set(easiest_first[:4].tolist()) and len(set(order[-20:].tolist())) > 10


@pytest.mark.parametrize("workers", [0, 2])
def test_curriculum_sampler_resumes_exactly_with_reorders(workers):
    rng = np.random.default_rng(0)
    events = [(6, rng.permutation(N)), (50, rng.permutation(N))]  # before and after the stop points
    assert_resumes_exactly(lambda: build(events), [0, 1, 3, 7], num_workers=workers)
    state = through_checkpoint(build(events).state_dict(consumed=0))
    with pytest.raises(ValueError, match="pacing='competence' but this sampler has pacing='linear'"):
        build(events, pacing="linear").load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_curriculum_ranks_merge_to_the_global_order(world):
    batch = 2
    global_order = build().epoch_order(0).tolist()
    per_rank = [
        [list(b) for b in BatchSamplerShard(BatchSampler(build(), batch, False), world, r)] for r in range(world)
    ]
    usable = min(len(b) for b in per_rank)
    merged = [x for step in zip(*[b[:usable] for b in per_rank]) for b in step for x in b]
    # accelerate pads the last global batch by wrapping around to the start: compare the real positions
    assert merged[:N] == global_order[: len(merged[:N])] and len(merged) >= N - world * batch


def test_order_schedule_refuses_non_permutations_and_late_changes():
    with pytest.raises(ValueError, match="permutation of 0..3"):
        OrderSchedule([0, 1, 1, 3])
    sampler = build()
    sampler.epoch_order(0)  # generation marks the frontier only during iteration
    list(iter(sampler))
    with pytest.raises(LateScheduleChangeError):
        sampler.schedule.add(5, np.arange(N))


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=12)  # 36 examples


def test_callback_trains_easiest_first(ds, tmp_path):
    difficulty = length_difficulty(ds)

    def run(out, crash_at=None, resume=None):
        cb = DataFlexCurriculumCallback(Curriculum(difficulty, pacing="linear", c0=0.2), horizon_steps=8)
        rec = StepRecorder(cb)
        extra = [rec] + ([CrashAt(crash_at)] if crash_at else [])
        trainer = make_trainer(ds, cb, out, max_steps=12, save_steps=5, extra=extra)
        try:
            trainer.train(resume_from_checkpoint=resume)
        except KeyboardInterrupt:
            pass
        return cb, rec

    full, rec = run(tmp_path / "full")
    rank = {int(i): r for r, i in enumerate(rank_ids(difficulty))}  # 0 = shortest
    for step, ids in rec.ids.items():  # every example was open (by length rank) at its sample index
        for j, i in enumerate(ids):
            assert rank[i] < full.sampler.open_count((step - 1) * 4 + j)  # global sample index
    assert full.sampler.open_count(0) == 8  # 20 % of 36, rounded up
    assert max(rank[i] for i in rec.ids[1]) < 10 and max(rank[i] for s in range(9, 13) for i in rec.ids[s]) > 20
    # exact resume: tests/test_hf_adapter.py::test_every_decider_resumes_exactly_through_the_trainer


def test_a_horizon_past_the_run_warns_how_much_of_the_pool_is_never_opened(ds, tmp_path):
    """Linear pacing from 20 % over 40 steps, a run of 10: 0.2 + 0.8 * 10 / 40 = 40 % open, 15 of 36 (42 %)."""
    cb = DataFlexCurriculumCallback(Curriculum(length_difficulty(ds), pacing="linear", c0=0.2), horizon_steps=40)
    trainer = make_trainer(ds, cb, tmp_path, max_steps=10, save_steps=100)
    with pytest.warns(UserWarning, match=r"horizon_steps=40 is past this run's max_steps=10: .* opens only 42% of"):
        trainer.train()
    assert cb.sampler.open_count(10 * 4) == 15


def test_callback_rescores_with_the_live_model(ds, tmp_path):
    cb = DataFlexCurriculumCallback(
        Curriculum(scorer=loss_difficulty(), pacing="competence", c0=0.3), rescore_every=4, horizon_steps=10
    )
    make_trainer(ds, cb, tmp_path, max_steps=9, save_steps=100).train()
    assert [h["step"] for h in cb.history] == [0, 4, 8]
    assert len(cb.sampler.schedule) == 3
    with pytest.raises(ValueError, match="rescore_every needs a curriculum with a scorer"):
        DataFlexCurriculumCallback(Curriculum(np.zeros(3)), rescore_every=2)
    with pytest.raises(ValueError, match="exactly one of difficulty"):
        Curriculum()
