"""Linear layers over a handful of rows (a decode step), in the GEMM orientation that uses every core.

A decode step multiplies each weight ``W`` (out x in) by the few rows ``x`` (rows x in) being sampled.
Written as ``x @ W^T`` (what ``F.linear`` calls), MKL's float32 GEMM splits the work over the output's
rows, so at 8 rows it runs on one thread; written as ``(W @ x^T)^T`` the long dimension comes first and
the GEMM splits over it. On a 2-core AMD EPYC under the AVX2 caps, float32, 8 rows, per matrix (best of
3 passes over 150 distinct matrices, two sessions):

=========================  =============  ============  =========
weight (out x in)          ``F.linear``   transposed    ratio
=========================  =============  ============  =========
LM head 49152 x 576        15.9-19.7 ms   7.0-9.4 ms    0.44-0.49
gate / up 1536 x 576       345-377 us     233-281 us    0.67-0.77
q / o 576 x 576            135-172 us     88-122 us     0.65-0.80
down 576 x 1536            290-315 us     364-457 us    1.23-1.45
=========================  =============  ============  =========

Wide weights (down) keep ``F.linear``. A whole decode step of the embedded model from merged weights
(``python benchmarks/decode_bound.py --orientation --rows 8,16,32``, paired): 0.878 ± 0.022 of
``F.linear``'s time at 8 rows, 0.943 ± 0.010 at 16, 0.953 ± 0.010 at 32.
At 128 rows the two are within noise of each other, and in bfloat16 (oneDNN, not MKL) the transposed
form was 1.0-1.3x slower, so the path is float32 on CPU, at most :data:`MAX_ROWS` rows, weights at
least as tall as wide. The two orientations sum the same products in another order: outputs agree to
float32 round-off (tested), not bit for bit, which is why only inference (sampling from merged weights)
uses it.
"""
from __future__ import annotations

from typing import Optional

import torch

# Up to this many rows (tokens) per call the transposed GEMM is used; a decode step of the default PPO
# (32 rows, fewer as rows finish) and of the bench (8) fall under it, a prefill or a training pass does not.
MAX_ROWS = 32


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the transposed path for input ``x`` (..., in) and ``weight`` (out, in)."""
    return (weight.dtype == torch.float32 and x.device.type == "cpu" and weight.shape[0] >= weight.shape[1]
            and x.numel() <= MAX_ROWS * weight.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in), bias (out,) -> (..., out), computed as
    ``(weight @ x^T)^T`` where :func:`applies` (a contiguous result either way)."""
    if not applies(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])
