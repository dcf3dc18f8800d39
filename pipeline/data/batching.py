"""Batches of rows of similar length, in a shuffled order.

A batch is padded to its longest row, so rows drawn at random pad to the longest of each draw: on the
default SFT data (300 rows of 55-88 tokens) random batches of 8 were 89.6% real tokens. Sorting each
window of a few batches' worth of shuffled rows by length and cutting it into batches keeps 98.6%
(20 seeds), and shuffling the batches afterwards keeps the order of training from running long to
short inside each window (as transformers' ``LengthGroupedSampler`` does, longest first). The rows a
batch holds are still a random draw within its window, the length-bucketing of Khomenko et al. 2016
("Accelerating recurrent neural network training using sequence bucketing").
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

# Batches per window sorted by length: 16 windows of 8 rows kept 98.6% real tokens on the default SFT data,
# against 89.6% unsorted; a window of 1 batch is the plain shuffled order.
WINDOW = 16


def length_grouped_order(lengths: Sequence[int], batch: int, seed: int, window: int = WINDOW) -> list[int]:
    """A permutation of ``range(len(lengths))`` read ``batch`` rows at a time: a seeded shuffle cut into
    windows of ``window * batch`` rows, each window sorted by length (stable) and cut into batches, the
    batches shuffled (same generator), and the ``len % batch`` rows left over last, as the one short
    batch. The same ``seed`` gives the same order.

    E.g. lengths (1, 9, 2, 8), batch 2, window 2: whatever the shuffle, the one window sorts to rows
    (0, 2, 3, 1) by length, i.e. batches {0, 2} and {3, 1}, in either order, padded to 2 x 2 + 9 x 2 = 22
    tokens; the other two pairings pad to 34."""
    if batch < 1 or window < 1:
        raise ValueError(f"batch and window must be >= 1, got {batch} and {window}")
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    shuffled = torch.randperm(n, generator=g).tolist()
    full = n - n % batch
    span = batch * window
    batches = []
    for start in range(0, full, span):
        rows = sorted(shuffled[start:min(start + span, full)], key=lambda i: lengths[i])
        batches += [rows[b:b + batch] for b in range(0, len(rows), batch)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [i for k in order for i in batches[k]] + shuffled[full:]


class GroupedSampler(torch.utils.data.Sampler):
    """:func:`length_grouped_order` as a sampler: a new order each epoch (``seed + epoch``), the epoch
    read from ``epoch()`` when iteration starts, so a run resumed mid-epoch reads the same order."""

    def __init__(self, lengths: Sequence[int], batch: int, seed: int, epoch: Callable[[], int],
                 window: int = WINDOW):
        self.lengths, self.batch, self.seed, self.epoch, self.window = list(lengths), batch, seed, epoch, window

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch, self.seed + int(self.epoch()), self.window))

    def __len__(self) -> int:
        return len(self.lengths)
