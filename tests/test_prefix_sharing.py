"""Prefix sharing (pipeline.models.forwards.prefixed_hidden): rows that begin with the same tokens run them
once. The logprobs, gradients and reward features must equal the plain forward's to float round-off, on
the NF4 path, with padding on both sides of the rows."""
import contextlib

import pytest
import torch
from helpers import randomize_lora_b

from pipeline.config import LoraConfigSection
from pipeline.models import forwards, loading
from pipeline.models.reward_model import pooled_features


def test_common_prefix_length_by_hand():
    # left-padded rows; real tokens (5, 6, 7) and (4, 5, 6, 8) share nothing
    ids, mask = forwards.left_pad([[5, 6, 7], [4, 5, 6, 8]], 0)
    assert forwards.common_prefix_length(ids, mask.sum(1), 10) == 0
    # (5, 6, 7) and (5, 6, 8): 2 tokens, whatever the padding
    ids, mask = forwards.left_pad([[5, 6, 7], [5, 6, 8, 9, 9]], 0)
    assert forwards.common_prefix_length(ids, mask.sum(1), 10) == 2
    assert forwards.common_prefix_length(ids, mask.sum(1), 1) == 1  # the limit caps it
    assert forwards.common_prefix_length(ids, mask.sum(1), 0) == 0
    # identical rows share up to the limit
    ids, mask = forwards.left_pad([[1, 2, 3], [1, 2, 3]], 0)
    assert forwards.common_prefix_length(ids, mask.sum(1), 2) == 2


def test_prefixed_rows_by_hand():
    # one group: (5, 6) shared (the second row's response starts at 2); the rests right-padded with 0
    rows = forwards.prefixed_rows([([5, 6, 7, 8], 3), ([5, 6, 9], 2)], 0, "cpu")
    assert rows.prefix_ids.tolist() == [[5, 6]] and rows.group.tolist() == [0, 0]
    assert rows.ids.tolist() == [[7, 8], [9, 0]] and rows.mask.tolist() == [[1, 1], [1, 0]]
    assert rows.pool.tolist() == [[False, True], [True, False]] and rows.last.tolist() == [1, 0]
    assert rows.full_mask().tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # groups (0, 1, 0): rows 0 and 2 share (5, 6, 7), never a row's last token; row 1, alone in its group,
    # has its prompt (4) as its prefix (left-padded)
    rows = forwards.prefixed_rows([([5, 6, 7, 8], 3), ([4, 4], 1), ([5, 6, 7, 9, 9], 4)], 0, "cpu", [0, 1, 0])
    assert rows.prefix_ids.tolist() == [[5, 6, 7], [0, 0, 4]] and rows.prefix_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert rows.group.tolist() == [0, 1, 0] and rows.ids.tolist() == [[8, 0], [4, 0], [9, 9]]
    assert rows.pool.tolist() == [[True, False], [True, False], [False, True]]
    # groups (0, 1, 2, 0): rows 1 and 2, each alone in its group, make one group sharing (5) (their prompts
    # (5, 4) and (5, 3) differ after it), so no pass runs a prompt for one row; it comes after the groups
    # of several rows
    rows = forwards.prefixed_rows([([5, 6, 7, 8], 3), ([5, 4, 1], 2), ([5, 3, 2], 2), ([5, 6, 7, 9], 3)], 0,
                                  "cpu", [0, 1, 2, 0])
    assert rows.prefix_ids.tolist() == [[5, 6, 7], [0, 0, 5]] and rows.group.tolist() == [0, 1, 1, 0]
    assert rows.ids.tolist() == [[8, 0], [4, 1], [3, 2], [9, 0]]
    assert rows.pool.tolist() == [[True, False], [False, True], [False, True], [True, False]]
    # one row alone: nothing shared
    assert forwards.prefixed_rows([([5, 6, 7], 2)], 0, "cpu").prefix_ids.shape == (1, 0)
    # sharing off: whole rows
    assert forwards.prefixed_rows([([5, 6, 7, 8], 3), ([5, 6, 9], 2)], 0, "cpu", share=False).prefix_ids.shape == (1, 0)


