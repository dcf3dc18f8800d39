"""Best-of-n from one pool of samples, the baseline `rlhf eval` draws next to the RL curves.

The pool holds ``pool_size`` responses per prompt from the starting model. For each n they are split
into ``pool_size // n`` disjoint groups of n, the proxy picks the best of each group (the first of
equals on ties), and the pick is scored by proxy and gold; its gold win rate is taken against an
independent sample of the same prompt from the comparator model. Its KL to the model it was sampled
from is the analytic ``log n - (n-1)/n`` (:func:`pipeline.evaluation.stats.bon_kl`). Pure functions of
the scores; no models here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from pipeline.evaluation.curves import make_point
from pipeline.evaluation.stats import bon_kl, win_rate

__all__ = ["BestOfN", "best_of_n"]


@dataclass
class BestOfN:
    """One n of the baseline: its curve point, its KL and the pool rows it picked."""

    n: int
    kl: float
    point: dict  # a :func:`pipeline.evaluation.curves.make_point` row, kind "bon", name "n=<n>"
    picks: list[tuple[int, int, int]]  # (prompt index, group index, pool row), prompt-major


def best_of_n(pool_proxy: Sequence[float], pool_gold: Sequence[float], comparator_gold: Sequence[float],
              prompts: int, pool_size: int, k: int, ns: Iterable[int]) -> list[BestOfN]:
    """The best-of-n baseline for every distinct n in ``ns``, in increasing n.

    ``pool_proxy`` and ``pool_gold`` score the pool, prompt-major (sample t of prompt i at
    ``i * pool_size + t``); ``comparator_gold`` scores ``k`` samples per prompt of the comparator in the
    same layout, and group g of prompt i is compared with its sample ``g % k``. Every n must be in
    ``1..pool_size``. The point's KL columns are the analytic KL, with no standard error.
    """
    out = []
    for n in sorted(set(ns)):
        groups = pool_size // n
        proxy, gold, comp, picks = [], [], [], []
        for i in range(prompts):
            for g in range(groups):
                idx = [i * pool_size + g * n + t for t in range(n)]
                best = max(idx, key=pool_proxy.__getitem__)  # max keeps the first of equals
                proxy.append(pool_proxy[best])
                gold.append(pool_gold[best])
                comp.append(comparator_gold[i * k + g % k])
                picks.append((i, g, best))
        kl = bon_kl(n)
        point = make_point("bon", f"n={n}", None, [kl] * len(gold), [kl] * len(gold), proxy, gold,
                           win_rate(gold, comp))
        point.update(kl_k1_mean=kl, kl_k1_se=0.0, kl_k3_mean=kl, sqrt_kl=math.sqrt(kl))
        out.append(BestOfN(n, kl, point, picks))
    return out
