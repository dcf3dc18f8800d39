"""Glue shared by the two stages that run on trl trainers (SFT and reward)."""
from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from pipeline.artifacts import MetricsLogger


class JsonlMetrics(TrainerCallback):
    """Mirror the trainer's logs into our flat, namespaced JSONL (``sft/loss``, ``reward/accuracy``...)."""

    def __init__(self, logger: MetricsLogger, namespace: str):
        self.logger = logger
        self.namespace = namespace
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        row = {"step": state.global_step, "time/elapsed": round(time.time() - self.start, 2)}
        for k, v in logs.items():
            if isinstance(v, (int, float)):
                key = k[len("eval_"):] if k.startswith("eval_") else k
                row[f"{self.namespace}/{'eval_' if k.startswith('eval_') else ''}{key}"] = v
        self.logger.log(row, step=state.global_step)


def restore_fp32_trainables(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Undo trl's bf16 cast of trainable parameters on a quantized model when computing in float32.

    trl 1.16 (SFTTrainer and RewardTrainer ``__init__``) casts every trainable parameter of a
    quantized model to bf16, following the QLoRA paper's GPU recipe. On CPU with float32 compute this
    breaks the reward score head ("expected m1 and m2 to have the same dtype") and slows LoRA down, so
    the adapters go back to float32 before the optimizer is built. Returns parameters restored.
    """
    if compute_dtype != torch.float32:
        return 0
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def trainer_precision_kwargs(device: torch.device, compute_dtype: torch.dtype) -> dict:
    return {"use_cpu": device.type == "cpu", "bf16": compute_dtype == torch.bfloat16,
            "fp16": compute_dtype == torch.float16}