@pytest.fixture
def peft_tiny(tiny_model_cfg_both):
    from peft import get_peft_model

    model, tok, _ = loading.load_base(tiny_model_cfg_both)
    peft_model = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0), model=model))
    randomize_lora_b(peft_model, 0.05)
    return peft_model, tok, tiny_model_cfg_both.compute_dtype


def _both_ways(fn):
    """``fn()`` with prefix sharing off, then on."""
    out = []
    for share in (False, True):
        forwards.SHARE_PREFIXES = share
        try:
            out.append(fn())
        finally:
            forwards.SHARE_PREFIXES = True
    return out


def _backbone_widths(model, fn):
    """``(the input_ids shape of every backbone call fn() makes, fn())``."""
    widths = []
    hook = forwards.backbone(model).register_forward_hook(
        lambda m, args, kw, out: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        return widths, fn()
    finally:
        hook.remove()


def test_shared_prefix_logprobs_and_gradients_equal_the_plain_forward(peft_tiny):
    peft_model, _, dtype = peft_tiny
    g = torch.Generator().manual_seed(3)
    system = [7, 8, 9, 10, 11, 12]  # every row's common start, as a chat template's system prompt
    rows = [system + torch.randint(20, 200, (n,), generator=g).tolist() for n in (5, 2, 7)]
    rows[2][len(system)] = rows[0][len(system)]  # rows 0 and 2 share one more token; row 1 does not
    q, qm = forwards.left_pad(rows, 0)
    r = torch.randint(20, 200, (3, 5), generator=g)
    rm = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert forwards.common_prefix_length(q, qm.sum(1), 100) == len(system)

    def run():
        peft_model.zero_grad(set_to_none=True)
        out = forwards.forward_response(peft_model, q, qm, r, rm, 0.7, with_hidden=True)
        (out.logprobs * rm).sum().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        return out.logprobs.detach(), out.hidden.detach().float(), grads

    backbone = peft_model.get_base_model().base_model
    widths = []
    hook = backbone.register_forward_hook(lambda m, args, kw, out: widths.append(kw["input_ids"].shape),
                                          with_kwargs=True)
    (lp0, h0, g0), (lp1, h1, g1) = _both_ways(run)
    hook.remove()
    # plain: one pass over the whole rows; shared: the 6 system tokens once, then 3 rows without them
    assert widths == [(3, 13 + 5), (1, 6), (3, 13 - 6 + 5)]
    # float32: the same sums over other matmul shapes; bf16 rounds each shape its own way (2^-8 relative)
    tol = 1e-5 if dtype == "float32" else 0.15
    torch.testing.assert_close(lp1 * rm, lp0 * rm, atol=tol, rtol=0)
    torch.testing.assert_close(h1, h0, atol=tol * 10, rtol=tol)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:  # gradients reach the LoRA weights of the shared tokens' pass as well
        scale = g0[k].abs().max().clamp(min=1e-6)
        assert ((g1[k] - g0[k]).abs().max() / scale) < (1e-4 if dtype == "float32" else 0.2), k


def test_repeated_prompts_run_once_and_score_as_the_plain_forward(peft_tiny):
    """forward_response over rows that repeat prompts (eval's KL over 4 samples per prompt) runs each
    distinct prompt once; logprobs and gradients equal the plain forward's (float32: to round-off)."""
    peft_model, _, dtype = peft_tiny
    g = torch.Generator().manual_seed(4)
    system = [7, 8, 9, 10, 11, 12]
    a, b = system + [40, 41, 42, 43, 44], system + [50, 51]
    q, qm = forwards.left_pad([a, b, a, b, a], 0)
    r = torch.randint(20, 200, (5, 4), generator=g)
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])

    def run():
        peft_model.zero_grad(set_to_none=True)
        out = forwards.forward_response(peft_model, q, qm, r, rm, 0.7)
        (out.logprobs * rm).sum().backward()
        return out.logprobs.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters()
                                       if p.grad is not None}

    widths, ((lp0, g0), (lp1, g1)) = _backbone_widths(peft_model, lambda: _both_ways(run))
    # plain: the whole rows; shared: the system prompt once, the 2 distinct rests but their last token,
    # then every row's last prompt token and its response
    assert widths == [(5, 11 + 4), (1, 6), (2, 4), (5, 1 + 4)], widths
    tol = 1e-5 if dtype == "float32" else 0.15
    torch.testing.assert_close(lp1 * rm, lp0 * rm, atol=tol, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        scale = g0[k].abs().max().clamp(min=1e-6)
        assert ((g1[k] - g0[k]).abs().max() / scale) < (1e-4 if dtype == "float32" else 0.2), k


def test_one_row_alone_takes_the_plain_path(peft_tiny):
    peft_model, _, _ = peft_tiny
    q, qm = forwards.left_pad([[7, 8, 9, 10]], 0)
    r, rm = torch.tensor([[30, 31]]), torch.ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        a, b = _both_ways(lambda: forwards.forward_response(peft_model, q, qm, r, rm, 1.0).logprobs)
    assert torch.equal(a, b)  # bit for bit: nothing was shared


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pair_groups_share_their_prompt_and_score_as_the_plain_forward(peft_tiny, pooling):
    peft_model, _, dtype = peft_tiny
    prompt_a, prompt_b = [7, 8, 9, 10, 11], [7, 8, 12, 13]
    # (ids, response start): chosen rows then rejected rows, pair i = (i, i + 2)
    encoded = [(prompt_a + [40, 41, 42], 5), (prompt_b + [50], 4),
               (prompt_a + [60, 61], 5), (prompt_b + [70, 71, 72, 73], 4)]

    def run():
        return pooled_features(peft_model, encoded, 0, pooling, groups=[0, 1, 0, 1]).detach()

    with torch.no_grad():
        plain, shared = _both_ways(run)
        shared_all = pooled_features(peft_model, encoded, 0, pooling)  # one group: the common (7, 8) only
    tol = 1e-5 if dtype == "float32" else 0.1
    torch.testing.assert_close(shared, plain, atol=tol, rtol=tol)
    torch.testing.assert_close(shared_all, plain, atol=tol, rtol=tol)
    # each row's features are its own: the two sides of a pair differ
    assert (plain[0] - plain[2]).abs().max() > 1e-3


def test_pairs_run_their_shared_system_start_once_and_train_as_the_plain_forward(peft_tiny):
    """A batch of preference pairs: every pair's prompt once, and the start the prompts share (the system
    prompt) once for all pairs, not once per pair; features and LoRA gradients equal the plain forward's."""
    peft_model, _, dtype = peft_tiny
    system = [7, 8, 9]
    prompt_a, prompt_b, prompt_c = system + [10, 11], system + [12], system + [13, 14, 15]
    # (ids, response start): chosen rows then rejected rows, pair i = (i, i + 3)
    encoded = [(prompt_a + [40, 41], 5), (prompt_b + [50, 51, 52], 4), (prompt_c + [60], 6),
               (prompt_a + [70], 5), (prompt_b + [80, 81], 4), (prompt_c + [90, 91, 92, 93], 6)]

    def run():
        peft_model.zero_grad(set_to_none=True)
        feats = pooled_features(peft_model, encoded, 0, "mean", groups=[0, 1, 2, 0, 1, 2])
        (feats * torch.linspace(-1, 1, feats.shape[1])).sum().backward()
        return feats.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    widths, ((f0, g0), (f1, g1)) = _backbone_widths(peft_model, lambda: _both_ways(run))
    # plain: prompts (padded to 6) + rests (padded to 4) in one pass; shared: the system start (1, 3), the
    # three prompts' rests (3, 3), then the 6 rows' own tokens
    assert widths == [(6, 6 + 4), (1, 3), (3, 3), (6, 4)], widths
    tol = 1e-5 if dtype == "float32" else 0.1
    torch.testing.assert_close(f1, f0, atol=tol, rtol=tol)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:  # the system start's pass is trained through as well
        scale = g0[k].abs().max().clamp(min=1e-6)
        assert ((g1[k] - g0[k]).abs().max() / scale) < (1e-4 if dtype == "float32" else 0.2), k


def test_generation_runs_the_shared_system_prompt_once_and_samples_as_the_plain_prefill(peft_tiny):
    """rollout.sample prefills the common start of the prompts once (rollout.shared_prefix_prefill); the
    tokens drawn from a seed and their logprobs are the plain prefill's (float32: to round-off)."""
    from pipeline.rl import rollout

    peft_model, tok, dtype = peft_tiny
    system = [7, 8, 9, 10, 11, 12]
    q, qm = forwards.left_pad([system + [30, 31, 32, 33], system + [40], system + [50, 51]], tok.pad_token_id)
    ids, mask, cache = rollout.shared_prefix_prefill(peft_model, q, qm, tok.pad_token_id)
    # the shared start, then each row's rest left-padded: padding sits between the two
    assert ids[:, :6].tolist() == [system] * 3 and cache.get_seq_length() == 6
    pad = tok.pad_token_id
    assert ids[:, 6:].tolist() == [[30, 31, 32, 33], [pad, pad, pad, 40], [pad, pad, 50, 51]]
    assert mask.tolist() == [[1] * 10, [1] * 6 + [0, 0, 0, 1], [1] * 6 + [0, 0, 1, 1]]

    widths, (plain, shared) = _backbone_widths(peft_model, lambda: _both_ways(
        lambda: rollout.sample(peft_model, tok, q, qm, 6, 0.8, [-1], generator_seed=11, with_logprobs=True)))
    # plain: prefill (3, 10), then 5 one-token steps; shared: (1, 6) once, the rests (3, 4), then the steps
    assert widths[0] == (3, 10) and widths[6:8] == [(1, 6), (3, 4)], widths
    if dtype == "float32":
        assert torch.equal(shared.response, plain.response)
        torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=2e-5, rtol=0)
    # one row alone, or rows sharing nothing, take the plain path
    one = rollout.shared_prefix_prefill(peft_model, q[:1], qm[:1], tok.pad_token_id)
    assert one[2] is None and torch.equal(one[0], q[:1])
    q2, qm2 = forwards.left_pad([[5, 6], [7, 8]], tok.pad_token_id)
    assert rollout.shared_prefix_prefill(peft_model, q2, qm2, tok.pad_token_id)[2] is None


