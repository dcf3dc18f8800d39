"""Pure tensor functions for PPO-based RLHF.

Torch only: no models, tokenizers or config objects, so every function here can be
unit-tested with hand-made tensors and imported without pulling in transformers.

Shape conventions used in every docstring:

* ``B`` - batch size, ``T`` - (padded) response length, ``V`` - vocabulary size.
* ``mask`` - float or bool tensor ``(B, T)``, 1/True on real response tokens and
  0/False on padding. Real tokens are expected to form a prefix of each row
  (right padding), which is what :func:`first_stop_truncate` produces.

Main references:

* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
  (per-token KL penalty, score at the last token, adaptive KL controller).
* Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation" (GAE).
* Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped losses).
* Schulman 2020, "Approximating KL Divergence" (blog; k1/k2/k3 estimators).
* trl ``PPOTrainer`` (trl<=1.12) and Huang et al. 2024, "The N+ Implementation
  Details of RLHF with PPO: A Case Study on TL;DR Summarization".
* Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", arXiv 2402.14740 (RLOO).
* Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300 (GRPO), and Liu et al. 2025,
  "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783 (Dr. GRPO).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "logprobs_from_logits",
    "token_logprobs_and_entropy",
    "head_token_logprobs_and_entropy",
    "entropy_from_logits",
    "first_stop_truncate",
    "sequence_lengths",
    "last_token_index",
    "KL_ESTIMATORS",
    "kl_per_token",
    "apply_missing_eos_penalty",
    "per_token_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gae_advantages",
    "GROUP_ESTIMATORS",
    "rloo_advantages",
    "grpo_advantages",
    "group_stats",
    "critic_free_advantages",
    "policy_loss",
    "value_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "make_kl_controller",
    "explained_variance",
]

KL_ESTIMATORS = ("k1", "k2", "k3")

WHITEN_EPS = 1e-8

# GRPO's std floor: trl's GRPOTrainer divides by (std + 1e-4), so a group of near-equal scores gets
# advantages of at most |score - mean| * 1e4 instead of an unbounded blow-up.
GRPO_STD_EPS = 1e-4

GROUP_ESTIMATORS = ("rloo", "grpo")

# Denominator floor for masked means: an all-padding mask then gives 0 instead of NaN,
# and unlike torch.where(denom > 0, ...) it cannot leak NaN gradients from the unused branch.
_MEAN_DENOM_FLOOR = 1e-8

_FULL_PRECISION = (torch.float32, torch.float64)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # Dividing allocates a full (B, T, V) copy; skip it in the common temperature=1 case.
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``(B, T, V)`` float logits, already aligned so that ``logits[:, t]``
            predicts ``tokens[:, t]``.
        tokens: ``(B, T)`` long token ids.
        temperature: sampling temperature (> 0). The policy must be scored with the
            same temperature that generated the samples, otherwise the PPO ratio and
            the KL penalty are computed against the wrong distribution (Huang et al.
            2024, "The N+ implementation details of RLHF with PPO", detail on
            temperature scaling; trl PPOTrainer divides logits by temperature).

    Returns:
        ``(B, T)`` log-probabilities; float32 for half-precision inputs, otherwise
        the input dtype.

    ``z[token] - logsumexp(z)`` with ``z = logits / temperature``, one row of the batch at a time and in
    float32 for half-precision logits, as trl's ``selective_log_softmax`` (log-softmax in half precision
    loses accuracy; upcasting the whole ``(B, T, V)`` tensor doubles peak memory). See
    :func:`token_logprobs_and_entropy` for why no ``(B, T, V)`` log-softmax is formed.
    """
    return token_logprobs_and_entropy(logits, tokens, temperature)[0]


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`logprobs_from_logits` and, with ``with_entropy``, :func:`entropy_from_logits` of the same
    ``(B, T, V)`` logits in one pass: ``(logprobs (B, T), entropy (B, T) or None)``; the entropy is a
    statistic without a gradient, the log-probabilities carry one to ``logits``.

    Per row of the batch: ``lse = logsumexp(z)``, ``logprob = z[token] - lse``, ``p = exp(z - lse)``,
    ``H = lse - sum(p z)`` (the entropy form of trl's ``entropy_from_logits``); backward,
    ``d logprob / dz = onehot(token) - p``, with ``p`` recomputed from ``z`` and the kept ``lse``. Against
    ``gather(log_softmax(z))`` plus a separate entropy it keeps the logits for backward instead of a
    ``(B, T, V)`` log-softmax (the same bytes) and makes no fresh ``(B, T, V)`` tensor in forward (on CPU
    every one is page-faulted in: 50 MB at 8 x 32 x 49,152): 63.5 ms for the entropy alone against 6.9 ms
    from one (T, V) buffer (float32, AMD EPYC under the AVX2 caps). With and without a graph the
    forward is the same code, so log-probabilities agree bit for bit (the KL-0 invariant of step 1).
    E.g. z = [0, ln 3]: lse = ln 4, logprob(1) = ln 3 - ln 4 = ln 0.75, p = (0.25, 0.75),
    H = ln 4 - 0.75 ln 3 = 1.3862944 - 0.8239592 = 0.5623351.
    """
    _check_temperature(temperature)
    return _TokenLogSoftmax.apply(logits, tokens.long(), float(temperature), bool(with_entropy))


class _TokenLogSoftmax(torch.autograd.Function):
    """The autograd function behind :func:`token_logprobs_and_entropy`."""

    @staticmethod
    def _rows(logits: torch.Tensor, b: int, temperature: float) -> torch.Tensor:
        z = logits[b] if logits.dtype in _FULL_PRECISION else logits[b].float()
        return z if temperature == 1.0 else z / temperature

    @staticmethod
    def forward(ctx, logits, tokens, temperature, with_entropy):
        out_dtype = logits.dtype if logits.dtype in _FULL_PRECISION else torch.float32
        lse = torch.empty(logits.shape[:-1], dtype=out_dtype, device=logits.device)
        picked = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if with_entropy else None
        index = tokens.unsqueeze(-1)
        buf = None
        for b in range(logits.shape[0]):
            z = _TokenLogSoftmax._rows(logits, b, temperature)
            torch.logsumexp(z, dim=-1, out=lse[b])
            picked[b] = z.gather(-1, index[b]).squeeze(-1)
            if with_entropy:
                buf = torch.empty_like(z) if buf is None else buf
                p = torch.sub(z, lse[b].unsqueeze(-1), out=buf).exp_()
                entropy[b] = lse[b] - p.mul_(z).sum(dim=-1)
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature = temperature
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = grad_logprobs.to(lse.dtype).unsqueeze(-1)
        for b in range(logits.shape[0]):
            p = torch.sub(_TokenLogSoftmax._rows(logits, b, ctx.temperature), lse[b].unsqueeze(-1)).exp_()
            # d (z[token] - lse) / dz = onehot(token) - p, times the upstream gradient; then dz/dlogits = 1/T
            p.mul_(-g[b]).scatter_add_(-1, index[b], g[b])
            if ctx.temperature != 1.0:
                p.div_(ctx.temperature)
            grad[b] = p
        return grad, None, None, None


# Vocabulary columns per matmul of :func:`head_token_logprobs_and_entropy`, and rows per pass over them
# (each pass reads the whole head weight once): a block of at most 1024 x 2048 float32 logits (8 MB) is
# read back from cache by the reductions that follow its matmul. Swept on the embedded head (AMD EPYC,
# AVX2 caps, `benchmarks/lm_head.py`): 256 x 4096 and 512 x 4096 were slower at eval's 1,024 rows, 2048 and
# 4096 columns the same at PPO's 256 (README "Speed on CPUs without AMX", the LM head in vocabulary blocks).
HEAD_VOCAB_BLOCK = 2048
HEAD_ROW_BLOCK = 1024


def head_token_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False,
    vocab_block: int = HEAD_VOCAB_BLOCK, row_block: int = HEAD_ROW_BLOCK,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The log-probabilities and entropies of :func:`head_token_stats`: ``(logprobs, entropy or None)``."""
    stats = head_token_stats(hidden, weight, tokens, with_entropy, False, vocab_block, row_block)
    return stats[0], stats[1]


def head_token_stats(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False,
    with_top1: bool = False, vocab_block: int = HEAD_VOCAB_BLOCK, row_block: int = HEAD_ROW_BLOCK,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:func:`token_logprobs_and_entropy` of the logits ``z = hidden @ weight.T`` (a bias-free LM head),
    without ever forming the ``(B, T, V)`` logits.

    Args:
        hidden: ``(B, T, H)`` final hidden states, already divided by the temperature
            (``W (h / T) = (W h) / T``), in ``weight``'s dtype.
        weight: ``(V, H)`` the LM head's weight; frozen (no gradient is returned for it).
        tokens: ``(B, T)`` long token ids.
        with_entropy, with_top1: also return the entropies, whether each token is its row's top-1.
        vocab_block, row_block: the block of logits made at a time, ``row_block x vocab_block``.

    Returns ``(logprobs (B, T), entropy (B, T) or None, is_top1 (B, T) or None)``: the first two as
    :func:`token_logprobs_and_entropy` (float32 for half-precision weights), the log-probabilities with a
    gradient to ``hidden``; ``is_top1`` (bool, ``with_top1``) whether the token's logit is the row's
    largest, ``z[token] >= max z`` (a token tied with another for the largest counts, where an argmax
    would pick one of them: exact ties of float logits only).

    The logits are made ``vocab_block`` columns at a time and folded into running per-row statistics as
    the online softmax does (Milakov & Gimelshein 2018; as Liger Kernel's fused linear cross-entropy,
    Hsu et al. 2024, and Cut Cross-Entropy, Wijmans et al. 2024, do for the LM head): the running max
    ``m``, ``s = sum exp(z - m)``, for the entropy ``s1 = sum exp(z - m) z``, each rescaled by
    ``exp(m_old - m_new)`` when the max grows; then ``lse = m + ln s``, ``logprob = z[token] - lse`` and
    ``H = lse - s1 / s``. Each log-probability depends on its own position's hidden state only, and its
    gradient there is one H-vector, ``d logprob_t / d h_t = W[token_t] - sum_v p_tv W_v`` (the softmax's
    Jacobian through the linear map); its sum is accumulated the same way, ``acc = sum exp(z - m) W_v``
    block by block, so backward is ``grad_t * J_t``. Nothing of size ``(B, T, V)`` is made in forward,
    kept for backward or made in it, and each block is read back from cache rather than memory.

    With and without a graph the log-probabilities come from the same operations (bit for bit: the KL-0
    invariant of PPO's step 1). They equal :func:`token_logprobs_and_entropy` of ``hidden @ weight.T`` to float round-off (the
    logsumexp is summed in another order).

    E.g. V = 2, H = 1, W = [[0], [1]], h = ln 3: z = [0, ln 3], p = (0.25, 0.75), logprob(1) = ln 0.75
    and its gradient W[1] - (0.25 * 0 + 0.75 * 1) = 0.25 (check: d/dh (h - ln(1 + e^h)) = 1 - 0.75).
    With ``vocab_block`` 1: after block 0, m = 0, s = 1; block 1 has z = ln 3 > m, so s = 1 * exp(0 - ln 3)
    + 1 = 4/3 and m = ln 3; lse = ln 3 + ln(4/3) = ln 4, as in one block.
    """
    if weight.requires_grad:
        raise ValueError("head_token_stats returns no gradient for a trained LM head; "
                         "use token_logprobs_and_entropy on its logits")
    if vocab_block < 1 or row_block < 1:
        raise ValueError(f"vocab_block and row_block must be >= 1, got {vocab_block} and {row_block}")
    return _HeadTokenLogSoftmax.apply(hidden, weight, tokens.long(), bool(with_entropy), bool(with_top1),
                                      int(vocab_block), int(row_block))


def _head_row_stats(h: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, with_entropy: bool,
                    with_jacobian: bool, vocab_block: int):
    """For rows ``h`` (n, H) and their ``tokens`` (n,): ``(lse, z[token], entropy or None, Jacobian (n, H)
    or None, max z)`` of ``z = h @ weight.T``, by one pass over blocks of the vocabulary (see
    :func:`head_token_logprobs_and_entropy`)."""
    n, v = h.shape[0], weight.shape[0]
    stat = dict(dtype=weight.dtype if weight.dtype in _FULL_PRECISION else torch.float32, device=h.device)
    m = torch.full((n,), -math.inf, **stat)
    s = torch.zeros(n, **stat)
    s1 = torch.zeros(n, **stat) if with_entropy else None
    acc = torch.zeros(n, h.shape[1], **stat) if with_jacobian else None
    picked = torch.zeros(n, **stat)
    z_buf = torch.empty(n, min(vocab_block, v), dtype=weight.dtype, device=h.device)
    e_buf = torch.empty(n, min(vocab_block, v), **stat)
    for c in range(0, v, vocab_block):
        w_c = weight[c:c + vocab_block]
        width = w_c.shape[0]
        z = torch.mm(h, w_c.t(), out=z_buf[:, :width])
        z = z if z.dtype == stat["dtype"] else z.to(stat["dtype"])
        here = (tokens >= c) & (tokens < c + width)
        picked = torch.where(here, z.gather(1, (tokens - c).clamp(0, width - 1).unsqueeze(1)).squeeze(1), picked)
        m_new = torch.maximum(m, z.amax(dim=1))
        rescale = torch.exp(m - m_new)  # 0 on the first block (m = -inf)
        e = torch.sub(z, m_new.unsqueeze(1), out=e_buf[:, :width]).exp_()
        s.mul_(rescale).add_(e.sum(dim=1))
        if with_entropy:
            s1.mul_(rescale).add_(torch.einsum("tv,tv->t", e, z))
        if with_jacobian:
            acc.mul_(rescale.unsqueeze(1))
            if e.dtype == weight.dtype:
                acc.addmm_(e, w_c)
            else:
                acc.add_(torch.mm(e.to(weight.dtype), w_c))
        m = m_new
    lse = m + s.log()
    entropy = lse - s1 / s if with_entropy else None
    jacobian = None
    if with_jacobian:
        jacobian = weight.index_select(0, tokens).to(stat["dtype"]).sub_(acc.div_(s.unsqueeze(1)))
    return lse, picked, entropy, jacobian, m


class _HeadTokenLogSoftmax(torch.autograd.Function):
    """The autograd function behind :func:`head_token_logprobs_and_entropy`."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, with_entropy, with_top1, vocab_block, row_block):
        b_, t_, h_ = hidden.shape
        flat, flat_tokens = hidden.reshape(b_ * t_, h_), tokens.reshape(-1)
        need_grad = ctx.needs_input_grad[0]
        # at least one (possibly empty) row block, so that empty responses give empty results
        parts = [_head_row_stats(flat[r:r + row_block], weight, flat_tokens[r:r + row_block], with_entropy,
                                 need_grad, vocab_block) for r in range(0, max(b_ * t_, 1), row_block)]
        lse, picked = (torch.cat([p[i] for p in parts]).view(b_, t_) for i in (0, 1))
        entropy = torch.cat([p[2] for p in parts]).view(b_, t_) if with_entropy else None
        if need_grad:
            ctx.save_for_backward(torch.cat([p[3] for p in parts]).view(b_, t_, h_).to(hidden.dtype))
        top1 = torch.cat([p[1] >= p[4] for p in parts]).view(b_, t_) if with_top1 else None
        ctx.mark_non_differentiable(*(x for x in (entropy, top1) if x is not None))
        return picked - lse, entropy, top1

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy, _grad_top1):
        (jac,) = ctx.saved_tensors
        return grad_logprobs.to(jac.dtype).unsqueeze(-1) * jac, None, None, None, None, None, None


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: ``(B, T, V)``.
        temperature: > 0, see :func:`logprobs_from_logits`.

    Returns:
        ``(B, T)`` entropies in nats; float32 for half-precision inputs.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``, the form used by trl's
    ``entropy_from_logits`` (avoids ``p * log p`` with ``p == 0``).
    """
    _check_temperature(temperature)

    def _entropy(z: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(z, dim=-1)
        return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)

    if logits.dtype in _FULL_PRECISION:
        return _entropy(_scaled(logits, temperature))
    return torch.stack([_entropy(_scaled(row.float(), temperature)) for row in logits])


def first_stop_truncate(
    response_ids: torch.Tensor, stop_token_ids: Collection[int], pad_token_id: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token.

    Args:
        response_ids: ``(B, T)`` long, generated tokens (prompt excluded).
        stop_token_ids: ids that end a response (EOS, end-of-turn, ...). May be empty.
        pad_token_id: id written after the first stop token.

    Returns:
        ``(truncated_ids, mask, ended)``:

        * ``truncated_ids`` ``(B, T)`` long: tokens after the first stop token are
          replaced by ``pad_token_id``; the stop token itself is kept.
        * ``mask`` ``(B, T)`` bool: True up to and including the first stop token,
          True on all ``T`` positions when a row has no stop token.
        * ``ended`` ``(B,)`` bool: whether the row contains a stop token.

    The mask is derived from positions only, never by comparing ids with
    ``pad_token_id``: several tokenizers use the EOS id as pad, and comparing with pad
    would then drop the stop token (and any earlier EOS) from the mask. Mirrors trl
    PPOTrainer's ``truncate_response`` / ``first_true_indices`` (trl<=1.12).
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be (B, T), got shape {tuple(response_ids.shape)}")
    stops = torch.as_tensor(
        sorted({int(s) for s in stop_token_ids}), dtype=response_ids.dtype, device=response_ids.device
    )
    is_stop = torch.isin(response_ids, stops)
    stops_so_far = is_stop.long().cumsum(dim=1)
    # Positions with a stop token strictly before them are the ones to drop.
    mask = (stops_so_far - is_stop.long()) == 0
    truncated = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    ended = is_stop.any(dim=1)
    return truncated, mask, ended


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens per row.

    Args:
        mask: ``(B, T)`` float or bool.

    Returns:
        ``(B,)`` long.
    """
    return (mask != 0).sum(dim=-1).long()


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row.

    Args:
        mask: ``(B, T)`` float or bool.

    Returns:
        ``(B,)`` long. A row with no real token returns 0 (there is no valid index;
        callers that scatter into that position must also check
        :func:`sequence_lengths` > 0, as :func:`per_token_rewards` does).
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask != 0, positions, torch.zeros_like(positions)).amax(dim=-1).long()


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(policy || reference)`` from tokens sampled from the policy.

    Args:
        logprobs: ``(B, T)`` policy log-probabilities of the sampled tokens.
        ref_logprobs: ``(B, T)`` reference-model log-probabilities of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (Schulman 2020, "Approximating KL
            Divergence"):

            * ``k1 = logp - logp_ref``: unbiased, high variance, can be negative
              per token. Used for the reward penalty by Ziegler et al. 2019 and trl.
            * ``k2 = 0.5 * (logp - logp_ref)^2``: biased, low variance, >= 0.
            * ``k3 = (r - 1) - log r`` with ``r = exp(logp_ref - logp)``: unbiased,
              >= 0, low variance.

    Returns:
        ``(B, T)``. Padding positions are not masked here.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator == "k3":
        d = ref_logprobs - logprobs
        # expm1(d) - d == (exp(d) - 1) - d without cancellation for small |d|, so the
        # estimate stays >= 0 (and exactly 0 for d == 0) in floating point.
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def apply_missing_eos_penalty(
    scores: torch.Tensor, ended: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Add ``penalty`` to the score of every response that never produced a stop token.

    Args:
        scores: ``(B,)`` reward-model scores.
        ended: ``(B,)`` bool from :func:`first_stop_truncate`.
        penalty: signed number ADDED to the score (e.g. ``-1.0``). Note trl's
            ``missing_eos_penalty`` option is a positive number that it subtracts.

    Returns:
        ``(B,)`` new tensor; ``scores`` is not modified.

    Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"): penalising
    truncated, EOS-less completions stops the policy from learning to ramble to the
    length limit; trl PPOTrainer ``missing_eos_penalty``.
    """
    not_ended = (~ended.bool()).to(scores.dtype)
    return scores + penalty * not_ended


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: Union[float, torch.Tensor],
    missing_eos_penalty: Optional[float] = None,
    ended: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense per-token PPO rewards: KL penalty on every token plus the score at the end.

    ``R_t = -kl_coef * kl_t`` on every real token, and the sequence score is added at
    the last real token of each row (Ziegler et al. 2019, eq. 2; trl PPOTrainer).

    Args:
        scores: ``(B,)`` reward-model scores.
        kl: ``(B, T)`` per-token KL estimate (:func:`kl_per_token`); should be detached.
        mask: ``(B, T)`` float or bool.
        kl_coef: KL coefficient beta (a float, or the controller's ``value``).
        missing_eos_penalty: if not None, added to the scores of rows with
            ``ended == False`` first (:func:`apply_missing_eos_penalty`).
        ended: ``(B,)`` bool, required when ``missing_eos_penalty`` is given.

    Returns:
        ``(B, T)`` rewards, 0 on padding. A row with no real token gets no score.
    """
    if missing_eos_penalty is not None:
        if ended is None:
            raise ValueError("`ended` is required when missing_eos_penalty is set")
        scores = apply_missing_eos_penalty(scores, ended, missing_eos_penalty)
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    has_tokens = (sequence_lengths(mask) > 0).to(rewards.dtype)
    last = last_token_index(mask).unsqueeze(-1)
    score_col = (scores.to(rewards.dtype) * has_tokens).unsqueeze(-1)
    return rewards.scatter_add(-1, last, score_col)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None
) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is nonzero.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x`` (float or bool).
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        0-d tensor, or ``x`` reduced over ``dim``. An all-zero mask gives 0 (not NaN).

    trl ``core.masked_mean``.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=_MEAN_DENOM_FLOOR)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=_MEAN_DENOM_FLOOR)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is nonzero.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x``.
        unbiased: apply Bessel's correction ``n / (n - 1)`` with ``n = mask.sum()``.

    Returns:
        0-d tensor.

    Raises:
        ValueError: if ``unbiased`` and fewer than 2 entries are unmasked, as trl's
        ``masked_var`` does (the correction would divide by zero).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = float(mask.to(x.dtype).sum())
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 unmasked entries, mask sums to {n}")
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the unmasked entries.

    Args:
        x: ``(B, T)``.
        mask: ``(B, T)``.
        shift_mean: if False the mean is added back (only the scale changes), as trl
            does when whitening rewards.

    Returns:
        ``(B, T)``; padding positions are 0. Uses the unbiased variance and eps 1e-8.

    trl ``core.masked_whiten``, plus zeroing of padding so whitened padding cannot leak
    into later sums.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(whitened.dtype)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, computed backwards over ``T``
    (Schulman et al. 2016, eq. 16; trl PPOTrainer's loop). The value after the last
    real token is 0 (the episode ends there), and values/rewards at padded positions
    are multiplied by the mask so whatever the value head emitted on padding is ignored.

    Args:
        rewards: ``(B, T)`` per-token rewards (:func:`per_token_rewards`).
        values: ``(B, T)`` value-head predictions from rollout time (detached).
        mask: ``(B, T)``, right-padded.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 on padding, with
        ``returns = advantages + values`` computed before any whitening. No whitening
        is done here; the caller applies :func:`masked_whiten` to the advantages.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.shape[-1]
    last_gae = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * m
    returns = (advantages + values) * m
    return advantages, returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B,)`` scores as ``(B / k, k)`` groups (row ``g * k + j`` is sample ``j`` of prompt ``g``), each
    shifted by its first member.

    Every group estimator here is shift-invariant within a group. The shift makes a group of equal
    scores exact zeros, so its advantages come out exactly 0: unshifted, float32 rounding gave
    three scores of 0.7 a leave-one-out baseline of 0.69999993 and 0.45 a group mean of 0.44999996.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group estimators need at least 2 samples per prompt, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    g = scores.reshape(-1, group_size)
    return g - g[:, :1]


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, arXiv 2402.14740; trl's RLOO).

    ``A_i = s_i - (sum_{j != i} s_j) / (k - 1)`` over the ``k`` samples of the same prompt: each
    sample's baseline is the mean score of the *other* samples, so it is independent of the sample and
    the estimator stays unbiased. Equivalently ``A_i = k / (k - 1) * (s_i - mean)``: the advantages of
    a group sum to 0.

    Args:
        scores: ``(B,)`` sequence rewards, prompt-major: ``B = n_prompts * k``, row ``g * k + j`` is
            sample ``j`` of prompt ``g``.
        group_size: ``k >= 2``.

    Returns:
        ``(B,)`` advantages, one per sequence.
    """
    g = _groups(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = GRPO_STD_EPS
) -> torch.Tensor:
    """Group-relative advantages (GRPO; Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, sec. 4.1.2).

    ``A_i = (s_i - mean(group)) / (std(group) + eps)`` over the ``k`` samples of the same prompt,
    with the unbiased (``k - 1``) standard deviation and ``eps = 1e-4``, as trl's ``GRPOTrainer``.
    ``scale_std=False`` drops the division (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783: dividing by
    the std up-weights prompts whose samples nearly agree, a difficulty bias). A group whose scores
    are all equal gets advantage exactly 0 either way: it carries no preference among its samples.

    Args:
        scores: ``(B,)`` sequence rewards, prompt-major as in :func:`rloo_advantages`.
        group_size: ``k >= 2``.
        scale_std: divide by the group's std (GRPO) or not (Dr. GRPO).
        eps: added to the std.

    Returns:
        ``(B,)`` advantages, one per sequence.
    """
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_stats(scores: torch.Tensor, group_size: int) -> Dict[str, torch.Tensor]:
    """Diagnostics of a group layout, as 0-d tensors.

    * ``score_std``: mean over prompts of the within-prompt std (unbiased) of the sequence rewards:
      how much the samples of one prompt differ, the only signal a group estimator sees.
    * ``flat_fraction``: fraction of prompts whose ``k`` rewards are all equal (zero advantage, no
      gradient from them: DAPO, Yu et al. 2025, arXiv 2503.14476, resamples such groups).
    """
    g = _groups(scores, group_size)
    flat = (g == g[:, :1]).all(dim=1)
    return {"score_std": g.std(dim=1).mean(), "flat_fraction": flat.to(g.dtype).mean()}


def critic_free_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: Union[float, torch.Tensor],
    group_size: int,
    estimator: str,
    scale_std: bool = True,
) -> torch.Tensor:
    """Per-token advantages of a critic-free estimator: one advantage per sequence on all its tokens.

    The sequence reward is ``score - kl_coef * sum_t kl_t`` over real tokens (KL in the reward at the
    sequence level, as trl's RLOO; pass ``kl_coef=0`` when the KL is a loss term instead), the group
    estimator turns it into one advantage per sequence, and that advantage is given to every real
    response token (the whole response is one action, as in Ahmadian et al. 2024; GRPO's outcome
    supervision, Shao et al. 2024 sec. 4.1.2), so the token-level clipped loss of :func:`policy_loss`
    applies unchanged.

    Args:
        scores: ``(B,)`` sequence scores, prompt-major groups of ``group_size``.
        kl: ``(B, T)`` per-token KL estimate (:func:`kl_per_token`), detached.
        mask: ``(B, T)`` float or bool.
        kl_coef: beta.
        group_size: samples per prompt ``k >= 2``.
        estimator: ``"rloo"`` or ``"grpo"``.
        scale_std: GRPO only, see :func:`grpo_advantages`.

    Returns:
        ``(B, T)`` advantages, 0 on padding.
    """
    m = mask.to(kl.dtype)
    sequence_reward = scores.to(kl.dtype) - kl_coef * (kl * m).sum(dim=-1)
    if estimator == "rloo":
        adv = rloo_advantages(sequence_reward, group_size)
    elif estimator == "grpo":
        adv = grpo_advantages(sequence_reward, group_size, scale_std=scale_std)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}; valid: {', '.join(GROUP_ESTIMATORS)}")
    return adv.unsqueeze(-1) * m


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate policy loss (Schulman et al. 2017, eq. 7), negated for descent.

    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))`` with
    ``ratio = exp(logprobs - old_logprobs)``; token-level averaging as in trl
    PPOTrainer (trl<=1.12).

    Args:
        logprobs: ``(B, T)`` current policy log-probs (with grad).
        old_logprobs: ``(B, T)`` log-probs at rollout time (detached).
        advantages: ``(B, T)`` (typically whitened).
        mask: ``(B, T)``.
        cliprange: ``c``.

    Returns:
        ``(loss, stats)``: 0-d loss tensor, and a dict of detached 0-d tensors:

        * ``ratio_mean``: masked mean of the ratio.
        * ``clipfrac``: fraction of real tokens where the clipped term was the larger
          (``pg_losses2 > pg_losses1``, trl's definition).
        * ``approx_kl``: masked mean of ``0.5 * (logprobs - old_logprobs)^2`` (trl).
        * ``approx_kl_k3``: masked mean of ``(ratio - 1) - log ratio`` (Schulman 2020
          k3 estimator, as used by later trl versions).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses1, pg_losses2), mask)
    with torch.no_grad():
        stats = {
            "ratio_mean": masked_mean(ratio, mask).detach(),
            "clipfrac": masked_mean((pg_losses2 > pg_losses1).to(ratio.dtype), mask).detach(),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask).detach(),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped value loss, as in trl PPOTrainer (trl<=1.12) and OpenAI baselines ppo2.

    ``v_clip = clip(values, old_values - c, old_values + c)`` and
    ``loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2))``.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        old_values: ``(B, T)`` value predictions at rollout time (detached).
        returns: ``(B, T)`` targets from :func:`gae_advantages`.
        mask: ``(B, T)``.
        cliprange_value: ``c``.

    Returns:
        ``(loss, stats)``: 0-d loss, and detached 0-d tensors ``vf_clipfrac``
        (fraction of real tokens where the clipped error was the larger) and
        ``value_mean`` (masked mean of ``values``).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns).square()
    vf_losses2 = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask).detach(),
            "value_mean": masked_mean(values, mask).detach(),
        }
    return loss, stats


def _as_float(x: Union[float, torch.Tensor]) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2; trl ``AdaptiveKLController``).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``,
    ``value *= 1 + e * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> float:
        """Update from the measured KL of the last batch; ``n_steps`` = samples in it.

        Returns the new coefficient.
        """
        proportional_error = min(max(_as_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the :class:`AdaptiveKLController` interface (trl ``FixedKLController``)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> float:
        return self.value

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.value = float(state["value"])


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate's multiplier before update ``step`` (0-based) of ``steps``: ``linear`` decays
    from 1 to 0 over the run (trl's PPO trainer; Ouyang et al. 2022 decay too), ``constant`` stays 1.
    E.g. linear, step 30 of 40: 1 - 30 / 40 = 0.25."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - step / max(1, steps))
    raise ValueError(f"ppo.lr_scheduler must be linear or constant, got {schedule!r}")


def make_kl_controller(
    kind: str, init: float, target: Optional[float] = None, horizon: Optional[int] = None
) -> Union[AdaptiveKLController, FixedKLController]:
    """Build a KL controller: ``kind`` is ``"fixed"`` or ``"adaptive"``.

    ``target`` and ``horizon`` are required (and must be > 0) for ``"adaptive"``
    and ignored for ``"fixed"``.
    """
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs both `target` and `horizon`")
        return AdaptiveKLController(init, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; valid: fixed, adaptive")


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the unmasked entries.

    Args:
        values, returns, mask: ``(B, T)``.

    Returns:
        python float; 1 is a perfect value function, <= 0 is no better than
        predicting the mean. NaN when the returns have zero variance (as in
        stable-baselines3's ``explained_variance``).
    """
    var_returns = _as_float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0.0:
        return math.nan
    var_residual = _as_float(masked_var(returns - values, mask, unbiased=False))
    return 1.0 - var_residual / var_returns
