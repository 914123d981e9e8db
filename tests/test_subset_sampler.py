"""SubsetSampler: exact resume, selections honoured, ranks consistent."""

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from conftest import assert_resumes_exactly
from torch.utils.data import BatchSampler

from dataflex.samplers import SubsetSampler
from dataflex.schedule import LateScheduleChangeError, SubsetSchedule

N = 50
FIRST = np.arange(0, 50, 2)  # even ids
SECOND = np.array([1, 3, 5, 7])


def build(events=((9, FIRST), (70, SECOND)), seed=4):
    schedule = SubsetSchedule(N)
    for at, ids in events:
        schedule.add(at, ids)
    return SubsetSampler(schedule, seed=seed)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_exact_with_selection_changes_before_and_after(num_workers):
    ref = assert_resumes_exactly(build, stop_batches=[0, 1, 3, 11], batch_size=4, num_workers=num_workers)
    assert ref[0] != ref[1]


def test_selection_is_honoured_and_covered_before_repeats():
    order = build().epoch_order(0)
    assert set(order[9:70].tolist()) <= set(FIRST.tolist())
    assert sorted(order[9 : 9 + FIRST.size].tolist()) == FIRST.tolist()  # one full pass before any repeat
    assert set(order[70:].tolist()) <= set(SECOND.tolist())
    epoch1 = build().epoch_order(1)  # global indices 50..99: FIRST until 70, then SECOND
    assert set(epoch1[:20].tolist()) <= set(FIRST.tolist()) and set(epoch1[20:].tolist()) <= set(SECOND.tolist())


def test_live_selection_change_and_late_change():
    s = build(events=())
    it = iter(s)
    head = [next(it) for _ in range(20)]
    s.schedule.add(25, SECOND)
    rest = list(it)
    assert set(rest[5:]) <= set(SECOND.tolist()) and len(head + rest) == N
    with pytest.raises(LateScheduleChangeError):
        s.schedule.add(40, FIRST)  # the whole epoch has been generated


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_merge_to_the_global_order(world):
    n = 4 * world * 4
    schedule_events = ((5, np.arange(0, n, 3)),)

    def make():
        schedule = SubsetSchedule(n)
        for at, ids in schedule_events:
            schedule.add(at, ids)
        return SubsetSampler(schedule, seed=1)

    global_order = make().epoch_order(0).tolist()
    shards = [[list(b) for b in BatchSamplerShard(BatchSampler(make(), 4, False), world, r)] for r in range(world)]
    assert [x for step in zip(*shards) for b in step for x in b] == global_order


def test_bad_subsets():
    with pytest.raises(ValueError, match=r"example ids \[50\] are outside the pool \[0, 50\)"):
        SubsetSchedule(N, [0, 50])
    with pytest.raises(ValueError, match="at least one example"):
        SubsetSchedule(N).add(3, [])
    with pytest.raises(ValueError, match="got 3 labels for a pool of 50"):
        SubsetSampler(SubsetSchedule(N), labels=["a", "b", "c"])


def test_id_schedules_share_their_arrays_with_a_state_safely():
    """The state holds the schedule's own arrays (no copy at 10M examples); they are read-only, so neither
    the caller who passed them in nor a later holder of the state can change what the schedule uses."""
    from dataflex.schedule import OrderSchedule, SubsetSchedule

    mine = np.array([3, 1, 0, 2])
    order = OrderSchedule(mine)
    mine[0] = 1  # the caller's array stays theirs
    assert order.current.tolist() == [3, 1, 0, 2]
    order.current[0] = 2  # a copy
    subsets = SubsetSchedule(6)
    subsets.add(10, [4, 1])
    for schedule in (order, subsets):
        state = schedule.state_dict()
        first = state["events"][0][1]
        with pytest.raises(ValueError, match="read-only"):
            first[0] = 5
    assert order.current.tolist() == [3, 1, 0, 2] and subsets.current.tolist() == [1, 4]