def test_generation_prefills_each_repeated_prompt_once_and_samples_as_the_plain_prefill(peft_tiny):
    """Rows that repeat a prompt (eval's samples per prompt, best-of-n's pool) prefill it once: the shared
    start for all, each distinct rest but its last token once, then every row's last token; tokens drawn
    from a seed and their logprobs are the plain prefill's (float32: to round-off)."""
    from pipeline.rl import rollout

    peft_model, tok, dtype = peft_tiny
    system = [7, 8, 9, 10, 11, 12]
    a, b = system + [30, 31, 32, 33], system + [50, 51]
    q, qm = forwards.left_pad([a, b, a, a, b], tok.pad_token_id)
    ids, mask, cache = rollout.shared_prefix_prefill(peft_model, q, qm, tok.pad_token_id)
    pad = tok.pad_token_id
    assert ids[:, :6].tolist() == [system] * 5
    assert ids[:, 6:].tolist() == [[30, 31, 32, 33], [pad, pad, 50, 51]] + [[30, 31, 32, 33]] * 2 + [[pad, pad, 50, 51]]
    assert mask[1].tolist() == [1] * 6 + [0, 0, 1, 1]
    # cached: the system prompt and three of the four rest columns; generate runs the last one
    assert cache.get_seq_length() == 9

    widths, (plain, shared) = _backbone_widths(peft_model, lambda: _both_ways(
        lambda: rollout.sample(peft_model, tok, q, qm, 6, 0.8, [-1], generator_seed=5, with_logprobs=True)))
    # plain: prefill (5, 10), then 5 steps; shared: the start (1, 6), 2 distinct rests (2, 3), every row's
    # last prompt token (5, 1), then the steps
    assert widths[0] == (5, 10) and widths[6:9] == [(1, 6), (2, 3), (5, 1)], widths
    if dtype == "float32":
        assert torch.equal(shared.response, plain.response)
        torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=2e-5, rtol=0)
    # one prompt repeated: all but its last token cached once
    q1, qm1 = forwards.left_pad([a, a, a], tok.pad_token_id)
    ids1, _, cache1 = rollout.shared_prefix_prefill(peft_model, q1, qm1, tok.pad_token_id)
    assert torch.equal(ids1, q1) and cache1.get_seq_length() == 9


