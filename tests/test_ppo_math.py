"""Hand-worked checks for pipeline/rl/ppo_math.py.

Every expected number is derived in a comment next to the assertion, so a failure can
be checked against the arithmetic rather than against another implementation.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    critic_free_advantages,
    entropy_from_logits,
    explained_variance,
    first_stop_truncate,
    gae_advantages,
    group_stats,
    grpo_advantages,
    head_token_logprobs_and_entropy,
    head_token_stats,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    lr_factor,
    token_logprobs_and_entropy,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    rloo_advantages,
    sequence_lengths,
    value_loss,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# Row 0 has 3 real tokens, row 1 has 2 real tokens + 1 pad (B=2, T=3).
MASK_3_2 = t([[1, 1, 1], [1, 1, 0]])


# --------------------------------------------------------------------------- logprobs / entropy


def test_logprobs_hand_computed_with_temperature():
    # V=2, logits [0, ln 3]: softmax = [1/(1+3), 3/(1+3)] = [0.25, 0.75]
    # temperature 2: logits/2 = [0, ln(3)/2] -> p1 = sqrt(3)/(1+sqrt(3)) = 1.7320508/2.7320508 = 0.6339746
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (B=1, T=2, V=2)
    tokens = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[math.log(p1), math.log(1 - p1)]])


def test_logprobs_temperature_matches_manual_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    expected = F.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, tokens, temperature=0.7)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, expected)
    # Temperature must actually change the result.
    assert not torch.allclose(out, logprobs_from_logits(logits, tokens))


def test_logprobs_bf16_path_matches_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g).to(torch.bfloat16)
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    out = logprobs_from_logits(logits, tokens, temperature=0.9)
    assert out.dtype == torch.float32
    expected = F.log_softmax(logits.float() / 0.9, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected)


def test_logprobs_without_a_graph_equal_the_graph_path_bit_for_bit():
    # no graph: one row at a time (no (B, T, V) log-softmax tensor); with a graph: one call
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 13, (3, 5), generator=g)
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(3, 5, 13, generator=g, dtype=dtype)
        with torch.no_grad():
            rowwise = logprobs_from_logits(logits, tokens, temperature=0.7)
        graph = logprobs_from_logits(logits.clone().requires_grad_(True), tokens, temperature=0.7)
        assert rowwise.dtype == dtype and graph.requires_grad
        assert torch.equal(rowwise, graph.detach())


def test_token_logprobs_and_entropy_by_hand():
    # z = [0, ln 3]: lse = ln 4; logprob(1) = ln 3 - ln 4 = ln 0.75; p = (0.25, 0.75);
    # H = ln 4 - (0.25 x 0 + 0.75 x ln 3) = 1.3862944 - 0.8239592 = 0.5623351
    # d logprob(1) / dz = onehot(1) - p = (-0.25, 0.25)
    logits = t([[[0.0, math.log(3.0)]]]).requires_grad_(True)
    logprobs, entropy = token_logprobs_and_entropy(logits, torch.tensor([[1]]), with_entropy=True)
    close(logprobs, [[math.log(0.75)]])
    close(entropy, [[0.5623351]])
    assert not entropy.requires_grad
    logprobs.sum().backward()
    close(logits.grad, [[[-0.25, 0.25]]])
    assert token_logprobs_and_entropy(logits, torch.tensor([[1]]))[1] is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradient_equals_autograd_of_log_softmax(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 17, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 17, (3, 4), generator=g)
    upstream = torch.randn(3, 4, generator=g, dtype=torch.float64)
    got, entropy = token_logprobs_and_entropy(logits, tokens, temperature, with_entropy=True)
    (grad,) = torch.autograd.grad((got * upstream).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    want = F.log_softmax(ref_logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), ref_logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach(), temperature), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, tokens, temperature)[0], (logits,))


def test_token_logprobs_bf16_logits_get_bf16_gradients_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    logits32 = torch.randn(2, 3, 9, generator=g)
    tokens = torch.randint(0, 9, (2, 3), generator=g)
    logits = logits32.to(torch.bfloat16).requires_grad_(True)
    got, entropy = token_logprobs_and_entropy(logits, tokens, 0.9, with_entropy=True)
    assert got.dtype == torch.float32 and entropy.dtype == torch.float32
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    exact = logits.detach().float().requires_grad_(True)
    F.log_softmax(exact / 0.9, -1).gather(-1, tokens.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits.grad.float(), exact.grad, atol=1e-2, rtol=0)  # bf16's 8 bits


def test_head_token_logprobs_by_hand():
    # W = [[0], [1]], h = ln 3: z = W h = [0, ln 3], so logprob(1) = ln 0.75 and H = 0.5623351 as above;
    # d logprob(1) / dh = W[1] - (p0 W[0] + p1 W[1]) = 1 - (0.25 x 0 + 0.75 x 1) = 0.25
    weight = t([[0.0], [1.0]])
    hidden = t([[[math.log(3.0)]]]).requires_grad_(True)
    logprobs, entropy = head_token_logprobs_and_entropy(hidden, weight, torch.tensor([[1]]), with_entropy=True)
    close(logprobs, [[math.log(0.75)]])
    close(entropy, [[0.5623351]])
    assert not entropy.requires_grad
    logprobs.sum().backward()
    close(hidden.grad, [[[0.25]]])


def test_head_token_top1_by_hand():
    # W = [[0], [1], [1]], h = ln 3: z = [0, ln 3, ln 3]; tokens 1 and 2 tie for the largest logit and both
    # count as top-1 (z[token] >= max z), token 0 does not; in one or one-column blocks alike. The
    # log-probabilities: ln(3 / 7) for 1 and 2, ln(1 / 7) for 0, each with a gradient as without with_top1.
    weight = t([[0.0], [1.0], [1.0]])
    hidden = t([[[math.log(3.0)]] * 3])
    tokens = torch.tensor([[0, 1, 2]])
    for block in (3, 1):
        logprobs, entropy, top1 = head_token_stats(hidden, weight, tokens, with_top1=True, vocab_block=block)
        assert entropy is None and top1.tolist() == [[False, True, True]]
        close(logprobs, [[math.log(1 / 7), math.log(3 / 7), math.log(3 / 7)]])
    assert head_token_stats(hidden, weight, tokens)[2] is None


def test_head_token_logprobs_equal_the_linear_head_then_token_logprobs():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64)
    hidden = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 17, (3, 4), generator=g)
    upstream = torch.randn(3, 4, generator=g, dtype=torch.float64)
    got, entropy = head_token_logprobs_and_entropy(hidden, weight, tokens, with_entropy=True)
    (grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    want, want_entropy = token_logprobs_and_entropy(F.linear(ref_hidden, weight), tokens, with_entropy=True)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), ref_hidden)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda h: head_token_logprobs_and_entropy(h, weight, tokens)[0], (hidden,))
    with torch.no_grad():  # the same logprobs without a graph (the KL-0 invariant of step 1)
        assert torch.equal(head_token_logprobs_and_entropy(hidden, weight, tokens)[0], got.detach())


def test_head_token_logprobs_in_vocabulary_blocks_by_hand():
    # One column per block: block 0 (z = 0) gives m = 0, s = 1, s1 = 0; block 1 (z = ln 3 > m) rescales by
    # exp(0 - ln 3) = 1/3: s = 1/3 + 1 = 4/3, s1 = 0 + 1 x ln 3, m = ln 3; lse = ln 3 + ln(4/3) = ln 4,
    # logprob(1) = ln 3 - ln 4 = ln 0.75, H = ln 4 - (ln 3) / (4/3) = 0.5623351, as in one block
    weight = t([[0.0], [1.0]])
    hidden = t([[[math.log(3.0)]]]).requires_grad_(True)
    logprobs, entropy = head_token_logprobs_and_entropy(hidden, weight, torch.tensor([[1]]), with_entropy=True,
                                                         vocab_block=1)
    close(logprobs, [[math.log(0.75)]])
    close(entropy, [[0.5623351]])
    logprobs.sum().backward()
    close(hidden.grad, [[[0.25]]])


@pytest.mark.parametrize("vocab_block,row_block", [(1, 1), (4, 5), (5, 3), (17, 12), (64, 64)])
def test_head_token_logprobs_do_not_depend_on_the_blocks(vocab_block, row_block):
    # Blocks that divide neither V = 17 nor the 12 rows, one that holds everything, and one column at a time
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64) * 3  # wide logits: the max moves between blocks
    hidden = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 17, (3, 4), generator=g)
    got, entropy = head_token_logprobs_and_entropy(hidden, weight, tokens, True, vocab_block, row_block)
    (grad,) = torch.autograd.grad(got.sum(), hidden)
    ref = hidden.detach().clone().requires_grad_(True)
    want, want_entropy = token_logprobs_and_entropy(F.linear(ref, weight), tokens, with_entropy=True)
    (want_grad,) = torch.autograd.grad(want.sum(), ref)
    for a, b in ((got, want), (entropy, want_entropy), (grad, want_grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=">= 1"):
        head_token_logprobs_and_entropy(hidden, weight, tokens, vocab_block=0)


def test_head_token_logprobs_of_empty_responses():
    weight = torch.randn(9, 4)
    hidden = torch.randn(2, 0, 4, requires_grad=True)
    got, entropy = head_token_logprobs_and_entropy(hidden, weight, torch.zeros(2, 0, dtype=torch.long), True)
    assert got.shape == entropy.shape == (2, 0)
    got.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros(2, 0, 4))


def test_head_token_logprobs_refuse_a_trained_head_and_keep_bf16_gradients():
    weight = torch.randn(9, 4, requires_grad=True)
    with pytest.raises(ValueError, match="trained LM head"):
        head_token_logprobs_and_entropy(torch.randn(1, 2, 4), weight, torch.zeros(1, 2, dtype=torch.long))
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(9, 4, generator=g)
    hidden32 = torch.randn(2, 3, 4, generator=g)
    tokens = torch.randint(0, 9, (2, 3), generator=g)
    hidden = hidden32.to(torch.bfloat16).requires_grad_(True)
    got, _ = head_token_logprobs_and_entropy(hidden, weight.to(torch.bfloat16), tokens)
    assert got.dtype == torch.float32
    got.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16
    exact = hidden.detach().float().requires_grad_(True)
    F.log_softmax(F.linear(exact, weight.to(torch.bfloat16).float()), -1).gather(-1, tokens.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(hidden.grad.float(), exact.grad, atol=3e-2, rtol=0)  # bf16's 8 bits


def test_logprobs_rejects_nonpositive_temperature():
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy_uniform_is_log_v():
    # All-equal logits -> uniform over V=7 -> H = log 7 = 1.9459101, at any temperature.
    logits = torch.zeros(2, 3, 7)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(7)))
    close(entropy_from_logits(logits, temperature=0.5), torch.full((2, 3), math.log(7)))
    close(entropy_from_logits(logits.to(torch.bfloat16)), torch.full((2, 3), math.log(7)))


def test_entropy_hand_computed():
    # p = [0.25, 0.75]: H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    logits = t([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(logits), [[0.5623351]])
    # temperature 2: p1 = 0.6339746 (see test above), H = -(0.3660254 ln 0.3660254 + 0.6339746 ln 0.6339746)
    #             = 0.3678748 + 0.2889316 = 0.6568064
    close(entropy_from_logits(logits, temperature=2.0), [[0.6568064]])


# --------------------------------------------------------------------------- truncation / lengths


def test_first_stop_truncate_hand_rows():
    stop, pad = {2}, 0
    ids = torch.tensor(
        [
            [5, 2, 7, 8],  # stop in the middle: keep [5, 2], pad the rest
            [2, 5, 6, 7],  # stop at position 0: keep only the stop token
            [5, 6, 7, 8],  # no stop: untouched, full mask, not ended
            [5, 2, 2, 9],  # only the FIRST stop counts
        ]
    )
    out, mask, ended = first_stop_truncate(ids, stop, pad)
    assert torch.equal(out, torch.tensor([[5, 2, 0, 0], [2, 0, 0, 0], [5, 6, 7, 8], [5, 2, 0, 0]]))
    assert torch.equal(mask.long(), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(ended, torch.tensor([True, True, False, True]))
    assert torch.equal(ids[0], torch.tensor([5, 2, 7, 8]))  # input not modified


def test_first_stop_truncate_several_stop_ids():
    # stop ids {2, 3}: first of either one ends the row (3 at position 1).
    out, mask, ended = first_stop_truncate(torch.tensor([[5, 3, 2, 1]]), [2, 3], pad_token_id=0)
    assert torch.equal(out, torch.tensor([[5, 3, 0, 0]]))
    assert torch.equal(mask.long(), torch.tensor([[1, 1, 0, 0]]))
    assert ended.tolist() == [True]


def test_first_stop_truncate_pad_equals_eos():
    # Tokenizer with pad == eos == 0. Comparing with pad would give mask [1, 0, 0, 0] for
    # row 0 and an all-zero mask for row 1; the stop token must stay inside the mask.
    ids = torch.tensor([[4, 0, 0, 0], [0, 0, 0, 0], [4, 5, 6, 7]])
    out, mask, ended = first_stop_truncate(ids, [0], pad_token_id=0)
    assert torch.equal(out, ids)
    assert torch.equal(mask.long(), torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]))
    assert ended.tolist() == [True, True, False]
    assert sequence_lengths(mask).tolist() == [2, 1, 4]


def test_first_stop_truncate_empty_stop_set():
    ids = torch.tensor([[1, 2, 3]])
    out, mask, ended = first_stop_truncate(ids, [], pad_token_id=0)
    assert torch.equal(out, ids) and mask.all() and ended.tolist() == [False]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.long])
def test_sequence_lengths_and_last_token_index(dtype):
    # Row lengths 3, 2, 0 -> last indices 2, 1 and 0 for the all-padding row (documented).
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).to(dtype)
    assert sequence_lengths(mask).tolist() == [3, 2, 0]
    assert last_token_index(mask).tolist() == [2, 1, 0]
    assert sequence_lengths(mask).dtype == torch.long and last_token_index(mask).dtype == torch.long


# --------------------------------------------------------------------------- KL


def test_kl_estimators_hand_computed():
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    # k1 = logp - ref = [-1 + 1.5, -2 + 1] = [0.5, -1.0]
    close(kl_per_token(logp, ref, "k1"), [[0.5, -1.0]])
    # k2 = 0.5 * k1^2 = [0.5 * 0.25, 0.5 * 1] = [0.125, 0.5]
    close(kl_per_token(logp, ref, "k2"), [[0.125, 0.5]])
    # k3: d = ref - logp = [-0.5, 1.0], r = e^d = [0.6065307, 2.7182818]
    #     (r - 1) - d = [-0.3934693 + 0.5, 1.7182818 - 1.0] = [0.1065307, 0.7182818]
    close(kl_per_token(logp, ref, "k3"), [[0.1065307, 0.7182818]])
    # Default is k1.
    close(kl_per_token(logp, ref), [[0.5, -1.0]])


def test_kl_exactly_zero_when_logprobs_equal():
    logp = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_per_token(logp, logp.clone(), est), torch.zeros(2, 4)), est


def test_k3_never_negative_but_k1_can_be():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(64, 32, generator=g) * 3
    ref = torch.randn(64, 32, generator=g) * 3
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, ref, "k2") >= 0).all()
    assert (kl_per_token(logp, ref, "k1") < 0).any()
    # Tiny differences, where exp(d) - 1 - d would cancel badly, still give >= 0.
    tiny = logp + 1e-7 * torch.randn(64, 32, generator=g)
    assert (kl_per_token(tiny.float(), logp.float(), "k3") >= 0).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# --------------------------------------------------------------------------- rewards


def test_per_token_rewards_hand_computed_with_padding():
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    kl = t([[0.1, 0.2, -0.1, 0.3], [0.5, 0.4, 9.0, 9.0]])  # 9.0 = garbage on padding
    scores = t([2.0, -1.0])
    # row 0: -0.5 * kl = [-0.05, -0.1, 0.05, -0.15]; score 2 at index 3: -0.15 + 2 = 1.85
    # row 1: -0.5 * kl = [-0.25, -0.2, (pad) 0, 0]; score -1 at index 1: -0.2 - 1 = -1.2
    out = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    close(out, [[-0.05, -0.1, 0.05, 1.85], [-0.25, -1.2, 0.0, 0.0]])
    # Same with a bool mask and a tensor kl_coef.
    close(per_token_rewards(scores, kl, mask.bool(), kl_coef=torch.tensor(0.5)), out)


def test_zero_kl_rewards_are_just_the_score_at_last_token():
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    logp = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    scores = t([2.0, -1.0])
    for est in ("k1", "k3"):
        kl = kl_per_token(logp, logp.clone(), est)
        out = per_token_rewards(scores, kl, mask, kl_coef=0.3)
        assert torch.equal(out, t([[0, 0, 0, 2.0], [0, -1.0, 0, 0]])), est


def test_apply_missing_eos_penalty():
    scores = t([2.0, -1.0, 0.5])
    ended = torch.tensor([True, False, False])
    # penalty is added to rows that did not end: [2, -1 - 1, 0.5 - 1] = [2, -2, -0.5]
    close(apply_missing_eos_penalty(scores, ended, -1.0), [2.0, -2.0, -0.5])
    close(scores, [2.0, -1.0, 0.5])  # not modified in place


def test_per_token_rewards_missing_eos_penalty_only_on_unended_rows():
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    kl = t([[0.1, 0.2, -0.1, 0.3], [0.5, 0.4, 9.0, 9.0]])
    scores = t([2.0, -1.0])
    ended = torch.tensor([True, False])
    # row 0 ended: unchanged, 1.85 at index 3 (see hand test above)
    # row 1 did not end: score -1 + (-1) = -2; at index 1: -0.2 - 2 = -2.2
    out = per_token_rewards(scores, kl, mask, 0.5, missing_eos_penalty=-1.0, ended=ended)
    close(out, [[-0.05, -0.1, 0.05, 1.85], [-0.25, -2.2, 0.0, 0.0]])
    with pytest.raises(ValueError):
        per_token_rewards(scores, kl, mask, 0.5, missing_eos_penalty=-1.0)


def test_per_token_rewards_empty_row_gets_no_score():
    mask = t([[1, 1], [0, 0]])
    out = per_token_rewards(t([1.0, 5.0]), torch.zeros(2, 2, dtype=torch.float64), mask, 0.1)
    close(out, [[0.0, 1.0], [0.0, 0.0]])


# --------------------------------------------------------------------------- masked statistics

X = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
XMASK = t([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_masked_mean():
    # (1 + 2 + 3 + 4 + 5) / 5 = 3; per row: 6/3 = 2, 9/2 = 4.5
    close(masked_mean(X, XMASK), 3.0)
    close(masked_mean(X, XMASK.bool()), 3.0)
    close(masked_mean(X, XMASK, dim=1), [2.0, 4.5])
    # All-padding mask gives 0, not NaN.
    close(masked_mean(X, torch.zeros_like(XMASK)), 0.0)


def test_masked_var():
    # mean 3, squared deviations 4, 1, 0, 1, 4 -> sum 10; biased 10/5 = 2, unbiased 10/4 = 2.5
    close(masked_var(X, XMASK, unbiased=False), 2.0)
    close(masked_var(X, XMASK), 2.5)
    with pytest.raises(ValueError):
        masked_var(X, t([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten():
    # (x - 3) / sqrt(2.5): sqrt(2.5) = 1.5811388
    # [-2, -1, 0] / 1.5811388 = [-1.2649111, -0.6324555, 0]; [1, 2] / 1.5811388 = [0.6324555, 1.2649111]
    w = masked_whiten(X, XMASK)
    close(w, [[-1.2649111, -0.6324555, 0.0, 0.0], [0.6324555, 1.2649111, 0.0, 0.0]])
    close(masked_mean(w, XMASK), 0.0)
    close(masked_var(w, XMASK), 1.0)
    assert (w[XMASK == 0] == 0).all()
    # shift_mean=False adds the mean 3 back on real tokens; padding still 0.
    close(
        masked_whiten(X, XMASK, shift_mean=False),
        [[1.7350889, 2.3675445, 3.0, 0.0], [3.6324555, 4.2649111, 0.0, 0.0]],
    )


# --------------------------------------------------------------------------- GAE

REWARDS = t([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])  # 5.0 = garbage on row 1's pad
VALUES = t([[0.5, 0.6, 0.7], [0.4, 0.3, 9.0]])  # 9.0 = garbage on row 1's pad


def test_gae_gamma1_lam095_hand_computed():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK_3_2, gamma=1.0, lam=0.95)
    # row 0 (V after the last token = 0):
    #   t=2: delta = 1 + 1*0 - 0.7 = 0.3                A2 = 0.3
    #   t=1: delta = 0 + 1*0.7 - 0.6 = 0.1              A1 = 0.1 + 0.95*0.3 = 0.385
    #   t=0: delta = 0 + 1*0.6 - 0.5 = 0.1              A0 = 0.1 + 0.95*0.385 = 0.46575
    # row 1 (padding at t=2 ignored, V beyond t=1 = 0):
    #   t=1: delta = 1.0 + 0 - 0.3 = 0.7                A1 = 0.7
    #   t=0: delta = 0.2 + 1*0.3 - 0.4 = 0.1            A0 = 0.1 + 0.95*0.7 = 0.765
    close(adv, [[0.46575, 0.385, 0.3], [0.765, 0.7, 0.0]])
    # returns = A + V: [0.96575, 0.985, 1.0], [1.165, 1.0, 0 (pad)]
    close(ret, [[0.96575, 0.985, 1.0], [1.165, 1.0, 0.0]])


def test_gae_gamma09_lam05_hand_computed():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK_3_2, gamma=0.9, lam=0.5)
    # gamma*lam = 0.45
    # row 0:
    #   t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                       A2 = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.63 - 0.6 = 0.03      A1 = 0.03 + 0.45*0.3 = 0.165
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.54 - 0.5 = 0.04      A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1:
    #   t=1: delta = 1.0 + 0.9*0 - 0.3 = 0.7                     A1 = 0.7
    #   t=0: delta = 0.2 + 0.9*0.3 - 0.4 = 0.07                  A0 = 0.07 + 0.45*0.7 = 0.385
    close(adv, [[0.11425, 0.165, 0.3], [0.385, 0.7, 0.0]])
    # returns = A + V: [0.61425, 0.765, 1.0], [0.785, 1.0, 0]
    close(ret, [[0.61425, 0.765, 1.0], [0.785, 1.0, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_padded_tail_does_not_matter(gamma, lam):
    # Row 1 alone, unpadded (T=2), must equal row 1 of the padded batch...
    adv_short, ret_short = gae_advantages(REWARDS[1:, :2], VALUES[1:, :2], MASK_3_2[1:, :2], gamma, lam)
    adv, ret = gae_advantages(REWARDS, VALUES, MASK_3_2, gamma, lam)
    close(adv[1, :2], adv_short[0])
    close(ret[1, :2], ret_short[0])
    # ...and different garbage on the padding must not change anything.
    r2, v2 = REWARDS.clone(), VALUES.clone()
    r2[1, 2], v2[1, 2] = -123.0, 456.0
    adv2, ret2 = gae_advantages(r2, v2, MASK_3_2, gamma, lam)
    close(adv2, adv)
    close(ret2, ret)


def test_gae_returns_are_advantages_plus_values_and_zero_on_padding():
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    mask = MASK_3_2.float()
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.9)
    torch.testing.assert_close(ret, (adv + values) * mask)
    assert adv[1, 2] == 0 and ret[1, 2] == 0


# --------------------------------------------------------------------------- group estimators (RLOO, GRPO)
# Scores are prompt-major: with k samples per prompt, row g*k + j is sample j of prompt g.


def test_rloo_groups_of_2_and_4_hand_computed():
    # k=2, [1, 3]: each baseline is the other score -> 1 - 3 = -2, 3 - 1 = 2
    close(rloo_advantages(t([1.0, 3.0]), 2), [-2.0, 2.0])
    # k=4, [1, 2, 3, 6]: sum 12, baseline_i = (12 - s_i) / 3 = [11/3, 10/3, 3, 2]
    # A = [1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2] = [-8/3, -4/3, 0, 4]  (= 4/3 * (s - mean 3)); sums to 0
    a = rloo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4)
    close(a, [-8 / 3, -4 / 3, 0.0, 4.0])
    close(a.sum(), 0.0)
    # two prompts of k=2 in one batch: groups never mix. [1, 3 | 5, 5] -> [-2, 2 | 0, 0]
    close(rloo_advantages(t([1.0, 3.0, 5.0, 5.0]), 2), [-2.0, 2.0, 0.0, 0.0])


def test_rloo_ties_share_an_advantage():
    # [1, 1, 3, 3]: mean 2 -> 4/3 * [-1, -1, 1, 1]
    close(rloo_advantages(t([1.0, 1.0, 3.0, 3.0]), 4), [-4 / 3, -4 / 3, 4 / 3, 4 / 3])


def test_grpo_groups_of_2_and_4_hand_computed():
    # k=2, [1, 3]: mean 2, unbiased std sqrt(((-1)^2 + 1^2) / 1) = sqrt 2 = 1.4142136
    # A = [-1, 1] / (1.4142136 + 1e-4) = [-0.7070568, 0.7070568]
    close(grpo_advantages(t([1.0, 3.0]), 2), [-0.7070567847, 0.7070567847])
    # k=4, [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], squares sum 14, var 14/3, std 2.1602469
    # A = [-2, -1, 0, 3] / 2.1603469 = [-0.9257772, -0.4628886, 0, 1.3886659]
    close(grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4), [-0.9257772446, -0.4628886223, 0.0, 1.3886658669])
    # Dr. GRPO (no std scaling): just the deviations from the group mean
    close(grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4, scale_std=False), [-2.0, -1.0, 0.0, 3.0])
    # two prompts: [1, 3 | 10, 10] -> [-0.7070568, 0.7070568 | 0, 0]
    close(grpo_advantages(t([1.0, 3.0, 10.0, 10.0]), 2), [-0.7070567847, 0.7070567847, 0.0, 0.0])


def test_grpo_ties_share_an_advantage():
    # [1, 1, 3, 3]: mean 2, deviations [-1, -1, 1, 1], var 4/3, std 1.1547005
    # A = +-1 / (1.1547005 + 1e-4) = +-0.8659504
    close(grpo_advantages(t([1.0, 1.0, 3.0, 3.0]), 4), [-0.8659504103, -0.8659504103, 0.8659504103, 0.8659504103])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_a_group_of_equal_scores_gets_exactly_zero_advantage(dtype, k):
    # No preference among the samples -> no signal, exactly. Values chosen where float32 rounding makes
    # the plain group mean / leave-one-out mean differ from the value itself (0.45, 0.7).
    for value in (0.45, 0.7, -3.1, 0.0):
        scores = torch.full((2 * k,), value, dtype=dtype)
        for adv in (rloo_advantages(scores, k), grpo_advantages(scores, k),
                    grpo_advantages(scores, k, scale_std=False)):
            assert torch.equal(adv, torch.zeros_like(adv)), (value, adv)


def test_group_estimators_reject_bad_layouts():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        grpo_advantages(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 4)
    with pytest.raises(ValueError, match=r"must be \(B,\)"):
        rloo_advantages(t([[1.0, 2.0]]), 2)


def test_group_stats():
    # [1, 3 | 5, 5]: within-prompt stds sqrt 2 and 0 -> mean 0.7071068; one of two groups is flat
    stats = group_stats(t([1.0, 3.0, 5.0, 5.0]), 2)
    close(stats["score_std"], math.sqrt(2) / 2)
    close(stats["flat_fraction"], 0.5)


# Rows (k=2, two prompts): real tokens 2, 3, 1 and 2; the 7.0 entries sit on padding and must not count.
GROUP_KL = t([[0.2, 0.4, 7.0], [0.1, 0.1, 0.2], [1.0, 7.0, 7.0], [0.5, 0.5, 7.0]])
GROUP_MASK = t([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
GROUP_SCORES = t([1.0, 3.0, 5.0, 5.0])


def test_critic_free_advantages_kl_in_the_reward_with_masks():
    # sequence KL over real tokens: [0.2 + 0.4, 0.1 + 0.1 + 0.2, 1.0, 0.5 + 0.5] = [0.6, 0.4, 1.0, 1.0]
    # sequence reward, kl_coef 0.5: [1 - 0.3, 3 - 0.2, 5 - 0.5, 5 - 0.5] = [0.7, 2.8, 4.5, 4.5]
    # RLOO: [0.7 - 2.8, 2.8 - 0.7 | 0, 0] = [-2.1, 2.1 | 0, 0], on every real token, 0 on padding
    adv = critic_free_advantages(GROUP_SCORES, GROUP_KL, GROUP_MASK, 0.5, 2, "rloo")
    close(adv, [[-2.1, -2.1, 0.0], [2.1, 2.1, 2.1], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # GRPO on [0.7, 2.8]: deviations +-1.05, std 1.05 * sqrt 2 = 1.4849242 -> +-1.05 / 1.4850242 = +-0.7070592
    adv = critic_free_advantages(GROUP_SCORES, GROUP_KL, GROUP_MASK, 0.5, 2, "grpo")
    g = 0.7070591653
    close(adv, [[-g, -g, 0.0], [g, g, g], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # Dr. GRPO: the deviations themselves
    adv = critic_free_advantages(GROUP_SCORES, GROUP_KL, GROUP_MASK, 0.5, 2, "grpo", scale_std=False)
    close(adv, [[-1.05, -1.05, 0.0], [1.05, 1.05, 1.05], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_critic_free_advantages_kl_as_a_loss_term_uses_the_scores_alone():
    # kl_coef 0 (KL goes into the loss instead): RLOO on [1, 3 | 5, 5] = [-2, 2 | 0, 0]
    adv = critic_free_advantages(GROUP_SCORES, GROUP_KL, GROUP_MASK, 0.0, 2, "rloo")
    close(adv, [[-2.0, -2.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_critic_free_advantages_empty_row_and_unknown_estimator():
    # row 1 has no real token: no KL, advantage 0 everywhere on it; its score still sets row 0's baseline
    mask = t([[1, 1], [0, 0]])
    adv = critic_free_advantages(t([2.0, 1.0]), t([[0.0, 0.0], [9.0, 9.0]]), mask, 0.1, 2, "rloo")
    close(adv, [[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="unknown group estimator 'ppo'"):
        critic_free_advantages(GROUP_SCORES, GROUP_KL, GROUP_MASK, 0.0, 2, "ppo")


# --------------------------------------------------------------------------- losses


def test_policy_loss_no_change_is_minus_mean_advantage():
    logp = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    adv = t([[1.0, -2.0, 3.0], [0.5, 7.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    # ratio = 1 everywhere, nothing clipped: loss = -(1 - 2 + 3 + 0.5) / 4 = -0.625
    close(loss, -0.625)
    close(stats["ratio_mean"], 1.0)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["approx_kl_k3"], 0.0)


def test_policy_loss_hand_computed_clipping():
    # Tokens (cliprange 0.2 -> ratio clipped to [0.8, 1.2]):
    #   a: log ratio 0.5    -> ratio 1.6487213, A=+1: pg1 = -1.6487, pg2 = -1.2   -> max -1.2  (clipped)
    #   b: log ratio ln 0.5 -> ratio 0.5,       A=-1: pg1 =  0.5,    pg2 =  0.8   -> max  0.8  (clipped)
    #   c: log ratio ln 1.1 -> ratio 1.1,       A=+2: pg1 = -2.2,    pg2 = -2.2   -> max -2.2  (not clipped)
    #   d: log ratio ln 0.5 -> ratio 0.5,       A=+1: pg1 = -0.5,    pg2 = -0.8   -> max -0.5  (not clipped)
    # Layout: row 0 = [a, b, c], row 1 = [d, pad, pad].
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = t([[0.5, math.log(0.5), math.log(1.1)], [math.log(0.5), 3.0, -3.0]]).requires_grad_()
    adv = t([[1.0, -1.0, 2.0], [1.0, 50.0, 50.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # loss = (-1.2 + 0.8 - 2.2 - 0.5) / 4 = -3.1 / 4 = -0.775
    close(loss, -0.775)
    # clipfrac = 2 clipped (a, b) / 4 = 0.5
    close(stats["clipfrac"], 0.5)
    # ratio_mean = (1.6487213 + 0.5 + 1.1 + 0.5) / 4 = 3.7487213 / 4 = 0.9371803
    close(stats["ratio_mean"], 0.9371803)
    # approx_kl = 0.5 * mean(0.5^2, ln(0.5)^2, ln(1.1)^2, ln(0.5)^2)
    #           = 0.5 * (0.25 + 0.4804530 + 0.0090840 + 0.4804530) / 4 = 0.5 * 0.3049975 = 0.1524988
    close(stats["approx_kl"], 0.1524988)
    # k3 = (ratio - 1) - log ratio: a 0.6487213 - 0.5 = 0.1487213; b -0.5 + 0.6931472 = 0.1931472;
    #      c 0.1 - 0.0953102 = 0.0046898; d 0.1931472 -> mean 0.5397055 / 4 = 0.1349264
    close(stats["approx_kl_k3"], 0.1349264)
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad
    # Clipped tokens get no gradient; unclipped ones get d(-A*ratio)/dlogp / 4 = -A*ratio/4:
    #   c: -2*1.1/4 = -0.55, d: -1*0.5/4 = -0.125; padding: 0.
    loss.backward()
    close(logp.grad, [[0.0, 0.0, -0.55], [-0.125, 0.0, 0.0]])


def test_value_loss_hand_computed_clipping():
    # cliprange_value 0.2: v_clip = old + clip(v - old, -0.2, 0.2)
    #   1: v=1.0 old=0.5 R=1.0: v_clip 0.7; (v-R)^2 = 0,   (v_clip-R)^2 = 0.09 -> 0.09 (clipped)
    #   2: v=0.6 old=0.5 R=0.0: v_clip 0.6; 0.36,          0.36            -> 0.36 (not clipped)
    #   3: v=0.0 old=0.5 R=0.0: v_clip 0.3; 0,             0.09            -> 0.09 (clipped)
    #   4: v=2.0 old=1.0 R=3.0: v_clip 1.2; 1.0,           3.24            -> 3.24 (clipped)
    #   5: v=2.0 old=1.0 R=0.0: v_clip 1.2; 4.0,           1.44            -> 4.0  (not clipped)
    # Layout: row 0 = [1, 2, 3], row 1 = [4, 5, pad].
    values = t([[1.0, 0.6, 0.0], [2.0, 2.0, 77.0]])
    old = t([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    returns = t([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # loss = 0.5 * (0.09 + 0.36 + 0.09 + 3.24 + 4.0) / 5 = 0.5 * 7.78 / 5 = 0.778
    close(loss, 0.778)
    # vf_clipfrac = 3 / 5 = 0.6; value_mean = (1 + 0.6 + 0 + 2 + 2) / 5 = 1.12
    close(stats["vf_clipfrac"], 0.6)
    close(stats["value_mean"], 1.12)


def test_value_loss_no_change_is_half_mse():
    # values == old_values: no clipping, loss = 0.5 * mean((v - R)^2) = 0.5 * (1 + 4) / 2 = 1.25
    v = t([[1.0, 2.0, 9.0]])
    loss, stats = value_loss(v, v.clone(), t([[0.0, 0.0, 0.0]]), t([[1, 1, 0]]))
    close(loss, 1.25)
    close(stats["vf_clipfrac"], 0.0)


# --------------------------------------------------------------------------- learning-rate schedule


def test_lr_factor_linear_decays_to_zero_and_constant_stays():
    # linear over 40 steps: 1 - 0/40 = 1; 1 - 30/40 = 0.25; 1 - 40/40 = 0; past the end clipped at 0
    assert [lr_factor("linear", s, 40) for s in (0, 30, 40, 50)] == [1.0, 0.25, 0.0, 0.0]
    assert [lr_factor("constant", s, 40) for s in (0, 30, 40)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="linear or constant"):
        lr_factor("cosine", 0, 40)


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_clips_high_error():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # e = clip(12/6 - 1, -0.2, 0.2) = clip(1.0) = 0.2; mult = 1 + 0.2*8/10000 = 1.00016
    # value = 0.1 * 1.00016 = 0.100016
    assert ctl.update(12.0, n_steps=8) == pytest.approx(0.100016, abs=1e-12)
    assert ctl.value == pytest.approx(0.100016, abs=1e-12)


def test_adaptive_kl_controller_clips_low_error_and_unclipped_case():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # e = clip(3/6 - 1) = clip(-0.5) = -0.2; value = 0.1 * (1 - 0.2*8/10000) = 0.1 * 0.99984 = 0.099984
    ctl.update(torch.tensor(3.0), 8)
    assert ctl.value == pytest.approx(0.099984, abs=1e-12)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # e = 6.6/6 - 1 = 0.1 (inside the clip); value = 0.1 * (1 + 0.1*8/10000) = 0.100008
    ctl.update(6.6, 8)
    assert ctl.value == pytest.approx(0.100008, abs=1e-12)


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 8)
    ctl.update(12.0, 8)
    fresh = AdaptiveKLController(0.5, target=1.0, horizon=1)
    fresh.load_state_dict(ctl.state_dict())
    assert (fresh.value, fresh.target, fresh.horizon) == (ctl.value, ctl.target, ctl.horizon)
    assert fresh.update(3.0, 8) == ctl.update(3.0, 8)

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 8) == 0.05 and fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", 0.05, None, None), FixedKLController)
    ctl = make_kl_controller("adaptive", 0.1, 6.0, 10000)
    assert isinstance(ctl, AdaptiveKLController) and ctl.value == 0.1 and ctl.target == 6.0
    with pytest.raises(ValueError, match="fixed"):
        make_kl_controller("linear", 0.1, 6.0, 10000)
    with pytest.raises(ValueError):
        make_kl_controller("adaptive", 0.1, None, 10000)


# --------------------------------------------------------------------------- explained variance


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, -50.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    # Predicting the mean 3: residual = returns - 3 has the same variance -> EV = 0
    assert explained_variance(torch.full_like(returns, 3.0), returns, mask) == pytest.approx(0.0)
    # values [1,2,3 | 4,4]: residual [0,0,0 | 0,1], mean 0.2, var = (4*0.04 + 0.64)/5 = 0.16
    # Var(returns) = 2 (biased, see test_masked_var) -> EV = 1 - 0.16/2 = 0.92
    values = t([[1.0, 2.0, 3.0, -9.0], [4.0, 4.0, 9.0, 9.0]])
    ev = explained_variance(values, returns, mask)
    assert isinstance(ev, float) and ev == pytest.approx(0.92)
    # Constant returns: undefined.
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))


# --------------------------------------------------------------------------- import hygiene


def test_import_does_not_pull_in_transformers():
    code = "import sys, pipeline.rl.ppo_math; assert 'transformers' not in sys.modules, 'transformers imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
