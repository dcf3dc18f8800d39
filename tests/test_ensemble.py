"""Reward-model ensembles (pipeline/models/ensemble.py, reward.ensemble): the aggregations and losses by
hand, the shared-trunk forward against separate forwards, and the k-member reward stage end to end
(members differ, one member alone is today's scorer, the ensemble serves `rlhf score` and PPO)."""
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.models import ensemble, trunk

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")


# ---------------------------------------------------------------------------------------------
# Math by hand


def test_aggregates_by_hand():
    # members (rows) x responses (columns)
    s = torch.tensor([[1.0, 2.0, 0.0],
                      [3.0, 2.0, 4.0]])
    assert ensemble.aggregate(s, "mean").tolist() == [2.0, 2.0, 2.0]
    assert ensemble.aggregate(s, "min").tolist() == [1.0, 2.0, 0.0]
    # population variance: ((1-2)^2 + (3-2)^2)/2 = 1, 0 (a tie), ((0-2)^2 + (4-2)^2)/2 = 4
    # uwo, lambda 0.5: 2 - 0.5, 2 - 0, 2 - 2
    assert ensemble.aggregate(s, "uwo", 0.5).tolist() == [1.5, 2.0, 0.0]
    assert ensemble.disagreement(s).tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="aggregate must be one of"):
        ensemble.aggregate(s, "max")


def test_one_member_every_aggregate_is_that_member():
    s = torch.tensor([[0.3, -1.2, 5.0]])
    for how in ensemble.AGGREGATES:
        assert ensemble.aggregate(s, how, 10.0).tolist() == s[0].tolist()
    assert ensemble.disagreement(s).tolist() == [0.0, 0.0, 0.0]


def test_standardise_by_hand():
    # member 0: (2 - 2) / 2 = 0, (4 - 2) / 2 = 1; member 1: (1 - 0) / 0.5 = 2, (0 - 0) / 0.5 = 0
    s = torch.tensor([[2.0, 4.0], [1.0, 0.0]])
    assert ensemble.standardise(s, [2.0, 0.0], [2.0, 0.5]).tolist() == [[0.0, 1.0], [2.0, 0.0]]


def test_weighted_pairwise_loss_by_hand():
    from pipeline.models.reward_model import pairwise_loss

    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # weights (2, 0): only the first pair counts: -log sigmoid(2) = 0.126928
    got = ensemble.weighted_pairwise_loss(chosen, rejected, torch.tensor([2.0, 0.0]))
    assert got.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))), abs=1e-6)
    # all ones: exactly the unweighted loss, with the centring term too
    ones = torch.ones(2)
    assert torch.equal(ensemble.weighted_pairwise_loss(chosen, rejected, ones, 0.1), pairwise_loss(chosen, rejected, 0.1))
    # no weight at all: 0 and a zero gradient, not NaN
    c = chosen.clone().requires_grad_(True)
    zero = ensemble.weighted_pairwise_loss(c, rejected, torch.zeros(2))
    zero.backward()
    assert zero.item() == 0.0 and c.grad.abs().sum().item() == 0.0


def test_bootstrap_weights_are_a_seeded_resample():
    w = ensemble.bootstrap_weights(1000, 7)
    assert w.sum().item() == 1000 and torch.equal(w, ensemble.bootstrap_weights(1000, 7))
    assert not torch.equal(w, ensemble.bootstrap_weights(1000, 8))
    # about 1/e of the items are left out of a bootstrap resample (0.368 +- 3 SE of 0.015)
    assert abs((w == 0).float().mean().item() - math.exp(-1)) < 0.046


# ---------------------------------------------------------------------------------------------
# The shared trunk


@pytest.fixture
def two_member_model(tiny_model_cfg):
    """The tiny model as a reward model with two members on its top layer (LoRA B random, so they differ)."""
    from peft import get_peft_model

    from pipeline.config import LoraConfigSection
    from pipeline.models import loading

    model, tok, _ = loading.load_base(tiny_model_cfg, kind="seqcls", num_labels=1)
    sec = LoraConfigSection(r=4, alpha=8, dropout=0.0, target_modules="all-linear", top_layers=1)
    pm = get_peft_model(model, loading.lora_config(sec, task_type="SEQ_CLS", model=model))
    pm.add_adapter("member1", loading.lora_config(sec, task_type="SEQ_CLS", model=model))
    gen = torch.Generator().manual_seed(3)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pm, tok


