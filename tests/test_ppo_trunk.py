"""PPO over a shared trunk (pipeline/models/trunk.py, ppo_step.prepare/update with ppo.lora.top_layers): the
row layout and the adapter sets by hand, the replayed forward against the plain one (logprobs, entropies,
values, gradients, row subsets) in both precisions, KL exactly 0 before the first update, and the FLOP
count. The whole-run equivalence and resume are in test_ppo.py."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.models import forwards, loading, stacking, throughput, trunk
from pipeline.rl import ppo_math, ppo_step, rollout
from pipeline.rl.policy_value import POLICY, SFT, PolicyValue

CONFIG = "configs/tiny.yaml"
QUESTIONS = ["How are you today, my friend?", "Tell me a joke.", "What is the capital of France, please?", "Hi"]


def test_response_rows_by_hand():
    q = torch.tensor([[0, 5, 6], [4, 5, 6]])
    qm = torch.tensor([[0, 1, 1], [1, 1, 1]])
    r = torch.tensor([[7, 8, 0], [9, 9, 9]])
    rm = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # each row: the prompt's real tokens, then the response's; start at the prompt's last token
    assert trunk.response_rows(q, qm, r, rm) == [([5, 6, 7, 8], 1), ([4, 5, 6, 9, 9, 9], 2)]


def test_differing_adapters_by_hand():
    assert trunk.differing_adapters([SFT], [SFT, POLICY]) == [POLICY]
    assert trunk.differing_adapters(None, [SFT, POLICY]) == [POLICY, SFT]  # reference: the bare base
    assert trunk.differing_adapters([SFT], [SFT, POLICY], [SFT, "value"]) == [POLICY, "value"]
    assert trunk.differing_adapters(None, [POLICY]) == [POLICY]


def _stack(precision: str, policy_top_layers: int, sft_b: float = 0.05, policy_b: float = 0.05):
    """The tiny model with an SFT adapter in every layer and a policy adapter on the top
    ``policy_top_layers`` (0: every layer), stacked as run_ppo stacks them, LoRA B drawn so both matter
    (``policy_b`` 0: a fresh policy, as before the first update); and sampled rows, one cut short."""
    from peft import get_peft_model

    cfg = load_config(CONFIG, [f"model.compute_dtype={precision}", f"ppo.lora.top_layers={policy_top_layers}"])
    base_model, tok, _ = loading.load_base(cfg.model)
    policy_cfg = loading.lora_config(cfg.ppo.lora, model=base_model)
    peft_model = get_peft_model(base_model, loading.lora_config(cfg.sft.lora), adapter_name=SFT)
    peft_model.add_adapter(POLICY, policy_cfg)
    gen = torch.Generator().manual_seed(5)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(f".{POLICY}." in n)
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (policy_b if f".{POLICY}." in n else sft_b))
    policy = [SFT, POLICY]
    stacking.set_active_adapters(peft_model, policy)
    pv = PolicyValue(peft_model, base_model.config.hidden_size, policy, None)
    with torch.no_grad():
        pv.value_head.weight.copy_(torch.randn(pv.value_head.weight.shape, generator=gen))
    peft_model.eval()
    encoded = rollout.encode_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS], 256)
    q, qm = forwards.left_pad(encoded, tok.pad_token_id)
    torch.manual_seed(0)
    with stacking.active_adapters(peft_model, policy):
        r, m, _ = rollout.generate(peft_model, tok, q, qm, 8, 0.7, rollout.stop_token_ids(tok, base_model))
    r[1, 5:], m[1, 5:] = tok.pad_token_id, False  # a response that stopped early: padding after it
    return peft_model, pv, q, qm, r, m


def test_shared_split_is_the_lowest_layer_the_reference_and_policy_differ_in(tiny_model_cfg):
    peft_model, pv, *_ = _stack("float32", 1)
    assert ppo_step.shared_split(peft_model, pv, [SFT]) == 1  # 2 layers, the policy on the top one
    # anchored to the bare base, the SFT adapter differs too, and it sits in every layer
    assert ppo_step.shared_split(peft_model, pv, None) == 0
    everywhere, pv_all, *_ = _stack("float32", 0)
    assert ppo_step.shared_split(everywhere, pv_all, [SFT]) == 0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_replayed_trunk_equals_the_plain_forward(precision):
    """Logprobs, entropies and values (value head on the policy's hidden states), the reference's
    logprobs, the same on a subset of the rows, and the policy's gradients: equal to the plain forward
    to float round-off (float32: 1e-5; bf16: the two layouts round their matmuls differently, 2^-8
    relative per product over 2 layers, measured up to 3e-2 on these logprobs of magnitude ~10)."""
    peft_model, pv, q, qm, r, m = _stack(precision, 1)
    mf = m.float()
    tol = 1e-5 if precision == "float32" else 6e-2
    shared = trunk.response_trunk(peft_model, q, qm, r, m, ppo_step.shared_split(peft_model, pv, [SFT]), [SFT])
    assert shared is not None and shared.split == 1
    # every row's system prompt is the shared start: it runs once in the trunk and once per pass above it
    assert shared.laid.prefix_ids.shape[1] > 10
    with torch.no_grad():
        plain = pv(q, qm, r, m, 0.7, with_entropy=True)
        replayed = pv(q, qm, r, m, 0.7, with_entropy=True, shared=shared)
        for a, b in zip(plain, replayed):
            assert ((a - b) * mf).abs().max() <= tol * max(1.0, a.abs().max().item())
        with stacking.active_adapters(peft_model, [SFT]):
            ref = forwards.forward_response(peft_model, q, qm, r, m, 0.7).logprobs
        ref_shared = trunk.response_forward(peft_model, shared, [SFT], r, 0.7).logprobs
        assert ((ref - ref_shared) * mf).abs().max() <= tol * 10
        # the check has teeth: the policy's top-layer adapter moves the logprobs off the reference
        assert ((ref - plain[0]) * mf).abs().max() > 1e-3
        rows = torch.tensor([3, 1])
        sub = pv(q[rows], qm[rows], r[rows], m[rows], 0.7, shared=shared.take(rows))[0]
        assert ((sub - plain[0][rows]) * mf[rows]).abs().max() <= tol * 10

    def grads(view):
        pv.zero_grad()
        logprobs, _, values = pv(q, qm, r, m, 0.7, shared=view)
        ((logprobs * mf).sum() + (values * mf).sum()).backward()
        return {n: p.grad.clone() for n, p in pv.named_parameters() if p.requires_grad}

    g_plain, g_shared = grads(None), grads(shared)
    assert g_plain.keys() == g_shared.keys() and len(g_plain) > 2
    scale = max(g.abs().max().item() for g in g_plain.values())
    for k in g_plain:
        assert (g_plain[k] - g_shared[k]).abs().max() <= (1e-5 if precision == "float32" else 5e-2) * scale, k


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_kl_is_exactly_zero_before_the_first_update_over_the_trunk(precision):
    """A fresh policy (LoRA B = 0) over the replayed trunk gives the reference's logprobs bit for bit."""
    peft_model, pv, q, qm, r, m = _stack(precision, 1, policy_b=0.0)
    shared = trunk.response_trunk(peft_model, q, qm, r, m, 1, [SFT])
    with torch.no_grad():
        old = pv(q, qm, r, m, 0.7, shared=shared)[0]
        ref = trunk.response_forward(peft_model, shared, [SFT], r, 0.7).logprobs
    for estimator in ("k1", "k3"):
        kl = ppo_math.kl_per_token(old, ref, estimator) * m.float()
        assert torch.equal(kl, torch.zeros_like(kl)), estimator


def test_step_flops_count_the_trunk_once():
    """The docstring's relation, on the shape of throughput.forward_flops' example (N 1,000, 2 layers,
    d 8, V 10), one 3-token prompt and a 2-token response, one minibatch in one piece (the old logprobs
    come from the first training forward), one PPO epoch, head on the policy:
    forward F = 5 tokens attending to 5 + 2 logit rows = 5 (2,000 + 4 x 2 x 8 x 5) + 2 x 160 = 11,920,
    G = 320; the train pass T = F + backward. Split 1 of 2: the trunk (F - G) / 2 = 5,800 once, then the
    reference pass F - 5,800 = 6,120 and the training pass T - 5,800; with the sampler's trunk replayed
    (trunk_ran False) the 5,800 is not train's at all."""
    from types import SimpleNamespace

    shape = throughput.DecoderShape(matmul_params=1000, layers=2, width=8, vocab=10)
    pc = SimpleNamespace(minibatches=1, batch_size=1, micro_batch_size=0, ppo_epochs=1)
    _, plain = ppo_step.step_flops([3], [2], 0, pc, shape, 1, 10, False)
    _, shared = ppo_step.step_flops([3], [2], 0, pc, shape, 1, 10, False, split=1)
    f = throughput.forward_flops(shape, 5, 5, logits=2)
    assert f == 11920
    t = throughput.lora_train_flops(shape, [3], [2], 1, 10)
    assert plain == f + t
    assert shared == 5800 + (f - 5800) + (t - 5800)
    _, replayed = ppo_step.step_flops([3], [2], 0, pc, shape, 1, 10, False, split=1, trunk_ran=False)
    assert replayed == (f - 5800) + (t - 5800)


@pytest.mark.parametrize("merged", [False, True])
def test_the_samplers_trunk_serves_the_reference(merged):
    """Eval's reference pass over the sampler's trunk (rollout.sample with trunk_split, then
    trunk.sampled_response_hidden): the SFT reference's logprobs of the drawn rows equal a full forward's
    to float round-off, with rows that stop early and leave the decode batch, from merged weights too."""
    peft_model, pv, q, qm, *_ = _stack("float32", 1)
    _, tok, _ = loading.load_base(load_config(CONFIG).model)
    # each prompt twice (eval's samples per prompt: the prefill caches all of a repeated prompt but its last token)
    q, qm = q.repeat_interleave(2, dim=0), qm.repeat_interleave(2, dim=0)
    stop = [int(i) for i in torch.randint(5, tok.vocab_size - 1, (40,), generator=torch.Generator().manual_seed(1))]
    weights = stacking.merged_linear_weights(peft_model) if merged else torch.no_grad()
    with stacking.active_adapters(peft_model, [SFT, POLICY]), weights:
        drawn = rollout.sample(peft_model, tok, q, qm, 10, 0.7, stop, generator_seed=4, with_logprobs=True,
                               trunk_split=1)
        plain = rollout.sample(peft_model, tok, q, qm, 10, 0.7, stop, generator_seed=4, with_logprobs=True)
    assert torch.equal(drawn.response, plain.response)  # keeping the trunk changes no draw
    assert drawn.trunk is not None and drawn.trunk.split == 1 and plain.trunk is None
    m = drawn.mask.float()
    assert (m.sum(dim=1) < m.shape[1]).any() and (m.sum(dim=1) == m.shape[1]).any()  # some stopped, some did not
    with torch.no_grad(), stacking.active_adapters(peft_model, [SFT]):
        want = forwards.forward_response(peft_model, q, qm, drawn.response, drawn.mask, 0.7).logprobs
        hidden = trunk.sampled_response_hidden(peft_model, drawn.trunk, q, qm, drawn.response, drawn.mask)
        got = forwards.response_outputs(peft_model, hidden, drawn.response, 0.7).logprobs
    torch.testing.assert_close(got * m, want * m, atol=2e-5, rtol=0)
    # the check has teeth: the policy's logprobs of the same rows are not the reference's
    assert ((drawn.logprobs - want) * m).abs().max() > 1e-3
    # a batch laid out unlike the sampler's (a row fewer) is not served from it
    with torch.no_grad(), stacking.active_adapters(peft_model, [SFT]):
        assert trunk.sampled_response_hidden(peft_model, drawn.trunk, q[1:], qm[1:], drawn.response[1:],
                                             drawn.mask[1:]) is None


def test_state_tap_assembles_rows_that_left_the_batch():
    """StateTap.states by hand: the prompt's columns for every row, then one column per decode step for the
    rows that step ran (rows 0 and 2 after row 1 left), 0 where a row was not run."""
    tap = trunk.StateTap.__new__(trunk.StateTap)
    tap.plain, tap.steps = True, []
    tap.last = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)  # prompt: 3 rows x 2 columns
    tap.take_prompt()
    tap.last = torch.tensor([[[10.0]], [[11.0]], [[12.0]]])
    tap.take_step(torch.tensor([0, 1, 2]))
    tap.last = torch.tensor([[[20.0]], [[22.0]]])
    tap.take_step(torch.tensor([0, 2]))
    assert tap.states().squeeze(-1).tolist() == [[0, 1, 10, 20], [2, 3, 11, 0], [4, 5, 12, 22]]


