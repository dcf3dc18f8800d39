"""Reward-model ensembles on one base: k LoRA reward adapters, each with its own score head, whose
frozen trunk runs once for all of them, and the ways their scores combine.

Members differ by seed (LoRA and head initialisation) and by a bootstrap resample of the pairs
(Efron 1979), applied as per-pair multiplicities on batches all members share (as Bootstrapped DQN's
masks, Osband et al. 2016): with ``reward.lora.top_layers`` the decoder layers below the lowest adapted
one are the same for every member, so one forward through them serves all (:func:`run_trunk`), and
each member then runs only its own top layers (:func:`member_hidden`). Drawing a separate batch per
member would forfeit that.

Aggregations (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"), over member
scores each standardised on the SFT policy's samples first (so no member's scale dominates):
``mean``; ``min`` (worst-case optimisation, WCO); ``uwo`` = mean - lambda x variance (uncertainty-
weighted optimisation). Disagreement is the members' standard deviation per response.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from pipeline.models import forwards, loading, stacking

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


# ---------------------------------------------------------------------------------------------
# The shared trunk


def trunk_split(model, adapters: Sequence[str]) -> int:
    """Index of the lowest decoder layer that holds a LoRA weight of any of ``adapters``: every layer
    below it computes the same for all of them. 0 (nothing shared) when the layers cannot be found."""
    try:
        _, stack = loading.decoder_layers(model)
    except ValueError:
        return 0
    tags = [f".{a}." for a in adapters]
    for i, layer in enumerate(stack):
        if any(".lora_" in n and any(t in n for t in tags) for n, _ in layer.named_parameters()):
            return i
    return len(stack)


class _TrunkDone(Exception):
    """Raised by the capture hook: the layers above the trunk are not needed in the shared pass."""


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def run_trunk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int, adapter: str):
    """The output of decoder layer ``split - 1`` (whatever that layer returns: a tensor, or a tuple on
    some families) for these rows, computed once without gradients, with only ``adapter`` (a member, none
    of whose weights sit below ``split``) active: other adapters on the base, a policy's, stay out. None
    when ``split`` is 0. Nothing below ``split`` trains, so no gradient is lost."""
    if split <= 0:
        return None
    backbone, _ = forwards._backbone_and_head(model)
    _, stack = loading.decoder_layers(model)
    captured = {}

    def hook(module, args, output):
        captured["out"] = output
        raise _TrunkDone

    handle = stack[split - 1].register_forward_hook(hook)
    try:
        with stacking.active_adapters(model, [adapter]), loading.compute_context(model):
            backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask),
                     use_cache=False)
    except _TrunkDone:
        pass
    finally:
        handle.remove()
    return captured["out"]


@contextlib.contextmanager
def _replayed(stack: torch.nn.ModuleList, split: int, output) -> Iterator[None]:
    """Layers ``0..split-1`` return the trunk's recorded ``output`` instead of computing: the layer at
    ``split`` then reads the shared hidden states, and the model builds masks and positions as usual."""
    saved = [vars(layer).get("forward") for layer in stack[:split]]
    for layer in stack[:split]:
        layer.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for layer, fwd in zip(stack[:split], saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


def member_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int, trunk,
                  adapter: str) -> torch.Tensor:
    """Final hidden states (B, T, H) of the rows with only ``adapter`` active, the layers below ``split``
    replayed from ``trunk`` (:func:`run_trunk`); equal to a full forward with that adapter."""
    backbone, _ = forwards._backbone_and_head(model)
    _, stack = loading.decoder_layers(model) if split else (None, None)
    replay = _replayed(stack, split, trunk) if split else contextlib.nullcontext()
    with stacking.active_adapters(model, [adapter]), replay, loading.compute_context(model):
        return backbone(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=_position_ids(attention_mask), use_cache=False).last_hidden_state


def take_rows(rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, trunk) -> Optional[tuple]:
    """``(ids, mask, trunk, width)`` of right-padded rows ``rows`` only, cut to the longest of them
    (``width`` columns): a member whose bootstrap multiplicity of a pair is 0 need not run its own layers
    on it (about 1/e of the pairs), and the padding the dropped rows forced goes too. Exact: a right-padded
    row's hidden states do not depend on other rows or on trailing pad columns. None when the recorded
    trunk output is neither a tensor nor a tuple led by one (then run every row)."""
    width = int(mask[rows].sum(dim=1).max().item())
    if trunk is None:
        sub = None
    elif torch.is_tensor(trunk):
        sub = trunk[rows, :width]
    elif isinstance(trunk, tuple) and trunk and torch.is_tensor(trunk[0]):
        sub = (trunk[0][rows, :width], *trunk[1:])
    else:
        return None
    return ids[rows, :width], mask[rows, :width], sub, width


def right_padded(encoded: Sequence[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """``(ids, mask, pool_mask_mean, last_index)`` of rows ``(ids, response_start)``, right-padded:
    ``pool_mask_mean`` is 1 on each row's response tokens, ``last_index`` its last token."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, _) in enumerate(encoded):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    pos = torch.arange(width).unsqueeze(0)
    starts = torch.tensor([s for _, s in encoded]).unsqueeze(1)
    pool = (pos >= starts) & mask.bool()
    last = torch.tensor([len(x) - 1 for x, _ in encoded])
    return ids.to(device), mask.to(device), pool.to(device), last.to(device)


def pool_hidden(hidden: torch.Tensor, pool: torch.Tensor, last: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, H) float32 features: mean over the response tokens, or the last token's."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    return forwards.mean_pool(hidden, pool)


def member_features(model, encoded: Sequence[tuple[list[int], int]], pad_id: int, pooling: str,
                    adapters: Sequence[str], split: Optional[int] = None) -> list[torch.Tensor]:
    """(B, H) float32 features of rows ``(ids, response_start)`` under each of ``adapters``, the trunk
    below ``split`` (default: :func:`trunk_split`) run once for all of them."""
    device = next(model.parameters()).device
    split = trunk_split(model, adapters) if split is None else split
    ids, mask, pool, last = right_padded(encoded, pad_id, device)
    trunk = run_trunk(model, ids, mask, split, adapters[0])
    return [pool_hidden(member_hidden(model, ids, mask, split, trunk, a), pool, last, pooling) for a in adapters]