ROWS = [([1, 5, 6, 7, 8, 9], 2), ([1, 5, 6, 3], 2), ([4, 4, 4, 4, 4, 4, 4, 9], 3)]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_shared_trunk_equals_separate_forwards(two_member_model, pooling):
    from pipeline.models import stacking
    from pipeline.models.reward_model import pooled_features

    pm, tok = two_member_model
    adapters = ["default", "member1"]
    assert trunk.trunk_split(pm, adapters) == 1  # the tiny model's 2 layers, LoRA on the top one
    from pipeline.models.loading import decoder_layers

    calls = []
    _, stack = decoder_layers(pm)
    handle = stack[0].mlp.register_forward_hook(lambda *a: calls.append(1))  # inside the layer: real compute only
    shared = ensemble.member_features(pm, ROWS, tok.pad_token_id, pooling, adapters)
    handle.remove()
    assert len(calls) == 1  # the bottom layer ran once for both members
    for a, got in zip(adapters, shared):
        with stacking.active_adapters(pm, [a]):
            want = pooled_features(pm, ROWS, tok.pad_token_id, pooling)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (shared[0] - shared[1]).abs().max() > 1e-2  # the members really differ


def test_shared_trunk_gradients_equal_a_plain_forward(two_member_model):
    from pipeline.models import stacking
    from pipeline.models.reward_model import pooled_features

    pm, tok = two_member_model
    params = [p for n, p in pm.named_parameters() if ".member1." in n and "lora_" in n]

    def grads(features):
        pm.zero_grad(set_to_none=True)
        (features ** 2).sum().backward()
        return [p.grad.clone() for p in params]

    shared = grads(ensemble.member_features(pm, ROWS, tok.pad_token_id, "mean", ["default", "member1"])[1])
    with stacking.active_adapters(pm, ["member1"]):
        plain = grads(pooled_features(pm, ROWS, tok.pad_token_id, "mean"))
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_member_on_a_subset_of_rows_equals_those_rows_of_the_full_pass(two_member_model):
    """take_rows: a member runs only the rows its resample holds (here rows 0 and 1, so the 8-token row
    and its padding go); features and gradients equal those rows of the all-rows pass."""
    from pipeline.models import forwards

    pm, tok = two_member_model
    params = [p for n, p in pm.named_parameters() if ".member1." in n and "lora_" in n]
    split = trunk.trunk_split(pm, ["default", "member1"])
    laid, tr = trunk.shared_trunk(pm, ROWS, tok.pad_token_id, split, "default")
    assert laid.prefix_ids.shape[1] == 0  # these rows share no start
    rows = torch.tensor([0, 1])

    full = forwards.pool_hidden(trunk.member_hidden(pm, laid, split, tr, "member1"), laid.pool, laid.last, "mean")
    pm.zero_grad(set_to_none=True)
    (full[rows] ** 2).sum().backward()
    want = [p.grad.clone() for p in params]
    sub, s_trunk = trunk.take_rows(rows, laid, tr)
    assert sub.ids.shape == (2, 6) and s_trunk.out.shape[:2] == (2, 6)  # the longest kept row, not the batch's 8
    got = forwards.pool_hidden(trunk.member_hidden(pm, sub, split, s_trunk, "member1"), sub.pool, sub.last, "mean")
    torch.testing.assert_close(got, full[rows].detach(), rtol=1e-5, atol=1e-5)
    pm.zero_grad(set_to_none=True)
    (got ** 2).sum().backward()
    for a, b in zip([p.grad for p in params], want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# Rows that share a start: a system prompt (one group), and preference pairs (group i: rows i and i + 3)
# whose prompts differ in length, so the prefixes are left-padded; the rows' own rests differ in length.
SYSTEM = [1, 7, 8, 9, 10]
SYSTEM_ROWS = [(SYSTEM + [5, 6, 7, 8, 9], 7), (SYSTEM + [5, 6, 3], 6), (SYSTEM + [4, 4, 4, 4, 4, 4, 9], 8),
               (SYSTEM + [11], 5)]
PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 7, 12, 13], [1, 20, 21, 22, 23]]
PAIR_ROWS = ([(PROMPTS[0] + [40, 41, 42], 6), (PROMPTS[1] + [50], 4), (PROMPTS[2] + [30, 31, 32, 33, 34], 5)]
             + [(PROMPTS[0] + [60, 61], 6), (PROMPTS[1] + [70, 71, 72, 73], 4), (PROMPTS[2] + [36], 5)])
