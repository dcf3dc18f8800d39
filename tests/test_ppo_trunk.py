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
    reference pass F - 5,800 = 6,120 and the training pass T - 5,800."""
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
