"""Lean autograd functions: same forward as the modules they replace, same gradients, less kept."""
import pytest
import torch
from helpers import randomize_lora_b

from pipeline.config import LoraConfigSection
from pipeline.models import lean_ops, loading, stacking


def _llama_norm(hidden, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, hidden))
    return norm


def test_rmsnorm_by_hand():
    # x = (3, 4): mean(x^2) = 12.5, r = 1/sqrt(12.5) = 0.282843; y = w * x * r with w = (1, 2)
    # = (0.848528, 2.262742). dy = (1, 0): gw = (1, 0), xh = (0.848528, 1.131371),
    # mean(gw * xh) = 0.424264; dx = r * (gw - xh * 0.424264) = 0.282843 * (0.64, -0.48) = (0.181019, -0.135765)
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0])
    y = lean_ops.RMSNormFn.apply(x, w, 0.0)
    torch.testing.assert_close(y, torch.tensor([[0.848528, 2.262742]]), atol=1e-6, rtol=0)
    y.backward(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(x.grad, torch.tensor([[0.181019, -0.135765]]), atol=1e-6, rtol=0)


def test_swiglu_by_hand():
    # gate 0: silu(0) = 0, d/dgate = s(1 + g(1 - s)) = 0.5; gate 2: s = 0.880797, silu = 1.761594,
    # d/dgate = 0.880797 * (1 + 2 * 0.119203) = 1.090784. up = (3, -1), dy = (1, 1):
    # y = (0, -1.761594); dgate = (0.5 * 3, 1.090784 * -1) = (1.5, -1.090784); dup = (0, 1.761594)
    gate = torch.tensor([0.0, 2.0], requires_grad=True)
    up = torch.tensor([3.0, -1.0], requires_grad=True)
    y = lean_ops.SwiGLUFn.apply(gate, up)
    torch.testing.assert_close(y, torch.tensor([0.0, -1.761594]), atol=1e-6, rtol=0)
    y.sum().backward()
    torch.testing.assert_close(gate.grad, torch.tensor([1.5, -1.090784]), atol=1e-6, rtol=0)
    torch.testing.assert_close(up.grad, torch.tensor([0.0, 1.761594]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_the_module(dtype, tol):
    torch.manual_seed(0)
    norm = _llama_norm(48, 1e-5).to(dtype)
    norm.weight.requires_grad_(True)
    x = (torch.randn(3, 5, 48) * 3).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 48).to(dtype)
    y_ref = norm(x)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    y = lean_ops.RMSNormFn.apply(x, norm.weight, norm.variance_epsilon)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    assert torch.equal(y, y_ref)  # the same ops in the same order
    torch.testing.assert_close(gx.float(), gx_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(gw.float(), gw_ref.float(), atol=tol * 10, rtol=tol)


def _tiny_lora(model_cfg, adapters=("default",), r=4):
    from peft import get_peft_model

    model, tok, _ = loading.load_base(model_cfg)
    torch.manual_seed(0)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=r, alpha=2 * r, dropout=0.0)),
                        adapter_name=adapters[0])
    for name in adapters[1:]:
        pm.add_adapter(name, loading.lora_config(LoraConfigSection(r=r, alpha=2 * r, dropout=0.0)))
    randomize_lora_b(pm, 0.1)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)  # peft trains only the first adapter by default
    return pm.eval()


def test_installed_norm_and_mlp_give_the_same_logits_and_lora_gradients(tiny_model_cfg):
    ids = torch.randint(5, 200, (2, 10))
    results = []
    for lean in (False, True):
        pm = _tiny_lora(tiny_model_cfg)
        if lean:
            # 2 layers x 2 + final; 2 MLPs; LoRA left to peft here: that patch is not bit-identical
            assert lean_ops.install(pm, lora=False) == {"rmsnorm": 5, "swiglu": 2, "lora": 0}
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = pm(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads, sum(saved)))
    (l0, g0, s0), (l1, g1, s1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)
    assert s1 < s0  # less kept for backward


def _hand_lora_layer(dropout: float):
    """``(peft model, its LoRA layer)``: base W = I (2x2), A = (1, 1) (r = 1), B = (2, -1)^T, scaling
    alpha / r = 0.5, LoRA dropout ``dropout``; not yet lean."""
    from peft import LoraConfig, get_peft_model

    lin = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.eye(2))
    pm = get_peft_model(lin, LoraConfig(r=1, lora_alpha=0.5, target_modules=["0"], lora_dropout=dropout))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[2.0], [-1.0]]))
    return pm, layer