PAIR_GROUPS = [0, 1, 2, 0, 1, 2]
SHARED = {"system": (SYSTEM_ROWS, None), "pairs": (PAIR_ROWS, PAIR_GROUPS)}
TOL = {"rtol": 1e-5, "atol": 2e-5}  # float32: the same sums over other matmul shapes


def _plain_features(pm, encoded, pooling, adapter):
    """The reference: whole rows through the full model with only ``adapter`` active, nothing shared."""
    from pipeline.models import forwards, stacking
    from pipeline.models.reward_model import pooled_features

    forwards.SHARE_PREFIXES = False
    try:
        with stacking.active_adapters(pm, [adapter]):
            return pooled_features(pm, encoded, 0, pooling)
    finally:
        forwards.SHARE_PREFIXES = True


@pytest.mark.parametrize("case", sorted(SHARED))
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_shared_prefixes_give_every_member_the_plain_features(two_member_model, case, pooling):
    """The start a group's rows share runs once in the trunk and once in each member's own layers; every
    member's features equal a plain full forward's."""
    from pipeline.models.loading import decoder_layers

    pm, _ = two_member_model
    encoded, groups = SHARED[case]
    adapters = ["default", "member1"]
    _, stack = decoder_layers(pm)
    shapes = {0: [], 1: []}
    hooks = [stack[i].mlp.register_forward_hook(lambda m, a, o, i=i: shapes[i].append(tuple(a[0].shape[:2])))
             for i in (0, 1)]
    got = ensemble.member_features(pm, encoded, 0, pooling, adapters, groups=groups)
    for h in hooks:
        h.remove()
    laid, tr = trunk.shared_trunk(pm, encoded, 0, 1, "default", groups)
    g, sp = laid.prefix_ids.shape
    assert sp == {"system": 5, "pairs": 6}[case] and g == {"system": 1, "pairs": 3}[case]
    # the trunk (layer 0) and each member's layer 1 run the start all prefixes share once (one group: all
    # of it; the pairs' prompts: their first token), each group's rest once (the pairs' prompts after that
    # token, left-padded to 5), then the rows' own columns; the members' layer 1 runs each level once for
    # both members, on twice the rows (trunk.members_hidden)
    levels = {"system": [(1, 5)], "pairs": [(1, 1), (3, 5)]}[case]
    assert tr.top_length == levels[0][1]
    assert shapes[0] == levels + [tuple(laid.ids.shape)]
    assert shapes[1] == [(2 * n, w) for n, w in levels + [tuple(laid.ids.shape)]]
    for a, features in zip(adapters, got):
        torch.testing.assert_close(features, _plain_features(pm, encoded, pooling, a), **TOL)
    assert (got[0] - got[1]).abs().max() > 1e-2  # the members really differ


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_shared_prefixes_without_a_trunk_are_each_members_prefixed_forward(two_member_model, pooling):
    """split 0 (nothing below the members is shared): each member is the single model's prefix-shared
    forward with only its adapter active."""
    pm, _ = two_member_model
    got = ensemble.member_features(pm, PAIR_ROWS, 0, pooling, ["default", "member1"], split=0, groups=PAIR_GROUPS)
    for a, features in zip(["default", "member1"], got):
        torch.testing.assert_close(features, _plain_features(pm, PAIR_ROWS, pooling, a), **TOL)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_shared_prefix_gradients_on_a_members_resample_equal_the_plain_forward(two_member_model, pooling):
    """The training path (reward.ensemble_backward): pairs share their prompt; member 1 keeps pairs 1 and 2
    only (take_rows), so pair 0's longer prompt and its left padding go. Features and the gradients of
    member 1's LoRA weights, which reach it through the prompts' cached keys and values too, equal a plain
    full forward of those rows."""
    from pipeline.models import forwards

    pm, _ = two_member_model
    params = [p for n, p in pm.named_parameters() if ".member1." in n and "lora_" in n]
    laid, tr = trunk.shared_trunk(pm, PAIR_ROWS, 0, 1, "default", PAIR_GROUPS)
    rows = torch.tensor([1, 2, 4, 5])  # pairs 1 and 2, chosen then rejected
    sub, s_trunk = trunk.take_rows(rows, laid, tr)
    assert laid.prefix_ids.shape[1] == 6 and sub.prefix_ids.shape == (2, 5)  # prompts of 4 and 5 tokens
    # the top (the prompts' first token) stays; the rests lose pair 0's longer one and its padding: 4 columns
    assert sub.group.tolist() == [0, 1, 0, 1] and s_trunk.top_length == 1 and s_trunk.prefix.shape[:2] == (2, 4)
    assert s_trunk.kv[0][0].shape[2] == 5 and tr.kv[0][0].shape[2] == 6

    def grads(features):
        # a score head's direction: the squared norm of one token's features is fixed by the final RMSNorm
        # (about zero gradient for "last" pooling)
        pm.zero_grad(set_to_none=True)
        ((features @ torch.linspace(-1, 1, features.shape[1])) ** 2).sum().backward()
        return [p.grad.clone() for p in params]

    got = forwards.pool_hidden(trunk.member_hidden(pm, sub, 1, s_trunk, "member1"), sub.pool, sub.last, pooling)
    want = _plain_features(pm, [PAIR_ROWS[i] for i in rows], pooling, "member1")
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(grads(got), grads(want)):
        # round-off measured up to 2e-6 of each weight's largest gradient (the single model's prefix path: 3e-6)
        assert (a - b).abs().max() <= 2e-5 * b.abs().max()