@pytest.mark.parametrize("merged", [False, True])
def test_the_samplers_trunk_serves_ppos_passes(merged):
    """PPO's passes over the sampler's trunk (ppo_step.sample_rollout with trunk_split, then
    trunk.sampled_shared_rows): laid out as response_trunk lays the rows out, and the reference's and the
    policy's logprobs and values equal the plain forward's to float round-off, rows that stopped early
    included, on a subset of the rows too; a fresh policy's KL to the reference is exactly 0 over it."""
    peft_model, pv, q, qm, *_ = _stack("float32", 1)
    _, tok, _ = loading.load_base(load_config(CONFIG).model)
    stop = [int(i) for i in torch.randint(5, tok.vocab_size - 1, (40,), generator=torch.Generator().manual_seed(2))]
    weights = stacking.merged_linear_weights(peft_model) if merged else torch.no_grad()
    with stacking.active_adapters(peft_model, [SFT, POLICY]), weights:
        drawn = rollout.sample(peft_model, tok, q, qm, 10, 0.7, stop, generator_seed=6, trunk_split=1)
    r, m = drawn.response, drawn.mask
    mf = m.float()
    assert (mf.sum(dim=1) < mf.shape[1]).any()  # a row stopped early
    assert drawn.trunk.top is not None and len(drawn.trunk.kv) == 1
    shared = trunk.sampled_shared_rows(peft_model, drawn.trunk, q, qm, r, m)
    ran = trunk.response_trunk(peft_model, q, qm, r, m, 1, [SFT])
    assert shared is not None
    for name in ("prefix_ids", "prefix_mask", "ids", "mask", "group", "pool", "last"):
        assert torch.equal(getattr(shared.laid, name), getattr(ran.laid, name)), name
    # the states on the rows' real columns but each row's last (whose state nothing reads)
    real = shared.laid.mask.bool().clone()
    real[torch.arange(real.shape[0]), shared.laid.last] = False
    torch.testing.assert_close(shared.trunk.out[real], ran.trunk.out[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shared.trunk.top, ran.trunk.top, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        plain = pv(q, qm, r, m, 0.7)
        replayed = pv(q, qm, r, m, 0.7, shared=shared)
        for a, b in zip(plain, replayed):
            if a is not None:  # logprobs and values (no entropy asked for)
                assert ((a - b) * mf).abs().max() <= 2e-5 * max(1.0, a.abs().max().item())
        with stacking.active_adapters(peft_model, [SFT]):
            ref = forwards.forward_response(peft_model, q, qm, r, m, 0.7).logprobs
        ref_shared = trunk.response_forward(peft_model, shared, [SFT], r, 0.7).logprobs
        assert ((ref - ref_shared) * mf).abs().max() <= 1e-4
        assert ((ref - plain[0]) * mf).abs().max() > 1e-3
        rows = torch.tensor([2, 0])
        sub = pv(q[rows], qm[rows], r[rows], m[rows], 0.7, shared=shared.take(rows))[0]
        assert ((sub - plain[0][rows]) * mf[rows]).abs().max() <= 1e-4
    fresh, fresh_pv, *_ = _stack("float32", 1, policy_b=0.0)
    with stacking.active_adapters(fresh, [SFT, POLICY]), torch.no_grad():
        drawn = rollout.sample(fresh, tok, q, qm, 10, 0.7, stop, generator_seed=6, trunk_split=1)
        shared = trunk.sampled_shared_rows(fresh, drawn.trunk, q, qm, drawn.response, drawn.mask)
        old = fresh_pv(q, qm, drawn.response, drawn.mask, 0.7, shared=shared)[0]
        ref = trunk.response_forward(fresh, shared, [SFT], drawn.response, 0.7).logprobs
    assert torch.equal(ppo_math.kl_per_token(old, ref, "k3") * drawn.mask, torch.zeros_like(old))


def test_sampled_rows_are_not_served_where_the_prefill_cached_more_than_the_shared_start():
    """Each prompt twice: the prefill caches every prompt's rest but its last token, which PPO's layout
    (one prefix, the start all rows share) would have to see again: sampled_shared_rows declines."""
    peft_model, pv, q, qm, *_ = _stack("float32", 1)
    _, tok, _ = loading.load_base(load_config(CONFIG).model)
    q, qm = q.repeat_interleave(2, dim=0), qm.repeat_interleave(2, dim=0)
    with stacking.active_adapters(peft_model, [SFT, POLICY]), torch.no_grad():
        drawn = rollout.sample(peft_model, tok, q, qm, 6, 0.7, [], generator_seed=6, trunk_split=1)
    assert drawn.trunk is not None and drawn.trunk.top is None
    assert trunk.sampled_shared_rows(peft_model, drawn.trunk, q, qm, drawn.response, drawn.mask) is None
