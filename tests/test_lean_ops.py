"""Lean autograd functions: same forward as the modules they replace, same gradients, less kept."""
import pytest
import torch

from helpers import randomize_lora_b
from pipeline import lean_ops, models
from pipeline.config import LoraConfigSection


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


def test_installed_model_has_the_same_logits_and_lora_gradients(tiny_model_cfg):
    from peft import get_peft_model

    def build():
        model, tok, _ = models.load_base(tiny_model_cfg)
        torch.manual_seed(0)
        pm = get_peft_model(model, models.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
        randomize_lora_b(pm, 0.1)
        return pm.eval()

    ids = torch.randint(5, 200, (2, 10))
    results = []
    for lean in (False, True):
        pm = build()
        if lean:
            assert lean_ops.install(pm) == {"rmsnorm": 5, "swiglu": 2}  # 2 layers x 2 + final; 2 MLPs
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


def test_unknown_architectures_are_left_alone():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    assert lean_ops.install(model) == {"rmsnorm": 0, "swiglu": 0}
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
