"""Reward-model ensembles on one base: k LoRA reward adapters, each with its own score head, whose
frozen trunk runs once for all of them, and the ways their scores combine.

Members differ by seed (LoRA and head initialisation) and by a bootstrap resample of the pairs
(Efron 1979), applied as per-pair multiplicities on batches all members share (as Bootstrapped DQN's
masks, Osband et al. 2016): with ``reward.lora.top_layers`` the decoder layers below the lowest adapted
one are the same for every member, so one forward through them serves all, and each member then runs
only its own top layers (:mod:`pipeline.models.trunk`). Drawing a separate batch per member would
forfeit that.

Aggregations (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"), over member
scores each standardised on the SFT policy's samples first (so no member's scale dominates):
``mean``; ``min`` (worst-case optimisation, WCO); ``uwo`` = mean - lambda x variance (uncertainty-
weighted optimisation). Disagreement is the members' standard deviation per response.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pipeline.models import forwards, trunk

AGGREGATES = ("mean", "min", "uwo")


def member_adapter(m: int) -> str:
    """The adapter name of member ``m`` inside the training model: member 0 is peft's "default", so a
    one-member run is today's reward model, saved at the folder's root (later members in subfolders)."""
    return "default" if m == 0 else f"member{m}"


# ---------------------------------------------------------------------------------------------
# Math: pure functions on (k, B) member scores


def standardise(scores: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(k, B) member scores -> ``(s - mean_m) / std_m`` per member row m (std floored at 1e-6).
    E.g. member scores (2, 4) with mean 2, std 2 -> (0, 1)."""
    mu = torch.tensor(list(mean), dtype=scores.dtype).unsqueeze(1)
    sd = torch.tensor(list(std), dtype=scores.dtype).clamp(min=1e-6).unsqueeze(1)
    return (scores - mu) / sd


def aggregate(scores: torch.Tensor, how: str, uwo_lambda: float = 0.1) -> torch.Tensor:
    """(k, B) member scores -> (B,) ensemble score (Coste et al. 2023, sec. 3): ``mean`` over members;
    ``min`` over members (WCO); ``uwo``: mean - uwo_lambda x the members' population variance (UWO).
    E.g. members (1, 3), lambda 0.5: mean 2, min 1, variance ((1-2)^2 + (3-2)^2) / 2 = 1, uwo 2 - 0.5 = 1.5.
    One member: every aggregate is that member's score."""
    if how == "mean":
        return scores.mean(dim=0)
    if how == "min":
        return scores.min(dim=0).values
    if how == "uwo":
        return scores.mean(dim=0) - uwo_lambda * scores.var(dim=0, unbiased=False)
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")


def disagreement(scores: torch.Tensor) -> torch.Tensor:
    """(k, B) -> (B,): the members' population standard deviation per response (0 for one member).
    E.g. members (1, 3) -> 1."""
    return scores.std(dim=0, unbiased=False)


def bootstrap_weights(n: int, seed: int) -> torch.Tensor:
    """(n,) float multiplicities of a bootstrap resample of n items: n draws with replacement (seeded),
    counted per item; they sum to n and about 1/e of the items get 0 (Efron 1979)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.randint(0, n, (n,), generator=gen), minlength=n).float()


def weighted_pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor,
                           center: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a batch (B,) with per-pair ``weights`` (B,): sum w_i l_i / sum w_i, plus
    ``center`` x the weighted mean of (r_c + r_r)^2; 0 (no gradient) when every weight is 0. Weights all
    1 give :func:`pipeline.models.reward_model.pairwise_loss` exactly. E.g. margins (2, 0), weights (2, 0):
    -log sigmoid(2) = 0.1269."""
    w = weights.to(chosen.dtype)
    total = w.sum()
    if total <= 0:
        return (chosen * 0).sum()
    loss = (w * -torch.nn.functional.logsigmoid(chosen - rejected)).sum() / total
    if center:
        loss = loss + center * (w * (chosen + rejected) ** 2).sum() / total
    return loss


def member_features(model, encoded: Sequence[tuple[list[int], int]], pad_id: int, pooling: str,
                    adapters: Sequence[str], split: Optional[int] = None,
                    groups: Optional[Sequence] = None) -> list[torch.Tensor]:
    """(B, H) float32 features of rows ``(ids, response_start)`` under each of ``adapters``, the trunk
    below ``split`` (default: :func:`pipeline.models.trunk.trunk_split`) run once for all of them, the
    members' layers above it on all members' rows at once where they can (:func:`trunk.members_hidden`),
    and the start the rows of each of ``groups`` share (default: all rows one group, e.g. their system
    prompt) once per group."""
    split = trunk.trunk_split(model, adapters) if split is None else split
    rows, shared = trunk.shared_trunk(model, encoded, pad_id, split, adapters[0], groups)
    every = torch.arange(rows.ids.shape[0], device=rows.ids.device)
    together = trunk.members_hidden(model, rows, split, shared, adapters, [every] * len(adapters))
    if together is not None:
        return [forwards.pool_hidden(hidden, laid.pool, laid.last, pooling) for hidden, laid in together]
    return [forwards.pool_hidden(trunk.member_hidden(model, rows, split, shared, a), rows.pool, rows.last, pooling)
            for a in adapters]
