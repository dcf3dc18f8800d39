"""Glue for the stages that train through trl (SFT) or next to it (the reward stage's own loop)."""
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


class ReleaseMemory(TrainerCallback):
    """Hand the step's freed activations back to the OS after every optimizer step (glibc malloc_trim,
    as PPO does): the full default SFT run peaked at 2.67 GB without it, a 6-step one at 2.23 GB."""

    def on_step_end(self, args, state, control, **kwargs):
        from pipeline.models import release_free_memory

        release_free_memory()


def restore_fp32_trainables(model: torch.nn.Module) -> int:
    """Undo trl's bf16 cast of trainable parameters on a quantized model: LoRA weights and the score
    head stay float32 masters whatever the compute dtype. Returns parameters restored.

    trl 1.16 (SFTTrainer ``__init__``; its RewardTrainer too) casts every trainable parameter of a
    quantized model to bf16, following the QLoRA paper's GPU recipe. In float32 compute this broke
    the reward score head ("expected m1 and m2 to have the same dtype") and slowed LoRA down. In bf16
    compute the trainer autocasts every matmul anyway, and bf16 masters would lose updates: an Adam
    step of lr 1e-4 on a LoRA weight of magnitude ~0.04 is 0.25% of it, below bf16's 0.4% resolution.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def trainer_precision_kwargs(device: torch.device, compute_dtype: torch.dtype) -> dict:
    return {"use_cpu": device.type == "cpu", "bf16": compute_dtype == torch.bfloat16,
            "fp16": compute_dtype == torch.float16}
