"""What model FLOPs utilisation (MFU) is computed from: a decoder's FLOPs per token, counted
analytically, and this machine's measured matmul throughput in a compute dtype.

MFU = model FLOPs / (wall seconds x peak FLOP/s), as PaLM reports it (Chowdhery et al. 2022, appendix B)
and nanoGPT estimates it; the peak here is *measured* (a square matmul on the threads the stage uses),
not a datasheet number, so a CPU's MFU compares the workload with what its cores actually do.

FLOP counts (a multiply-add is 2 FLOPs):
- forward, per token: ``2 N + 4 L d T`` for N weights in the decoder's matmuls, L layers, model width d and
  T attended positions (PaLM's ``6N + 12 L H Q T`` training count divided by 3, with H Q = d); the LM head
  adds ``2 d V`` only where logits are made (Kaplan et al. 2020, table 1, count it the same way);
- backward of a LoRA-trained frozen base: the input gradients through every frozen matmul above the lowest
  adapted layer (as much as their forward, ``2 N_above``), both operands' gradients of the attention's two
  products (twice their forward, ``8 L_above d T``: PaLM's ``12 L H Q T`` less the forward's 4; the scores
  and the weighted values have no weights to freeze), plus the adapters' weight and input gradients
  (``4 N_lora``); full fine-tuning would add the frozen weights' gradients (another ``2 N``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from pipeline.models import loading


@dataclass(frozen=True)
class DecoderShape:
    """The numbers the FLOP counts need: decoder matmul weights (embeddings and LM head excluded),
    layers, width and vocabulary."""

    matmul_params: int
    layers: int
    width: int
    vocab: int

    @property
    def params_per_layer(self) -> float:
        return self.matmul_params / max(1, self.layers)


def decoder_shape(model: torch.nn.Module) -> DecoderShape:
    """The shape of a transformers model (before adapters are added): its text config and the count of
    its decoder matmul weights (:func:`count_matmul_params`)."""
    text = loading.text_config(model)
    return DecoderShape(count_matmul_params(model), int(text.num_hidden_layers), int(text.hidden_size),
                        int(text.vocab_size))


def count_matmul_params(model: torch.nn.Module) -> int:
    """Logical weights (:func:`pipeline.models.loading.logical_shape`: a 4-bit weight counts its original
    shape) of every 2-D parameter outside the input embeddings and the output head: the decoder's matmuls."""
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            skip.add(id(module.weight))
    total = 0
    for p in model.parameters():
        if id(p) in skip:
            continue
        shape = loading.logical_shape(p)
        if len(shape) == 2:
            total += shape.numel()
    return total


def forward_flops(shape: DecoderShape, tokens: int, attended: float, logits: int = 0) -> float:
    """FLOPs of a forward over ``tokens`` tokens attending to ``attended`` positions each on average,
    with ``logits`` of them projected to the vocabulary: ``tokens (2 N + 4 L d attended) + logits 2 d V``.

    E.g. N = 1,000, L = 2, d = 8, V = 10; 3 tokens attending to 2 positions, 1 logit row:
    3 (2,000 + 4 x 2 x 8 x 2) + 2 x 8 x 10 = 3 x 2,128 + 160 = 6,544."""
    return tokens * (2.0 * shape.matmul_params + 4.0 * shape.layers * shape.width * attended) \
        + logits * 2.0 * shape.width * shape.vocab


