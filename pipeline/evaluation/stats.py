"""Small statistics shared by the stages and the curves: mean and standard error, binomial and Wilson
intervals, paired win rates, rank correlation, and the KL quantities the curves are drawn against.
Pure functions of numbers or tensors; no model code.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from pipeline.rl import ppo_math

Z95 = 1.959963984540054


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)``.

    Returns ``(nan, nan)`` for no values and ``(x, nan)`` for one value (no spread to estimate).
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def prompt_means(values: Sequence[float], k: int) -> list[float]:
    """Per-prompt means of ``values`` laid out prompt-major (sample j of prompt i at ``i * k + j``): a
    list of ``len(values) // k`` floats. E.g. k = 2: [1, 3, 0.5, 0.5] -> [2.0, 0.5]."""
    if k < 1 or len(values) % k:
        raise ValueError(f"{len(values)} values are not whole prompts of {k} samples")
    return [math.fsum(float(v) for v in values[i:i + k]) / k for i in range(0, len(values), k)]


def paired_diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` taken pair by pair: two models' per-prompt means on the same
    prompts. The prompt's own effect (some prompts draw duller answers from every model) cancels, and
    the samples of one prompt, which are not independent of each other, count as one observation: the
    paired t-test's standard error, ``std(d, ddof=1) / sqrt(n)``. E.g. a = [0.9, 0.5, 0.7], b = [0.8, 0.3,
    0.7]: d = [0.1, 0.2, 0.0], mean 0.1, std 0.1, se 0.1 / sqrt(3) = 0.05774."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    return mean_se([float(x) - float(y) for x, y in zip(a, b)])


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``rate`` observed over ``n`` trials (default 95%)."""
    if n <= 0:
        return math.nan, math.nan
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (rate + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(rate * (1.0 - rate), 0.0) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Paired win rate of ``a`` over ``b``: ``(wins + ties / 2) / n``, with a Wilson interval.

    ``a[k]`` and ``b[k]`` are the scores of the two responses of pair ``k``. Returns
    ``(rate, lo, hi)``; all NaN for no pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    rate = wins / n
    lo, hi = wilson_interval(rate, n, z)
    return rate, lo, hi


def bon_kl(n: int) -> float:
    """Analytic KL(best-of-n || base policy) = ``log n - (n - 1) / n`` nats (Stiennon et al. 2020)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def exact_kl(p, q) -> float:
    """``KL(p || q) = sum_v p_v log(p_v / q_v)`` for two categorical distributions (probabilities, (V,)).

    Terms with ``p_v == 0`` are 0; ``q_v == 0`` where ``p_v > 0`` gives ``inf``.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    support = p > 0
    if bool((q[support] <= 0).any()):
        return math.inf
    return float((p[support] * (p[support].log() - q[support].log())).sum())


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """Per-sequence KL estimate: the sum over real response tokens of the per-token estimator.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the sampling model.
        ref_logprobs: ``(B, T)`` log-probabilities of the same tokens under the reference.
        mask: ``(B, T)`` bool or float, 1 on real response tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (:func:`pipeline.rl.ppo_math.kl_per_token`).

    Returns:
        ``(B,)`` float64. Padding contributes exactly 0 whatever its logprobs are.
    """
    per_token = ppo_math.kl_per_token(logprobs.double(), ref_logprobs.double(), estimator)
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(dim=-1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in t.unique():
            idx = (t == v).nonzero().flatten()
            r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-12))


def accuracy_se(correct: int, n: int) -> float:
    """Binomial standard error of an accuracy, sqrt(p (1 - p) / n); 0.8 on 400 pairs: sqrt(0.16 / 400) = 0.02."""
    if n == 0:
        return float("nan")
    p = correct / n
    return (p * (1 - p) / n) ** 0.5
