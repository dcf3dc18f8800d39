"""Batches of similar length (pipeline/data/batching.py): the order is a seeded permutation whose batches
hold rows adjacent in length within their window, with less padding than a shuffle."""
import random
from typing import Sequence

import pytest

from pipeline.data.batching import GroupedSampler, length_grouped_order


def padded_share(lengths: Sequence[int], order: Sequence[int], batch: int) -> float:
    """The share of a padded batch's tokens that are padding, over ``order`` read ``batch`` rows at a
    time. E.g. lengths (1, 9, 2, 8), order (0, 1, 2, 3), batch 2: batches padded to 9 and 8, 34 tokens
    of which 20 real: 14 / 34."""
    real = padded = 0
    for s in range(0, len(order), batch):
        rows = [lengths[i] for i in order[s:s + batch]]
        real += sum(rows)
        padded += max(rows) * len(rows)
    return 1.0 - real / padded if padded else 0.0


def test_padded_share_by_hand():
    # batches (1, 9) and (2, 8) pad to 9 and 8: 34 tokens, 20 real
    assert padded_share([1, 9, 2, 8], [0, 1, 2, 3], 2) == pytest.approx(14 / 34)
    # (1, 2) and (8, 9): 2 x 2 + 9 x 2 = 22 tokens, 20 real
    assert padded_share([1, 9, 2, 8], [0, 2, 3, 1], 2) == pytest.approx(2 / 22)


@pytest.mark.parametrize("seed", range(5))
def test_one_window_pairs_rows_by_length(seed):
    # lengths (1, 9, 2, 8), batch 2, one window: batches {0, 2} and {1, 3} whatever the shuffle
    order = length_grouped_order([1, 9, 2, 8], batch=2, seed=seed, window=2)
    assert sorted(order) == [0, 1, 2, 3]
    assert sorted([sorted(order[:2]), sorted(order[2:])]) == [[0, 2], [1, 3]]


def _shuffle(n: int, seed: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_order_is_a_seeded_permutation_with_the_short_batch_last():
    lengths = [random.Random(0).randint(5, 90) for _ in range(103)]
    a = length_grouped_order(lengths, batch=8, seed=1, window=4)
    assert sorted(a) == list(range(103))
    assert a == length_grouped_order(lengths, batch=8, seed=1, window=4)
    assert a != length_grouped_order(lengths, batch=8, seed=2, window=4)
    # 103 = 12 x 8 + 7: the seed's shuffle in windows of 4 x 8 rows (the last 7 rows left out, last); each
    # of the 12 full batches is 8 consecutive rows of one window sorted by length
    shuffled = _shuffle(103, 1)
    expected = []
    for w in range(0, 96, 32):
        rows = sorted(shuffled[w:w + 32], key=lambda i: lengths[i])
        expected += [rows[b:b + 8] for b in range(0, 32, 8)]
    got = [a[s:s + 8] for s in range(0, 96, 8)]
    assert sorted(got) == sorted(expected)
    assert a[96:] == shuffled[96:]


def test_window_of_one_batch_is_a_plain_shuffle_of_batches():
    # window 1: nothing is sorted across batches; each batch is 4 consecutive rows of the seeded shuffle
    order = length_grouped_order(list(range(40)), batch=4, seed=3, window=1)
    shuffled = _shuffle(40, 3)
    assert sorted(sorted(order[s:s + 4]) for s in range(0, 40, 4)) == \
        sorted(sorted(shuffled[s:s + 4]) for s in range(0, 40, 4))


def test_grouping_pads_less_than_a_shuffle():
    rng = random.Random(0)
    lengths = [rng.randint(55, 88) for _ in range(300)]  # the default SFT data's range
    shuffled = list(range(300))
    random.Random(1).shuffle(shuffled)
    grouped = length_grouped_order(lengths, batch=8, seed=1)
    assert padded_share(lengths, grouped, 8) < padded_share(lengths, shuffled, 8) / 3


def test_sampler_reads_the_epoch_when_iteration_starts():
    lengths = [random.Random(4).randint(1, 50) for _ in range(30)]
    epoch = [0]
    s = GroupedSampler(lengths, batch=4, seed=7, epoch=lambda: epoch[0])
    first = list(s)
    assert len(s) == 30 and first == list(s) == length_grouped_order(lengths, 4, 7)
    epoch[0] = 1
    assert list(s) == length_grouped_order(lengths, 4, 8) != first