def lora_backward_flops(shape: DecoderShape, tokens: int, attended: float, trained_layers: int,
                        lora_params: int, logits: int = 0) -> float:
    """FLOPs of the backward of a LoRA-trained frozen base: input gradients through the top
    ``trained_layers`` layers (the backward stops below the lowest adapted layer) and the LM head rows,
    and the adapters' own weight and input gradients, ``4 N_lora`` per token. In the attention both
    products' operands are activations that need gradients (queries and keys, probabilities and values),
    so its backward is twice its forward, ``8 L d T``, where the frozen matmuls' is once theirs.

    E.g. the shape above, 1 of 2 layers trained, 10 LoRA weights, 3 tokens attending to 2, 1 logit row:
    3 (2 x 500 + 8 x 1 x 8 x 2) + 2 x 8 x 10 + 4 x 10 x 3 = 3,384 + 160 + 120 = 3,664."""
    per_token = 2.0 * shape.params_per_layer * trained_layers + 8.0 * trained_layers * shape.width * attended
    return tokens * per_token + logits * 2.0 * shape.width * shape.vocab + 4.0 * lora_params * tokens


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: ``flops / (seconds x peak)``; 1.2e12 FLOPs in 10 s at a 0.3 TFLOP/s peak
    is 1.2e12 / 3e12 = 0.4. NaN when the time or the peak is not positive."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        return float("nan")
    return flops / (seconds * peak_flops_per_s)


def probe_matmul(dtype: torch.dtype, size: int = 1024, seconds: float = 0.5,
                 threads: Optional[int] = None, device: torch.device | str = "cpu") -> float:
    """This machine's matmul throughput in FLOP/s: the best of repeated ``size x size`` products in
    ``dtype`` on ``device`` (on CPU, on ``threads`` threads; default: torch's current setting) for about
    ``seconds``. The best, not the mean: the peak is what the hardware can do, and another process only
    ever slows a repeat down. On CUDA each repeat is timed to its completion (kernels run asynchronously)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        b = torch.randn(size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        a @ b  # warm-up: thread pool or kernel selection, page faults
        sync()
        best, end = float("inf"), time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > end:
                break
        return 2.0 * size ** 3 / best
    finally:
        torch.set_num_threads(old)


def cpu_description() -> dict:
    """The CPU's model name and the instruction sets that decide the compute dtype (Linux /proc/cpuinfo;
    empty fields elsewhere)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"cpu": name, "isa": isa}


def generate_flops(shape: DecoderShape, prompt_tokens: list[int], response_tokens: list[int]) -> float:
    """Model FLOPs of sampling: each row's prompt once (prefill, attending to the whole prompt), then
    each generated token as one position attending to the prompt and the new tokens up to it, with its
    logits; padding and the steps after a row stopped are not model work. E.g. prompt 4, response 2:
    forward_flops(4 tokens, 4) + forward_flops(2 tokens, mean of 5 and 6 = 4 + 3/2, 2 logit rows)."""
    total = 0.0
    for p, t in zip(prompt_tokens, response_tokens):
        total += forward_flops(shape, p, p)
        if t:
            total += forward_flops(shape, t, p + (t + 1) / 2, logits=t)
    return total


def sequence_flops(shape: DecoderShape, prompt_tokens: list[int], response_tokens: list[int]) -> float:
    """One forward over whole rows (prompt + response, each position attending to its row's length,
    PaLM's convention) with logits for the response tokens: a reference or old-logprob pass."""
    return sum(forward_flops(shape, p + t, p + t, logits=t) for p, t in zip(prompt_tokens, response_tokens))


def lora_train_flops(shape: DecoderShape, prompt_tokens: list[int], response_tokens: list[int],
                     trained_layers: int, lora_params: int) -> float:
    """One forward and the LoRA backward (:func:`lora_backward_flops`) over whole rows, logits for the
    response tokens: a training pass of PPO or SFT-style losses."""
    return sum(forward_flops(shape, p + t, p + t, logits=t)
               + lora_backward_flops(shape, p + t, p + t, trained_layers, lora_params, logits=t)
               for p, t in zip(prompt_tokens, response_tokens))