def test_decoding_drops_finished_rows_and_draws_what_generate_draws(peft_tiny):
    """After the shared prefill, sampling runs its own decode loop (rollout.decode): rows that have stopped
    leave the batch, and the tokens drawn from a seed, and their logprobs, are generate's (the plain
    prefill's path; float32: to round-off)."""
    from pipeline.rl import rollout

    peft_model, tok, dtype = peft_tiny
    g = torch.Generator().manual_seed(4)
    system = [7, 8, 9, 10, 11, 12]
    q, qm = forwards.left_pad([system + torch.randint(20, 200, (n,), generator=g).tolist()
                               for n in (3, 1, 4, 2, 5, 2, 3, 1, 4, 2, 1, 3)], tok.pad_token_id)
    stop = torch.randperm(tok.vocab_size, generator=g)[:tok.vocab_size // 8].tolist()  # ~1 in 8 draws stops
    widths, (plain, shared) = _backbone_widths(peft_model, lambda: _both_ways(
        lambda: rollout.sample(peft_model, tok, q, qm, 10, 0.8, stop, generator_seed=2, with_logprobs=True)))
    # plain: generate's prefill (12, P) and a step of all 12 rows per token; shared: the system prompt
    # (1, 6), the rests, then the steps, fewer rows once some have stopped
    steps = plain.response.shape[1]
    shared_steps = [w[0] for w in widths[steps:] if w[1] == 1]
    assert widths[steps] == (1, 6) and len(shared_steps) == steps - 1, widths
    assert max(shared_steps) <= 12 and min(shared_steps) < 12 and shared_steps == sorted(shared_steps, reverse=True)
    assert 0 < int(plain.ended.sum()) < 12  # rows stop at different steps
    if dtype == "float32":
        assert torch.equal(shared.response, plain.response) and torch.equal(shared.ended, plain.ended)
        torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=2e-5, rtol=0)
        assert (shared.logprobs[~shared.mask.bool()] == 0).all()