@pytest.mark.parametrize("case", sorted(SHARED) + ["unshared"])
def test_members_in_one_batch_equal_each_member_on_its_own_rows(two_member_model, case):
    """The training path (reward.ensemble_backward): member 0 keeps pairs 0 and 1, member 1 pairs 1 and 2
    (their bootstrap resamples); both run their layer in one batch (trunk.members_hidden), each LoRA
    linear applying a member's adapter to its rows only. Features and both members' LoRA gradients equal
    each member's own pass over its rows (trunk.take_rows, trunk.member_hidden), and the layer runs once."""
    from pipeline.models import forwards
    from pipeline.models.loading import decoder_layers

    pm, _ = two_member_model
    encoded, groups = SHARED[case] if case in SHARED else (ROWS, None)
    adapters = ["default", "member1"]
    params = [p for n, p in pm.named_parameters() if "lora_" in n and p.requires_grad]
    laid, tr = trunk.shared_trunk(pm, encoded, 0, 1, "default", groups)
    # pairs: rows i and i + 3 (PAIR_GROUPS); the system prompt's and unshared rows: rows themselves
    member_rows = ([torch.tensor([0, 1, 3, 4]), torch.tensor([1, 2, 4, 5])] if case == "pairs"
                   else [torch.tensor([0, 1]), torch.tensor([1, 2])])
    direction = torch.linspace(-1, 1, pm.config.hidden_size)

    def loss(features):
        return sum(((f @ direction) ** 2).sum() for f in features)

    def grads(features):
        pm.zero_grad(set_to_none=True)
        loss(features).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    _, stack = decoder_layers(pm)
    calls = []
    hook = stack[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    together = trunk.members_hidden(pm, laid, 1, tr, adapters, member_rows)
    hook.remove()
    assert together is not None and len(calls) == {"system": 2, "pairs": 3, "unshared": 1}[case]  # per level, once
    got = [forwards.pool_hidden(h, r.pool, r.last, "mean") for h, r in together]
    want = []
    for a, rows in zip(adapters, member_rows):
        sub, s_trunk = trunk.take_rows(rows, laid, tr)
        want.append(forwards.pool_hidden(trunk.member_hidden(pm, sub, 1, s_trunk, a), sub.pool, sub.last, "mean"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    for a, b in zip(grads(got), grads(want)):
        assert (a - b).abs().max() <= 2e-5 * max(b.abs().max(), 1e-12)
    assert (got[0][1] - got[1][0]).abs().max() > 1e-2  # the same row under the two members differs


def test_member_rows_must_cover_the_batch(two_member_model):
    from pipeline.models import lean_ops

    pm, _ = two_member_model
    linear = next(m for m in pm.modules() if lean_ops.is_peft_lora_linear(m) and "member1" in m.lora_A)
    spans = lean_ops.MemberSpans(["default", "member1"])
    forward = lean_ops.member_rows_forward(linear, spans)
    x = torch.randn(3, 2, linear.in_features)
    with pytest.raises(RuntimeError, match="do not cover the batch"):
        forward(x)
    spans.counts = [1, 1]
    with pytest.raises(RuntimeError, match="do not cover the batch"):
        forward(x)
    spans.counts = [3, 0]  # every row member 0's: the layer with only its adapter, as peft computes it
    from pipeline.models import stacking

    with stacking.active_adapters(pm, ["default"]):
        torch.testing.assert_close(forward(x), linear(x), rtol=1e-6, atol=1e-6)


def test_prefixes_fall_back_to_whole_rows(two_member_model, monkeypatch):
    """Nothing to share (one row; sharing off) or a cache the trunk cannot serve (sliding windows, linear
    attention): the rows run whole, with the plain features."""
    from pipeline.models import forwards

    pm, _ = two_member_model
    adapters = ["default", "member1"]
    one = ensemble.member_features(pm, SYSTEM_ROWS[:1], 0, "mean", adapters)
    assert trunk.shared_trunk(pm, SYSTEM_ROWS[:1], 0, 1, "default")[0].prefix_ids.shape == (1, 0)
    torch.testing.assert_close(one[1], _plain_features(pm, SYSTEM_ROWS[:1], "mean", "member1"), **TOL)
    monkeypatch.setattr(forwards, "SHARE_PREFIXES", False)
    assert trunk.shared_trunk(pm, SYSTEM_ROWS, 0, 1, "default")[0].prefix_ids.shape == (1, 0)
    monkeypatch.setattr(forwards, "SHARE_PREFIXES", True)
    monkeypatch.setattr(forwards, "plain_cache", lambda cache: False)
    laid, tr = trunk.shared_trunk(pm, SYSTEM_ROWS, 0, 1, "default")
    assert laid.prefix_ids.shape[1] == 0 and tr.prefix is None
    got = ensemble.member_features(pm, SYSTEM_ROWS, 0, "last", adapters)
    torch.testing.assert_close(got[1], _plain_features(pm, SYSTEM_ROWS, "last", "member1"), **TOL)


@pytest.mark.parametrize("rows", [ROWS, SYSTEM_ROWS], ids=["unshared", "system"])
def test_trunk_runs_with_other_adapters_off(two_member_model, rows):
    """On a PPO policy's base the policy adapter sits in every layer; the shared trunk (and its prefix
    pass) must not include it."""
    from pipeline.config import LoraConfigSection
    from pipeline.models import loading, stacking

    pm, tok = two_member_model
    pm.add_adapter("policy", loading.lora_config(LoraConfigSection(r=2, target_modules="all-linear"),
                                                 task_type="SEQ_CLS"))
    for n, p in pm.named_parameters():
        if ".policy." in n and "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.5)
    with stacking.active_adapters(pm, ["policy"]):  # what PPO has active when it scores
        got = ensemble.member_features(pm, rows, tok.pad_token_id, "mean", ["default", "member1"])
    with stacking.active_adapters(pm, ["member1"]):
        want = ensemble.member_features(pm, rows, tok.pad_token_id, "mean", ["member1"], split=0)[0]
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)


def test_ensemble_flops_by_hand():
    from pipeline.models.throughput import DecoderShape, ensemble_train_flops, pair_train_flops

    shape = DecoderShape(matmul_params=1000, layers=2, width=8, vocab=10)
    # the docstring's example: trunk 6,960 + 2 x (6,960 + 8,160)
    assert ensemble_train_flops(shape, [(2, 1, 3)], [[0], [0]], 1, 1, 10) == 37200
    # the second member's resample skips it: one member's count is the single model's
    assert ensemble_train_flops(shape, [(2, 1, 3)], [[0], []], 1, 1, 10) == 22080
    assert pair_train_flops(shape, [(2, 1, 3)], 1, 10) == 22080


# ---------------------------------------------------------------------------------------------
# The k-member reward stage


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.stages.reward import run_reward

    run = tmp_path_factory.mktemp("ens")
    cfg = load_config(CONFIG, ["model.compute_dtype=float32", "reward.ensemble=3", "reward.max_steps=3",
                               "reward.lora.top_layers=1"])
    out = run_reward(cfg, run)
    return run, out


def test_members_differ_after_training_and_are_recorded(ensemble_run):
    from safetensors.torch import load_file

    run, out = ensemble_run
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["ensemble"]
    assert info["members"] == 3 and info["folders"] == [".", "member1", "member2"] and info["trunk_split"] == 1
    assert len(info["normalization"]["mean"]) == 3 and all(s > 0 for s in info["normalization"]["std"])
    states = [load_file(str(out / f / "adapter_model.safetensors")) for f in info["folders"]]
    lora = [{k: v for k, v in st.items() if "lora_" in k} for st in states]
    assert all(st.keys() == lora[0].keys() for st in lora)
    for i in range(3):
        for j in range(i + 1, 3):  # every pair of members differs in every LoRA weight matrix
            assert all(not torch.equal(lora[i][k], lora[j][k]) for k in lora[i])
    heads = [next(v for k, v in st.items() if k.endswith("score.weight")) for st in states]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    metrics = manifest["metrics"]
    for m in range(3):
        assert 0.0 <= metrics[f"member{m}_eval_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/m2/loss" in r for r in rows)


def test_members_trained_in_one_batch_equal_members_trained_one_at_a_time(ensemble_run, tmp_path, monkeypatch):
    """The stage with the members' layers batched (trunk.members_hidden, the fixture's run) and with one
    member at a time (reward.ensemble_together=false, and trunk.BATCH_MEMBERS off for the scoring too):
    the same LoRA weights and heads after 3 steps to float round-off, and the same held-out accuracies."""
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.stages.reward import run_reward

    run, out = ensemble_run
    monkeypatch.setattr(trunk, "BATCH_MEMBERS", False)
    cfg = load_config(CONFIG, ["model.compute_dtype=float32", "reward.ensemble=3", "reward.max_steps=3",
                               "reward.lora.top_layers=1", "reward.ensemble_together=false"])
    alone = run_reward(cfg, tmp_path / "run")
    info = json.loads((out / "manifest.json").read_text())["ensemble"]
    for folder in info["folders"]:
        a, b = (load_file(str(o / folder / "adapter_model.safetensors")) for o in (out, alone))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    m_a, m_b = (json.loads((o / "manifest.json").read_text())["metrics"] for o in (out, alone))
    for m in range(3):
        assert m_a[f"member{m}_eval_accuracy"] == m_b[f"member{m}_eval_accuracy"]


def test_normalisation_scores_serve_the_rank_correlation(ensemble_run):
    """The reward stage reads the rank correlation with gold off the scores the members' normalisation
    computed (not a second pass over the same responses): they are the normalised ensemble's scores of
    those responses, and the manifest's correlation is the one a fresh pass gives."""
    from pipeline.config import load_config
    from pipeline.models.reward_model import load_reward_scorer
    from pipeline.stages import reward as rw

    run, out = ensemble_run
    cfg = load_config(CONFIG)
    manifest = json.loads((out / "manifest.json").read_text())
    scorer = load_reward_scorer(out)
    saved_mean, saved_std = list(scorer.mean), list(scorer.std)
    record, scores = rw.normalise_members(scorer, run / "sft", cfg.data)
    assert record["mean"] == pytest.approx(saved_mean, abs=1e-6) and record["std"] == pytest.approx(saved_std, abs=1e-6)
    convs, responses, _ = rw.sft_responses(run / "sft", cfg.data)
    assert len(scores) == len(responses) >= 3
    assert scores == pytest.approx(scorer([""] * len(convs), responses, prompt_messages=convs), abs=1e-6)
    assert manifest["metrics"]["spearman_vs_gold_sft_eval"] == pytest.approx(
        rw.spearman_on_sft_eval(scorer, cfg.data), abs=1e-9)


def test_one_member_alone_is_the_single_model_scorer(ensemble_run, tiny_model_cfg):
    """members: [i] serves member i exactly as a one-model reward model is served (raw, no
    standardisation); the ensemble path with that one member and unit normalisation agrees to round-off."""
    from pipeline.models.reward_model import EnsembleScorer, RewardModelScorer, load_reward_scorer

    run, out = ensemble_run
    prompts, responses = ["Tell me about tea.", "Any tips?"], ["Tea is lovely!", "Go slowly and enjoy it."]
    single = load_reward_scorer(out, members=[1])
    assert isinstance(single, RewardModelScorer)
    want = single(prompts, responses)
    one = EnsembleScorer(single.model, single.tokenizer, [(single.adapter, single.head_weight, single.head_bias)],
                         [0.0], [1.0], "mean", max_length=single.max_length, pooling=single.pooling)
    assert one(prompts, responses) == pytest.approx(want, abs=1e-5)
    # and all three, min-aggregated: the minimum of the standardised members
    ens = load_reward_scorer(out, aggregate="min")
    got = ens(prompts, responses)
    d = ens.details()
    assert got == pytest.approx([min(d[f"member{m}"][i] for m in range(3)) for i in range(2)], abs=1e-6)
    assert d["disagreement"][0] == pytest.approx(torch.tensor([d[f"member{m}"][0] for m in range(3)]).std(
        unbiased=False).item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"members must be distinct member indices in \[0, 3\)"):
        load_reward_scorer(out, members=[3])


def test_ensemble_serves_rlhf_score(ensemble_run, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    run, out = ensemble_run
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                            for p, r in [("Hi?", "Hello, lovely day!"), ("Tips?", "Breathe and smile.")]))
    spec = json.dumps([{"name": "reward_model", "args": {"path": str(out), "aggregate": "uwo", "uwo_lambda": 0.5}}])
    res = CliRunner().invoke(main, ["score", "--input", str(rows), "--config", CONFIG, "--run-dir", str(run), "--rewards", spec,
                                    "model.compute_dtype=float32"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert len(got) == 2
    for row in got:
        c = row["components"]
        z = torch.tensor([c[f"reward_model/member{m}"] for m in range(3)])
        # uwo: mean - 0.5 x population variance of the standardised members
        assert row["score"] == pytest.approx((z.mean() - 0.5 * z.var(unbiased=False)).item(), abs=1e-5)
        assert c["reward_model/disagreement"] == pytest.approx(z.std(unbiased=False).item(), abs=1e-5)


@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_ensemble_attached_to_a_policy_base_scores_as_served_alone(ensemble_run, tiny_model_cfg, aggregate):
    """What eval and PPO do: the members attach to the policy's base (host) as more adapters, no second
    base; every member, its standardisation and the aggregate give the stand-alone scorer's numbers."""
    from peft import get_peft_model

    from pipeline.config import LoraConfigSection
    from pipeline.models import loading
    from pipeline.models.reward_model import load_reward_scorer

    run, out = ensemble_run
    prompts, responses = ["How are you?", "Tell me about cats."], ["Wonderful, thank you!", "They are awful."]
    alone = load_reward_scorer(out, members=[0, 2], aggregate=aggregate)
    base, tok, info = loading.load_base(tiny_model_cfg)
    policy = get_peft_model(base, loading.lora_config(LoraConfigSection(r=2, target_modules="all-linear")),
                            adapter_name="policy")
    shared = load_reward_scorer(out, host=(policy, tok, info), members=[0, 2], aggregate=aggregate)
    assert shared.model is policy  # attached, not loaded again
    want, got = alone(prompts, responses), shared(prompts, responses)
    assert torch.allclose(torch.tensor(want), torch.tensor(got), atol=1e-5)
    assert shared.details()["member2"] == pytest.approx(alone.details()["member2"], abs=1e-5)