def ensemble_train_flops(shape: DecoderShape, pairs: list[tuple[int, int, int]], member_pairs: list[list[int]],
                         split: int, trained_layers: int, lora_params: int) -> float:
    """Model FLOPs of training reward adapters with the trunk shared (:mod:`pipeline.models.ensemble`) on
    preference pairs ``(prompt, chosen, rejected)`` token counts, each pair's prompt run once (prefix
    sharing, as :func:`pair_train_flops`): the forward through the ``split`` layers below the lowest
    adapted one once over every pair, then, per member m, the forward through the rest and the LoRA
    backward (``lora_params`` per member) over only the pairs ``member_pairs[m]`` its bootstrap
    resample holds. One member running every pair costs what :func:`pair_train_flops` counts.

    E.g. the shape of :func:`forward_flops` (2 layers), one pair (2, 1, 3), split 1, 1 trained layer,
    10 LoRA weights: its forward is 13,920 and its backward 8,160 (:func:`pair_train_flops`); the trunk
    runs half the forward once, 6,960, and each member running the pair the other half and the backward,
    6,960 + 8,160 = 15,120. Two members that both run it: 6,960 + 2 x 15,120 = 37,200; one of them only:
    22,080, the single model's count."""
    forward = [forward_flops(shape, p + c + r, p + max(c, r)) for p, c, r in pairs]
    backward = [lora_backward_flops(shape, p + c + r, p + max(c, r), trained_layers, lora_params)
                for p, c, r in pairs]
    top = (shape.layers - split) / shape.layers
    total = sum(forward) * split / shape.layers
    for chosen in member_pairs:
        total += sum(top * forward[i] + backward[i] for i in chosen)
    return total


def trained_extent(model: torch.nn.Module, layers: int) -> tuple[int, int]:
    """(trainable parameters, decoder layers the backward passes through): the backward stops below the
    lowest decoder layer (:func:`pipeline.models.loading.decoder_layers`) holding a trainable parameter;
    heads above the layers (a value or score head) add none."""
    _, stack = loading.decoder_layers(model)
    layer_of = {id(p): i for i, block in enumerate(stack) for p in block.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    lowest = min((layer_of[id(p)] for p in trainable if id(p) in layer_of), default=layers)
    return sum(p.numel() for p in trainable), layers - lowest


# A GPU reaches its matmul peak only on large products: 1024^3 leaves an H100/H200 mostly idle between
# launches, 8192^3 bf16 measured about 790 TFLOP/s on an H200 (near its datasheet's dense figure).
GPU_PROBE_SIZE = 8192


# How long a stage probes the peak its MFU is computed against. The probe keeps the best product, so a
# short one can catch only a slow stretch of a shared VM and read the peak low, which reads MFU high: on
# the 2-core AMD EPYC under the AVX2 caps, six processes in a row read 181.8-203.8 GFLOP/s in 0.5 s and
# 196.5-203.8 in 3 s. The environment variable RLHF_PROBE_SECONDS overrides it (the test suite sets it
# short: its MFU figures are not measurements).
STAGE_PROBE_SECONDS = 3.0


def probe_seconds() -> float:
    """:data:`STAGE_PROBE_SECONDS`, or ``RLHF_PROBE_SECONDS`` where set."""
    raw = os.environ.get("RLHF_PROBE_SECONDS")
    if raw is None:
        return STAGE_PROBE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"RLHF_PROBE_SECONDS must be a positive number of seconds, got {raw!r}")
    return seconds


def measured_peak(dtype: torch.dtype, device: torch.device) -> float:
    """The matmul peak MFU is computed against, measured on this device for :func:`probe_seconds`
    (:func:`probe_matmul`): CPU at the default size, CUDA at :data:`GPU_PROBE_SIZE`; NaN on other
    accelerators (not probed)."""
    if device.type == "cpu":
        return probe_matmul(dtype, seconds=probe_seconds())
    if device.type == "cuda":
        return probe_matmul(dtype, size=GPU_PROBE_SIZE, seconds=probe_seconds(), device=device)
    return float("nan")