def test_scoring_runs_each_prompt_once_per_batch_and_scores_as_the_plain_forward(peft_tiny):
    """The reward scorer puts rows of one prompt side by side (eval's samples of a prompt, the two sides of
    a held-out pair) and runs the prompt once; scores equal the plain forward's, in the rows' order."""
    from pipeline.models.reward_model import RewardModelScorer

    peft_model, tok, dtype = peft_tiny
    head = torch.linspace(-1, 1, peft_model.config.hidden_size)
    scorer = RewardModelScorer(peft_model, tok, head, adapter="default", batch_size=4)
    system = [7, 8, 9]
    a, b = system + [10, 11], system + [12]
    # (ids, response start), prompts interleaved and of mixed lengths: a b a b a
    seqs = [(a + [40, 41], 5), (b + [50, 51, 52, 53], 4), (a + [60], 5), (b + [70], 4), (a + [80, 81, 82], 5)]
    widths, (plain, shared) = _backbone_widths(peft_model, lambda: _both_ways(lambda: scorer.score_ids(seqs)))
    tol = 1e-5 if dtype == "float32" else 0.1
    torch.testing.assert_close(shared, plain, atol=tol, rtol=tol)
    assert len(set(plain.tolist())) == 5
    # prompts by their longest row (8 both; ties by tokens: a = (7, 8, 9, 10, 11) before b = (7, 8, 9, 12)),
    # rows by length within: a's (6, 7, 8), b's (5, 8); batches of 4: a's three and b's shorter row, then b's
    # longer row alone. Plain: whole rows (4, 8), (1, 8). Shared: the system start once, the two prompts'
    # rests, the rows' own tokens; the row alone, whole.
    assert widths[:2] == [(4, 8), (1, 8)], widths
    assert widths[2:] == [(1, 3), (2, 2), (4, 3), (1, 8)], widths


