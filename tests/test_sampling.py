"""Samplers: reproducible, every index once per epoch, exact save/restore mid-epoch."""
from __future__ import annotations

import random

import pytest

from minift.sampling import LengthGroupedSampler, RandomSampler, SequentialSampler, make_sampler

LENGTHS = [random.Random(0).randint(3, 60) for _ in range(1003)]


def _all(kind, **kw):
    return make_sampler(kind, LENGTHS, 16, seed=kw.pop("seed", 3), **kw)


@pytest.mark.parametrize("kind", ["sequential", "random", "length_grouped"])
def test_every_index_once_per_epoch(kind):
    sampler = _all(kind)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        flat = [i for batch in sampler for i in batch]
        assert sorted(flat) == list(range(len(LENGTHS)))
        assert len(sampler) == 63  # ceil(1003 / 16): the last, short batch is kept


@pytest.mark.parametrize("kind", ["random", "length_grouped"])
def test_same_seed_same_order_new_order_each_epoch(kind):
    a, b, c = _all(kind), _all(kind), _all(kind, seed=4)
    assert a.batches(0) == b.batches(0)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != c.batches(0)


def test_sequential_is_dataset_order():
    assert SequentialSampler(10, 4).batches(0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("kind", ["sequential", "random", "length_grouped"])
def test_save_after_k_batches_and_restore(kind):
    uninterrupted = _all(kind)
    uninterrupted.set_epoch(1)
    expected = list(uninterrupted)
    run = _all(kind)
    run.set_epoch(1)
    seen = []
    for batch in run:
        seen.append(batch)
        run.consumed += 1  # the loop moves the position once a step is complete
        if len(seen) == 17:
            break
    state = run.state_dict()
    restored = _all(kind)
    restored.load_state_dict(state)
    assert seen + list(restored) == expected


def test_restore_refuses_other_settings():
    state = RandomSampler(100, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size=8 but this run has 4"):
        RandomSampler(100, 4, seed=1).load_state_dict(state)


def test_length_grouping_sorts_within_megabatches_and_puts_longest_first():
    sampler = LengthGroupedSampler(LENGTHS, 16, seed=0, megabatch_factor=4)
    batches = sampler.batches(0)
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)
    for batch in batches:  # each batch is a run of a length-sorted megabatch
        lengths = [LENGTHS[i] for i in batch]
        assert lengths == sorted(lengths, reverse=True)


def test_ranks_partition_each_epoch():
    shards = [make_sampler("random", LENGTHS, 16, seed=0, rank=r, world_size=3) for r in range(3)]
    flat = [i for s in shards for batch in s for i in batch]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert [len(s) for s in shards] == [21, 21, 21]