def pair_train_flops(shape: DecoderShape, pairs: list[tuple[int, int, int]], trained_layers: int,
                     lora_params: int) -> float:
    """One forward and the LoRA backward of a reward model over preference pairs ``(prompt, chosen,
    rejected)`` token counts, the prompt run once per pair (prefix sharing) and no LM head; each token
    attends to its row's length (the prompt's tokens to the longer side's). E.g. the shape of
    :func:`forward_flops`, 1 of 2 layers trained, 10 LoRA weights, one pair (2, 1, 3):
    6 tokens attending to 5 positions: 6 (2,000 + 4 x 2 x 8 x 5) + 6 (2 x 500 + 8 x 1 x 8 x 5) + 4 x 10 x 6
    = 13,920 + 7,920 + 240 = 22,080."""
    total = 0.0
    for p, c, r in pairs:
        tokens, attended = p + c + r, p + max(c, r)
        total += (forward_flops(shape, tokens, attended)
                  + lora_backward_flops(shape, tokens, attended, trained_layers, lora_params))
    return total


def lm_train_flops_per_token(shape: DecoderShape, attended: float, trained_layers: int, lora_params: int,
                             logit_share: float = 1.0) -> float:
    """FLOPs per token of a LoRA language-model training step (SFT): forward plus LoRA backward, each
    with the LM head on ``logit_share`` of the positions (1: every position, as trl's trainer computes
    logits off its Triton devices; the labelled share with :func:`trainer_utils.compact_lm_head`). E.g.
    the shape of :func:`forward_flops`, 2 layers trained, 10 LoRA weights, 2 attended: (2,000 + 128 +
    160) + (2,000 + 256 + 160 + 40) = 4,744; with logits on half the positions 4,744 - 160 = 4,584."""
    head = 2 * 2.0 * shape.width * shape.vocab  # the projection forward, and its input gradient
    return (forward_flops(shape, 1, attended) + lora_backward_flops(shape, 1, attended, trained_layers, lora_params)
            + logit_share * head)


def lm_train_flops(shape: DecoderShape, given: int, ran: int, attended: float, trained_layers: int,
                   lora_params: int, logit_share: float = 1.0) -> float:
    """Model FLOPs of SFT training on ``given`` tokens of which ``ran`` ran through the decoder (the rest
    were a start rows share, run once: :func:`forwards.shared_row_starts`): the body
    (:func:`lm_train_flops_per_token` without the head) per token run, the LM head on ``logit_share`` of
    the given tokens, whose labels do not change. E.g. the shape of :func:`forward_flops`, 2 layers
    trained, 10 LoRA weights, 2 attended, logits on half: body 4,744 - 320 = 4,424, head 320; 10 tokens
    given, 6 run: 6 x 4,424 + 10 x 0.5 x 320 = 26,544 + 1,600 = 28,144."""
    head = 2 * 2.0 * shape.width * shape.vocab
    body = lm_train_flops_per_token(shape, attended, trained_layers, lora_params, 0.0)
    return ran * body + given * logit_share * head


# What the stages' training loops reached on the embedded model in float32 under AVX2 and in bf16 on AMX
# (README "Speed"): the a-priori estimate a stage prints before it starts assumes this share of the peak.
TYPICAL_MFU = 0.45


def estimate_line(stage: str, what: str, flops: float, peak_flops_per_s: float) -> str:
    """One line printed before a long stage: its model FLOPs, this machine's measured peak and the time
    they imply at :data:`TYPICAL_MFU`. E.g. 1.8e14 FLOPs at 2e11 FLOP/s: 900 s at 100%, 2,000 s at 45%."""
    if not peak_flops_per_s > 0:
        return f"[{stage}] {what}: {flops / 1e12:,.0f} TFLOP of model work (no matmul peak probed on this device)"
    best = flops / peak_flops_per_s
    return (f"[{stage}] {what}: {flops / 1e12:,.1f} TFLOP of model work; at this machine's measured "
            f"{peak_flops_per_s / 1e9:,.0f} GFLOP/s matmul peak that is about {_minutes(best / TYPICAL_MFU)} "
            f"(at the {TYPICAL_MFU:.0%} MFU typical here; {_minutes(best)} at 100%)")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