def test_lora_forward_by_hand():
    # base W = I (2x2), A = (1, 1) (r = 1), B = (2, -1)^T, scaling = alpha / r = 0.5; x = (1, 3):
    # base(x) = (1, 3); A x = 4; s * B (A x) = 0.5 * (8, -4) = (4, -2); y = (5, 1).
    # dy = (1, 1): dB = s * (A x) * dy = (2, 2); dA = s * (B . dy) * x = 0.5 * 1 * (1, 3) = (0.5, 1.5)
    pm, layer = _hand_lora_layer(0.0)
    assert lean_ops.install(pm)["lora"] == 1
    y = pm(torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(y, torch.tensor([[5.0, 1.0]]))
    y.sum().backward()
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, torch.tensor([[2.0], [2.0]]))
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, torch.tensor([[0.5, 1.5]]))


def _lora_logits_and_grads(model_cfg, adapters, lean):
    pm = _tiny_lora(model_cfg, adapters)
    stacking.set_active_adapters(pm, list(adapters))
    if lean:
        assert lean_ops.install(pm)["lora"] == 14  # 2 layers x 7 linears
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    with loading.compute_context(pm):
        logits = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    assert len(grads) == 28 * len(adapters)  # A and B of 14 linears per adapter
    return logits.detach().float(), base, grads


@pytest.mark.parametrize("adapters", [("default",), ("sft", "policy")], ids=["one", "stacked"])
def test_lean_lora_matches_peft_in_float32(tiny_model_cfg, adapters):
    """One adapter or two stacked (PPO's SFT + policy): logits and LoRA gradients equal peft's to float32
    round-off; with the adapters off the output is the base's, bit for bit."""
    l0, b0, g0 = _lora_logits_and_grads(tiny_model_cfg, adapters, lean=False)
    l1, b1, g1 = _lora_logits_and_grads(tiny_model_cfg, adapters, lean=True)
    assert torch.equal(b0, b1)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("adapters", [("default",), ("sft", "policy")], ids=["one", "stacked"])
def test_lean_lora_under_bf16_autocast_is_as_close_to_float32_as_peft(tiny_model_cfg, adapters):
    """In bf16 the two paths round differently (peft rounds product, scale and sum; addmm once), so
    neither equals the other: each is compared with the float32 computation of the same weights."""
    from dataclasses import replace

    ref_l, _, ref_g = _lora_logits_and_grads(tiny_model_cfg, adapters, lean=False)
    bf16 = replace(tiny_model_cfg, compute_dtype="bfloat16")
    errs = {}
    for lean in (False, True):
        logits, _, grads = _lora_logits_and_grads(bf16, adapters, lean)
        g_err = max(((grads[n] - ref_g[n]).norm() / ref_g[n].norm()).item() for n in ref_g)
        errs[lean] = ((logits - ref_l).abs().mean().item(), g_err)
    (peft_l, peft_g), (lean_l, lean_g) = errs[False], errs[True]
    # Measured on this model: logits 0.130 (peft) vs 0.130 (lean) mean abs from float32, gradients 0.42 vs
    # 0.40 relative (a random tiny model with large logits; bf16 keeps 8 bits of mantissa).
    assert lean_l <= 1.25 * peft_l and lean_g <= 1.25 * peft_g, errs


def test_lean_lora_leaves_merged_and_disabled_layers_to_peft(tiny_model_cfg):
    pm = _tiny_lora(tiny_model_cfg)
    ids = torch.randint(5, 200, (1, 6))
    pm.merge_adapter()
    with torch.no_grad():
        merged = pm(input_ids=ids).logits
        lean_ops.install(pm)
        assert torch.equal(pm(input_ids=ids).logits, merged)  # peft's merged path, untouched
        pm.unmerge_adapter()
        unmerged = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    assert not torch.equal(unmerged, base)


def test_lean_lora_survives_sampling_from_merged_weights(tiny_model_cfg):
    pm = _tiny_lora(tiny_model_cfg)
    lean_ops.install(pm)
    layers = [m for m in pm.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    before = [vars(m)["forward"] for m in layers]
    with stacking.merged_linear_weights(pm):
        assert all(vars(m)["forward"] is not f for m, f in zip(layers, before))
    assert [vars(m)["forward"] for m in layers] == before and len(layers) == 14


def test_unknown_architectures_are_left_alone():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    assert lean_ops.install(model) == {"rmsnorm": 0, "swiglu": 0, "lora": 0}
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradients_are_autograds_own(dtype):
    torch.manual_seed(0)
    gate = torch.randn(4, 7, 32).to(dtype).requires_grad_()
    up = torch.randn(4, 7, 32).to(dtype).requires_grad_()
    dy = torch.randn(4, 7, 32).to(dtype)
    ref = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), dy)
    out = lean_ops.SwiGLUFn.apply(gate, up)
    assert torch.equal(out, torch.nn.functional.silu(gate) * up)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (gate, up), dy), ref))


