"""Memory-lean autograd functions for training forwards of Llama-style decoders.

Autograd keeps, for backward, every intermediate its chain rule touches. Two blocks of a
Llama-style layer keep more than their gradient needs:

- RMSNorm upcasts its input to float32 and autograd keeps that copy (twice the bytes of a bf16
  input). :class:`RMSNormFn` keeps the input as it came, plus one float32 scalar per position.
- The SwiGLU MLP keeps ``gate``, ``up`` and ``silu(gate)``. :class:`SwiGLUFn` keeps ``gate`` and
  ``up`` and recomputes ``silu(gate)`` in backward.

Both compute the same forward op for op (bit-identical outputs). SwiGLU's backward runs the kernels
autograd would (identical gradients); RMSNorm's is the closed-form gradient in float32. On the
embedded model at batch 8 x ~100 tokens in bf16 they keep ~120 MB less per PPO forward (README,
PPO performance).

A third patch is about time, not memory. peft's LoRA layer computes ``base(x).clone() +
B(A(x)) * s``: a defensive copy, a scale and an add over the full (tokens x out_features) output,
then the scale's mirror in backward, for each of the ~210 adapted linears of a forward. :func:`lora_forward`
folds all three into one ``addmm`` (``base(x) + s * A(x) @ B^T`` in the GEMM's epilogue): the
same function, rounded once instead of three times, so equal to peft's to float round-off, not bit
for bit. :func:`install` patches the modules of known architectures and leaves everything else alone.
"""
from __future__ import annotations

import torch
from torch import nn

# Classes whose forward is exactly ``weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype)``.
_RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
# Classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class RMSNormFn(torch.autograd.Function):
    """``y = w * (x * r).to(x.dtype)`` with ``r = (mean(x^2) + eps)^-1/2`` over the last dim, in float32.

    Shapes: x ``(..., H)``, weight ``(H,)``; returns ``(..., H)``. Backward (Zhang & Sennrich 2019,
    "Root Mean Square Layer Normalization", eq. 4 differentiated): with ``xh = x * r`` and
    ``gw = dy * w``, ``dx = r * (gw - xh * mean(gw * xh))`` and ``dw = sum(dy * xh)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xh = x.to(torch.float32) * rstd
        g = grad_out.to(torch.float32)
        gw = g * weight.to(torch.float32)
        grad_x = rstd * (gw - xh * (gw * xh).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * xh.to(x.dtype).to(torch.float32)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


class SwiGLUFn(torch.autograd.Function):
    """``silu(gate) * up`` (Shazeer 2020, "GLU Variants Improve Transformer"). Shapes: any, equal.

    Backward with ``s = sigmoid(gate)``: ``d gate = dy * up * s * (1 + gate * (1 - s))`` (what aten's
    ``silu_backward`` computes) and ``d up = dy * silu(gate)``.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        # The same kernels autograd would run (aten's fused silu_backward), with silu(gate)
        # recomputed instead of kept: gradients are identical to the unpatched module's.
        grad_up = grad_out * nn.functional.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


