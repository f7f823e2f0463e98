import random

import pytest
import torch
from torch.utils.data import DistributedSampler

from rose_pl.data.samplers import LengthGroupedSampler, LengthSortedSampler, padding_fraction
from rose_pl.errors import ConfigError


def random_lengths(n, seed=0, low=1, high=500):
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def batches_of(sampler, batch_size):
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("n, world, batch", [(1000, 4, 3), (997, 4, 3), (64, 2, 8), (50, 3, 2)])
def test_union_of_rank_batches_equals_single_process_batch(n, world, batch):
    lengths = random_lengths(n)
    single = batches_of(LengthGroupedSampler(lengths, batch * world, seed=5, megabatch_factor=4), batch * world)
    ranks = [batches_of(LengthGroupedSampler(lengths, batch, num_replicas=world, rank=r, seed=5, megabatch_factor=4),
                        batch) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank steps the same number of times
    assert len(ranks[0]) == len(single)
    full = n // (batch * world)
    for j in range(full):
        union = sorted(i for r in ranks for i in r[j])
        assert union == sorted(single[j])
    if n % (batch * world):  # the last, partial batch: its rows plus repeats from the start
        union = {i for r in ranks for i in r[-1]}
        assert set(single[-1]) <= union


def test_every_index_appears_once_across_ranks_when_divisible():
    lengths = random_lengths(96)
    seen = [i for r in range(4) for i in LengthGroupedSampler(lengths, 3, num_replicas=4, rank=r)]
    assert sorted(seen) == list(range(96))


def test_every_index_appears_with_padding_when_not_divisible():
    lengths = random_lengths(101)
    seen = [i for r in range(4) for i in LengthGroupedSampler(lengths, 3, num_replicas=4, rank=r)]
    assert set(seen) == set(range(101)) and len(seen) == 104


def test_drop_last_keeps_only_full_global_batches():
    lengths = random_lengths(101)
    samplers = [LengthGroupedSampler(lengths, 3, num_replicas=4, rank=r, drop_last=True) for r in range(4)]
    seen = [i for s in samplers for i in s]
    assert len(seen) == len(set(seen)) == 96 and all(len(s) == 24 == len(list(s)) for s in samplers)


def test_same_seed_same_order_and_set_epoch_changes_it():
    lengths = random_lengths(300)
    a, b = LengthGroupedSampler(lengths, 4, seed=1), LengthGroupedSampler(lengths, 4, seed=1)
    assert list(a) == list(b)
    assert list(a) != list(LengthGroupedSampler(lengths, 4, seed=2))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    b.set_epoch(1)
    assert list(a) == list(b)


def test_batches_are_sorted_within_and_the_longest_batch_comes_first():
    lengths = random_lengths(400)
    batches = batches_of(LengthGroupedSampler(lengths, 8, megabatch_factor=4), 8)
    for batch in batches:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert lengths[batches[0][0]] == max(lengths)


def test_length_grouping_pads_less_than_random_batches():
    lengths = random_lengths(2000, seed=3)
    grouped = padding_fraction(lengths, batches_of(LengthGroupedSampler(lengths, 8), 8))
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = padding_fraction(lengths, [perm[i : i + 8] for i in range(0, len(perm), 8)])
    assert grouped < shuffled / 3


def test_is_a_distributed_sampler_so_lightning_keeps_it():
    assert isinstance(LengthGroupedSampler([1, 2, 3], 1), DistributedSampler)


def test_bad_arguments_are_reported_together():
    with pytest.raises(ConfigError) as info:
        LengthGroupedSampler([1, 2], 0, num_replicas=2, rank=2, megabatch_factor=0)
    assert len(info.value.problems) == 3


def test_padding_fraction_counts_padded_slots():
    assert padding_fraction([4, 2, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([], []) == 0.0


def test_length_sorted_sampler_is_longest_first_with_index_ties_and_restrictable():
    lengths = [3, 9, 3, 1, 9]
    assert list(LengthSortedSampler(lengths)) == [1, 4, 0, 2, 3]
    restricted = LengthSortedSampler(lengths, indices=[0, 3, 4])
    assert list(restricted) == [4, 0, 3] and len(restricted) == 3
    with pytest.raises(ConfigError):
        LengthSortedSampler(lengths, indices=[5])


def test_token_budget_batches_keep_every_row_once_within_the_budget_and_share_them_among_ranks():
    import numpy as np

    from rose_pl.data.samplers import LengthSortedSampler, TokenBudgetBatches

    lengths = np.random.default_rng(0).integers(3, 200, 101)
    order = LengthSortedSampler(lengths).order
    for per_row in (1, 2):
        ranks = [TokenBudgetBatches(lengths, order, 600, 16, num_replicas=3, rank=r, per_row=per_row)
                 for r in range(3)]
        rows = [i for s in ranks for b in s for i in b]
        assert sorted(rows) == list(range(101))  # every row once
        for s in ranks:
            assert s.total_rows == 101 and s.num_rows == sum(len(b) for b in s)
            for b in s:
                assert len(b) <= 16
                assert len(b) == 1 or per_row * len(b) * max(lengths[b]) <= 600
        one = TokenBudgetBatches(lengths, order, 600, 16, per_row=per_row)
        assert [i for b in one for i in b] == order.tolist()  # one rank: the length-sorted order
    few = TokenBudgetBatches([5, 5, 5, 5], [0, 1, 2, 3], 10_000, 16, num_replicas=3, rank=2)
    assert len(few) == 1  # three ranks, one budget-sized batch: split so that every rank gets rows
