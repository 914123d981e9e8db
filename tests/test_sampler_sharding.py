"""Rank simulation through accelerate's own BatchSamplerShard, as the Trainer uses it."""

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard
from conftest import make_domain_ids, make_sampler
from torch.utils.data import BatchSampler

from dataflex.batching import LoaderLayout, rank_position_batches


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_are_disjoint_equal_and_merge_to_global_order(world, stratified):
    batch = 4
    n = batch * world * 5  # a whole number of global batches per epoch
    ids = make_domain_ids([n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8])
    events = [(7, [0.1, 0.2, 0.3, 0.4])]
    global_order = make_sampler(ids, events, seed=11, stratified=stratified).epoch_order(0).tolist()
    per_rank = []
    for rank in range(world):
        sampler = make_sampler(ids, events, seed=11, stratified=stratified)  # every rank builds its own sampler
        shard = BatchSamplerShard(BatchSampler(sampler, batch, False), num_processes=world, process_index=rank)
        per_rank.append([list(b) for b in shard])
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1, f"ranks got different numbers of batches: {lengths}"
    merged = [x for step in zip(*per_rank) for b in step for x in b]
    assert merged == global_order
    # disjoint positions: each global position is dealt to exactly one rank
    seen_positions = []
    for rank in range(world):
        layout = LoaderLayout(
            BatchSampler(range(n), batch, False),
            BatchSamplerShard(BatchSampler(range(n), batch, False), world, rank),
            batch,
            0,
            0,
        )
        pos = rank_position_batches(n, layout)
        assert [global_order[p] for b in pos for p in b] == [x for b in per_rank[rank] for x in b]
        seen_positions += [int(p) for b in pos for p in b]
    assert sorted(seen_positions) == list(range(n))


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_epoch_positions_match_accelerate(world):
    """When the epoch is not a multiple of the global batch, accelerate wraps around; our positions agree."""
    batch, n = 4, 4 * world * 3 + 5
    ids = make_domain_ids([n - 9, 4, 3, 2])
    for rank in range(world):
        sampler = make_sampler(ids, seed=2)
        order = sampler.epoch_order(0)
        shard = BatchSamplerShard(BatchSampler(sampler, batch, False), world, rank)
        actual = [list(b) for b in shard]
        layout = LoaderLayout(
            BatchSampler(range(n), batch, False),
            BatchSamplerShard(BatchSampler(range(n), batch, False), world, rank),
            batch,
            0,
            0,
        )
        predicted = [order[p].tolist() for p in rank_position_batches(n, layout)]
        assert predicted == actual
    assert np.unique(order).size > 1


def test_iterable_datasets_are_refused_with_a_clear_error():
    import pytest
    from torch.utils.data import DataLoader, IterableDataset

    from dataflex.batching import inspect_loader

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    with pytest.raises(TypeError, match="IterableDataset .*cannot be re-mixed"):
        inspect_loader(DataLoader(Stream(), batch_size=2))
