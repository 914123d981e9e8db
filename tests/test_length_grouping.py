"""``train_sampling_strategy="group_by_length"`` inside dataflex's order: sorted blocks, same examples, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_resumes_exactly, make_sampler, run_loader, through_checkpoint
from hf_helpers import StepRecorder, assert_trainer_resumes_exactly, make_trainer, small_dataset

from dataflex.hf import DataFlexCallback
from dataflex.policies import ODM, Static
from dataflex.samplers.length import LengthGrouping, default_megabatch
from dataflex.schedule import LateScheduleChangeError


@pytest.fixture(scope="module")
def ds():
    return small_dataset(per_domain=24, max_len=120)


def lengths_for(n: int) -> np.ndarray:
    return np.random.default_rng(5).integers(1, 200, n)


def test_blocks_hold_the_same_examples_sorted_by_length_longest_first(domain_ids):
    lengths = lengths_for(domain_ids.size)
    plain = make_sampler(domain_ids, seed=3)
    grouped = make_sampler(domain_ids, seed=3)
    grouped.group_by_length(LengthGrouping(lengths, 40))
    a, b = np.array(list(plain)), np.array(list(grouped))
    for start in range(0, a.size, 40):
        block_a, block_b = a[start : start + 40], b[start : start + 40]
        assert sorted(block_a) == sorted(block_b)
        assert (np.diff(lengths[block_b]) <= 0).all()
    assert not np.array_equal(a, b)
    assert default_megabatch(1000, 8) == 8 * 31 and default_megabatch(10_000, 8) == 400 and default_megabatch(3, 8) == 8


def test_grouped_sampler_resumes_exactly_across_epochs_and_schedule_changes(domain_ids):
    lengths = lengths_for(domain_ids.size)

    def build():
        sampler = make_sampler(domain_ids, events=[(130, [0.7, 0.1, 0.1, 0.1])], seed=1)
        sampler.group_by_length(LengthGrouping(lengths, 24))
        return sampler

    assert_resumes_exactly(build, [1, 5, 6, 11, 20], batch_size=4, num_workers=2)


def test_a_change_inside_a_generated_block_is_refused(domain_ids):
    sampler = make_sampler(domain_ids)
    sampler.group_by_length(LengthGrouping(lengths_for(domain_ids.size), 50))
    run_loader(sampler, 4, 0, num_batches=1)  # yields 4 positions, but fixes the whole first block
    with pytest.raises(LateScheduleChangeError):
        sampler.schedule.add(49, np.array([0.4, 0.3, 0.2, 0.1]))
    sampler.schedule.add(50, np.array([0.4, 0.3, 0.2, 0.1]))


def test_state_saved_with_a_grouping_resumes_only_under_the_same_grouping(domain_ids):
    lengths = lengths_for(domain_ids.size)
    grouped = make_sampler(domain_ids)
    grouped.group_by_length(LengthGrouping(lengths, 24))
    state = through_checkpoint(grouped.state_dict(consumed=8))
    with pytest.raises(ValueError, match="length_grouping"):
        make_sampler(domain_ids).load_state_dict(state)
    other = make_sampler(domain_ids)
    other.group_by_length(LengthGrouping(lengths + 1, 24))
    with pytest.raises(ValueError, match="length_grouping"):
        other.load_state_dict(state)
    plain_state = through_checkpoint(make_sampler(domain_ids).state_dict(consumed=8))
    with pytest.raises(ValueError, match="length_grouping"):
        grouped.load_state_dict(plain_state)
    with pytest.raises(ValueError, match="lengths but the dataset has"):
        make_sampler(domain_ids).group_by_length(LengthGrouping(lengths[:-1], 24))


def run_steps(ds, tmp_path, strategy: str, steps: int = 18) -> dict[int, list[int]]:
    dfx = DataFlexCallback(Static({"code": 0.5, "literature": 0.3, "trivia": 0.2}))
    rec = StepRecorder(dfx)
    make_trainer(ds, dfx, tmp_path / strategy, max_steps=steps, extra=[rec], train_sampling_strategy=strategy).train()
    return rec.ids


def test_trainer_group_by_length_sorts_blocks_of_the_mixture_and_pads_less(ds, tmp_path):
    grouped = run_steps(ds, tmp_path, "group_by_length")
    plain = run_steps(ds, tmp_path, "random")
    lengths = np.array([len(x) for x in ds["input_ids"]])
    block = default_megabatch(len(ds), 4)  # 72 examples, batch 4: blocks of 4 * 4 = 16
    flat_g = [i for s in sorted(grouped) for i in grouped[s]]
    flat_p = [i for s in sorted(plain) for i in plain[s]]
    for start in range(0, len(ds) - block + 1, block):  # whole blocks of the first epoch: same examples, sorted
        assert sorted(flat_g[start : start + block]) == sorted(flat_p[start : start + block])
        assert (np.diff(lengths[flat_g[start : start + block]]) <= 0).all()

    def padding(ids):
        return sum(int(lengths[v].max() * len(v) - lengths[v].sum()) for v in ids.values())

    assert padding(grouped) < padding(plain)


def test_trainer_group_by_length_resumes_exactly_with_decisions(ds, tmp_path):
    assert_trainer_resumes_exactly(
        lambda allow: DataFlexCallback(ODM(), update_every=2, allow_missing_state=allow),
        ds,
        tmp_path,
        accum=2,
        workers=2,
        steps=16,
        train_sampling_strategy="group_by_length",
    )


def test_sequential_warns_and_unknown_strategies_are_refused(ds, tmp_path):
    with pytest.warns(UserWarning, match="'sequential' is replaced"):
        make_trainer(
            ds, DataFlexCallback(ODM()), tmp_path / "a", max_steps=1, train_sampling_strategy="sequential"
        ).train()