def _norm_forward(module):
    def forward(hidden_states):
        return RMSNormFn.apply(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _mlp_forward(module):
    def forward(x):
        return module.down_proj(SwiGLUFn.apply(module.gate_proj(x), module.up_proj(x)))
    return forward


def lora_forward(module):
    """A peft LoRA linear's forward as ``addmm(base(x), A(dropout(x)), B^T, alpha=scaling)`` per adapter.

    Shapes: x ``(..., in)`` -> ``(..., out)``. Only plain LoRA in the layer's own dtype or under
    autocast takes this path; anything else (merged or disabled adapters, DoRA and other variants,
    a LoRA bias, mixed-adapter batches, float32 adapters on a bf16 input outside autocast) runs
    peft's forward unchanged.
    """
    peft_forward = type(module).forward.__get__(module)

    def forward(x, *args, **kwargs):
        if args or kwargs or module.disable_adapters or module.merged or module.lora_variant:
            return peft_forward(x, *args, **kwargs)
        names = [n for n in module.active_adapters if n in module.lora_A]
        autocast = torch.is_autocast_enabled(x.device.type)
        if any(module.lora_B[n].bias is not None
               or (not autocast and module.lora_A[n].weight.dtype != x.dtype) for n in names):
            return peft_forward(x, *args, **kwargs)
        result = module.base_layer(x)
        for n in names:
            result = _add_lora(module, n, x, result)
        return result
    return forward


def _add_lora(module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result + scaling * B(A(dropout(x)))`` of adapter ``name`` as one ``addmm`` (the scale in its
    epilogue). Shapes: x ``(..., in)``, result ``(..., out)``. Outside autocast the adapter's input is cast
    to its weights' dtype and its output to ``result``'s, as peft does (no-ops where they agree)."""
    dropped, keep_share = dropout_input(module.lora_dropout[name], x)
    if not torch.is_autocast_enabled(x.device.type):
        dropped = dropped.to(module.lora_A[name].weight.dtype)
    a = module.lora_A[name](dropped)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]).to(result.dtype),
                       module.lora_B[name].weight.t().to(result.dtype), alpha=module.scaling[name] / keep_share)
    return flat.view(result.shape)


class MemberSpans:
    """The rows of the batch each of ``adapters`` owns, for :func:`member_rows_forward`: ``counts[i]``
    consecutive batch rows for adapter i, in order; set by the caller before each forward."""

    def __init__(self, adapters: list[str]):
        self.adapters = adapters
        self.counts: list[int] | None = None


def covers_member_rows(module, adapters) -> bool:
    """Whether :func:`member_rows_forward` computes ``module`` (a peft LoRA linear) for ``adapters``: each
    of them a plain LoRA there (not merged, no variant such as DoRA, no LoRA bias)."""
    return (not module.merged and not module.disable_adapters and not module.lora_variant
            and all(a in module.lora_A and module.lora_B[a].bias is None for a in adapters))


def member_rows_forward(module, spans: MemberSpans):
    """A peft LoRA linear's forward over a batch whose rows belong to different adapters (reward-ensemble
    members): the frozen base over every row in one matmul, then each adapter's update on its own rows,
    ``addmm(base(x)[rows_i], A_i(x[rows_i]), B_i^T, alpha=scaling_i)`` (:func:`_add_lora`, as :func:`lora_forward`). As
    peft's mixed-adapter batches (``adapter_names``, which it allows in inference only), with gradients:
    adapter i's weights see only its rows. Shapes: x ``(B, ..., in)`` -> ``(B, ..., out)``, B the sum of
    ``spans.counts``."""

    def forward(x, *args, **kwargs):
        counts = spans.counts
        if counts is None or sum(counts) != x.shape[0] or len(counts) != len(spans.adapters):
            raise RuntimeError(f"member rows {counts} do not cover the batch of {x.shape[0]} rows "
                               f"for {len(spans.adapters)} adapters")
        result = module.base_layer(x, *args, **kwargs)
        parts, at = [], 0
        for name, n in zip(spans.adapters, counts):
            if n:
                parts.append(_add_lora(module, name, x[at:at + n], result[at:at + n]))
            at += n
        return torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else result)
    return forward


def dropout_input(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(x * keep, 1 - p)``: inverted dropout (Srivastava et al. 2014) with the ``1 / (1 - p)`` rescale
    left to the caller, who folds it into the LoRA addmm's ``alpha``. Shapes: x ``(..., in)`` -> same.

    Each element is kept independently with probability ``1 - p``, as ``nn.Dropout`` keeps it, but the
    mask is ``rand >= p`` (one uniform per element, a bool kept for backward) instead of aten's
    ``bernoulli_`` + ``div_`` + a float mask: 0.7 ms against 1.4 ms on 352 x 576 floats on a 2-core
    EPYC, where the SFT adapter's 210 dropouts (p = 0.05) were 14% of a step's profile (README).
    The draws differ from aten's, so a seed gives other masks than peft's, with the same distribution.
    Identity (and ``1.0``) in eval mode, at p = 0, and for any module other than ``nn.Dropout``
    (whose own forward then runs)."""
    if not isinstance(dropout, nn.Dropout):
        return dropout(x), 1.0
    if not dropout.training or dropout.p == 0:
        return x, 1.0
    keep = torch.rand(x.shape, device=x.device) >= dropout.p
    return x * keep, 1.0 - dropout.p


def is_peft_lora_linear(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")


def install(model: nn.Module, lora: bool = True) -> dict[str, int]:
    """Route known RMSNorm and SwiGLU MLP modules (and, with ``lora``, peft's LoRA linears) through the
    lean functions. Returns counts."""
    counts = {"rmsnorm": 0, "swiglu": 0, "lora": 0}
    for module in model.modules():
        if lora and is_peft_lora_linear(module):
            _set(module, lora_forward(module))
            counts["lora"] += 1
            continue
        kind = _lean_kind(module)
        if kind == "rmsnorm":
            _set(module, _norm_forward(module))
            counts["rmsnorm"] += 1
        elif kind == "swiglu":
            _set(module, _mlp_forward(module))
            counts["swiglu"] += 1
    return counts


def uninstall(model: nn.Module) -> int:
    """Give every module :func:`install` routed its own forward back (other instance forwards stay);
    returns how many."""
    n = 0
    for module in model.modules():
        if getattr(vars(module).get("forward"), "lean", False):
            del module.forward
            n += 1
    return n


def _set(module: nn.Module, forward) -> None:
    forward.lean = True
    module.forward = forward


def _lean_kind(module: nn.Module) -> str | None:
    """"rmsnorm" or "swiglu" where a lean function computes exactly what the module does, else None."""
    name = type(module).__name__
    if name in _RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
        return "rmsnorm"
    if name in _MLP_CLASSES and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish"):
        return "swiglu"
    return None


def coverage(model: nn.Module) -> str:
    """One log line: which norm and MLP classes :func:`install` routes through the lean functions and which
    run their own (plain) forward, with counts. Other families' norms differ (Gemma scales by ``1 + w``,
    OLMo 2 multiplies before the cast, GPT-2/NeoX/OPT use LayerNorm and GELU MLPs; Phi-3 fuses gate and up),
    so they stay plain: exact, only without the memory saving."""
    lean: dict[str, int] = {}
    plain: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if _lean_kind(module):
            lean[name] = lean.get(name, 0) + 1
        elif name.endswith(("Norm", "MLP")):
            plain[name] = plain.get(name, 0) + 1

    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"
    return f"lean kernels on {fmt(lean)}; plain path for {fmt(plain)}"