def test_uninstall_gives_back_exactly_the_models_own_forwards(tiny_model_cfg_both):
    """SFT trains through the lean kernels and evaluates without them: after uninstall the logits are
    bit for bit those of the model never patched, and forwards set by others (the 4-bit weights
    dequantized once at load) stay."""
    ids = torch.randint(5, 200, (2, 10))
    pm = _tiny_lora(tiny_model_cfg_both)
    own = {n: vars(m).get("forward") for n, m in pm.named_modules()}
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        counts = lean_ops.install(pm)
        assert lean_ops.uninstall(pm) == sum(counts.values()) > 0
        got = pm(input_ids=ids).logits
    assert torch.equal(got, want)
    assert {n: vars(m).get("forward") for n, m in pm.named_modules()} == own
    assert any(f is not None for f in own.values())  # the load's own patches survived


def test_lora_dropout_keeps_each_input_with_one_minus_p_and_rescales():
    # Same layer as test_lora_forward_by_hand with dropout p = 0.5 on the LoRA input: a kept x_j
    # counts 1 / (1 - p) = 2 times, a dropped one 0. x = (1, 3): mask (1, 0) gives A(x * m) / (1 - p) =
    # 1 * 2 = 2 and y = (1, 3) + 0.5 * (2 * 2, -1 * 2) = (3, 2); mask (0, 1): A = 3 * 2 = 6, y = (7, 0);
    # mask (1, 1): y = (5, 1) x 2 - base = (9, -1); mask (0, 0): y = base = (1, 3).
    pm, layer = _hand_lora_layer(0.5)
    lean_ops.install(pm)
    by_mask = {(1, 0): (3.0, 2.0), (0, 1): (7.0, 0.0), (1, 1): (9.0, -1.0), (0, 0): (1.0, 3.0)}
    x = torch.tensor([[1.0, 3.0]]).expand(4000, 2)
    pm.train()
    torch.manual_seed(0)
    y = pm(x)
    torch.manual_seed(0)
    keep = torch.rand(x.shape) >= 0.5  # the draw dropout_input makes
    expected = torch.tensor([by_mask[tuple(int(k) for k in row)] for row in keep.tolist()])
    torch.testing.assert_close(y, expected)
    # Each input kept independently with probability 1 - p: every mask about a quarter of 4000 rows
    # (binomial SE sqrt(4000 * 0.25 * 0.75) = 27, so 5 SE is +-137).
    counts = {m: sum(tuple(int(k) for k in row) == m for row in keep.tolist()) for m in by_mask}
    assert all(abs(c - 1000) < 137 for c in counts.values()), counts
    # Gradients flow through the kept inputs only: dA = s * (B . dy) * x * m / (1 - p) summed over rows.
    y.sum().backward()
    ga = 0.5 * 1.0 * (x * keep).sum(0) * 2
    torch.testing.assert_close(layer.lora_A["default"].weight.grad[0], ga)
    pm.eval()
    torch.testing.assert_close(pm(x[:1]), torch.tensor([[5.0, 1.0]]))  # no dropout in eval


def test_lora_dropout_matches_peft_given_the_same_mask(tiny_model_cfg, monkeypatch):
    """On the tiny model with LoRA dropout 0.1, the lean forward's logits and LoRA gradients equal peft's
    own forward when peft's dropout modules apply the masks the lean path drew (to float round-off)."""
    from peft import get_peft_model

    model, _, _ = loading.load_base(tiny_model_cfg)
    torch.manual_seed(0)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.1)))
    randomize_lora_b(pm, 0.1)
    pm.train()
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    masks: list[torch.Tensor] = []
    real_rand = torch.rand

    def recording_rand(*a, **k):
        out = real_rand(*a, **k)
        masks.append(out >= 0.1)
        return out
    lean_ops.install(pm)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "rand", recording_rand)
        lean = pm(input_ids=ids).logits
    lean.logsumexp(-1).sum().backward()
    g_lean = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    lean_ops.uninstall(pm)
    assert len(masks) == 14  # 2 layers x 7 linears, in forward order
    replay = iter(masks)
    for module in pm.modules():
        if lean_ops.is_peft_lora_linear(module):
            module.lora_dropout["default"].forward = lambda x: x * next(replay) / 0.9
    plain = pm(input_ids=ids).logits
    plain.logsumexp(-1).sum().backward()
    torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-5)
    for n, p in pm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_lean[n], p.grad, atol=1e-5, rtol=1e-4)