def test_right_padded_lengths_by_hand():
    assert forwards.right_padded_lengths(torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [2, 3]
    assert forwards.right_padded_lengths(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding
    assert forwards.right_padded_lengths(torch.tensor([[1, 0, 1]])) is None  # a hole


def test_sft_rows_run_their_shared_start_once_and_train_as_the_plain_forward(tiny_model_cfg_both, monkeypatch):
    """SFT's loss through trl's fused LM head over right-padded rows (as trl's collator pads them), with the
    stage's lean kernels and compact head, with and without forwards.shared_row_starts: the same loss and
    LoRA gradients to float round-off, with the 5 tokens every row begins with run once."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.models import lean_ops
    from pipeline.models.trainer_utils import compact_lm_head

    model, _, _ = loading.load_base(tiny_model_cfg_both)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
    randomize_lora_b(pm, 0.05, torch.Generator().manual_seed(1))
    lean_ops.install(pm)
    g = torch.Generator().manual_seed(4)
    start = [7, 8, 9, 10, 11]
    rows = [start + torch.randint(20, 200, (n,), generator=g).tolist() for n in (6, 3, 8)]
    rows[2][5] = rows[0][5]  # rows 0 and 2 share one more token; row 1 does not: the start is 5 tokens
    ids = torch.zeros((3, 13), dtype=torch.long)
    mask = torch.zeros((3, 13), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :7] = -100  # the prompt

    monkeypatch.setattr(forwards, "SHARE_START_MIN_ROWS", 3)

    def loss_and_grads(share: bool):
        pm.zero_grad(set_to_none=True)
        with compact_lm_head(), loading.compute_context(pm), (
                forwards.shared_row_starts(pm) if share else contextlib.nullcontext()) as count:
            out = pm(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}, count

    layer = forwards.backbone(pm).layers[0]
    widths: list = []
    hook = layer.register_forward_hook(lambda m, args, kw, out: widths.append(tuple((args or [kw["hidden_states"]])[0].shape[:2])),
                                       with_kwargs=True)
    plain_loss, plain_grads, _ = loss_and_grads(False)
    assert widths == [(3, 13)]
    widths.clear()
    loss, grads, count = loss_and_grads(True)
    # the start once, then the three rows' 8 columns after it; 11 + 8 + 13 = 32 tokens given, 5 + 6 + 3 + 8 = 22 run
    assert widths == [(1, 5), (3, 8)]
    assert (count.given, count.ran) == (32, 22)
    assert "forward" not in vars(forwards.backbone(pm))  # the plain forward is back
    # float32: the same sums over other matmul shapes; bf16 rounds each shape its own way (2^-8 relative)
    bf16 = tiny_model_cfg_both.compute_dtype == "bfloat16"
    assert torch.allclose(loss.float(), plain_loss.float(), atol=2e-2 if bf16 else 1e-5) and plain_loss > 0
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name in grads:  # the start's pass gets its gradient from every row
        scale = plain_grads[name].abs().max().clamp(min=1e-6)
        assert ((grads[name] - plain_grads[name]).abs().max() / scale) < (0.2 if bf16 else 1e-4), name
    # a batch that shares nothing, and a left-padded one, take the plain forward
    widths.clear()
    with torch.no_grad(), forwards.shared_row_starts(pm):
        pm(input_ids=ids[:, 5:], attention_mask=mask[:, 5:])
        pm(input_ids=torch.flip(ids, dims=[1]), attention_mask=torch.flip(mask, dims=[1]))
        pm(input_ids=ids[:2], attention_mask=mask[:2])  # fewer rows than SHARE_START_MIN_ROWS
    hook.remove()
    assert widths == [(3, 8), (3, 13), (2, 13)]
