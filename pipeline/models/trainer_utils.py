"""Glue for the stages that train through trl (SFT) or next to it (the reward stage's own loop)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.artifacts.outputs import MetricsLogger
from pipeline.rl import ppo_math


class JsonlMetrics(TrainerCallback):
    """Mirror the trainer's logs into our flat, namespaced JSONL (``sft/loss``, ``reward/accuracy``...)."""

    def __init__(self, logger: MetricsLogger, namespace: str):
        self.logger = logger
        self.namespace = namespace
        self.start = time.time()
        # Set by the stage once it knows them: model FLOPs per trained token and the machine's peak FLOP/s;
        # each row then carries the window's tokens/s and MFU (perf/*).
        self.flops_per_token = 0.0
        self.peak = float("nan")
        # Where model FLOPs are not tokens x flops_per_token (SFT runs the start its rows share once), a
        # callable giving this process's FLOPs so far.
        self.flops_so_far = None
        self._last: tuple[float, int, float] | None = None

    def _flops(self, seen: int) -> float:
        return self.flops_so_far() if self.flops_so_far is not None else seen * self.flops_per_token

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The end-of-training summary (train_loss...) covers only the steps since a resume; the stage logs
        # its own summary.
        if not logs or "train_loss" in logs:
            return
        row = {"step": state.global_step, "time/elapsed": round(time.time() - self.start, 2)}
        for k, v in logs.items():
            # trl's num_tokens restarts at 0 on resume; the Trainer's num_input_tokens_seen is restored.
            if isinstance(v, (int, float)) and k not in ("num_tokens", "eval_num_tokens"):
                key = k[len("eval_"):] if k.startswith("eval_") else k
                row[f"{self.namespace}/{'eval_' if k.startswith('eval_') else ''}{key}"] = v
        seen, now = state.num_input_tokens_seen, time.time()
        if self.flops_per_token and self._last is not None and seen > self._last[1] and "loss" in logs:
            tokens, seconds = seen - self._last[1], now - self._last[0]
            row["perf/tokens_per_s"] = tokens / max(seconds, 1e-9)
            row["perf/mfu"] = (self._flops(seen) - self._last[2]) / max(seconds, 1e-9) / self.peak
        if "loss" in logs:
            self._last = (now, seen, self._flops(seen))
        self.logger.log(row, step=state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.time(), state.num_input_tokens_seen, self._flops(state.num_input_tokens_seen))


class ResumableCheckpoints(TrainerCallback):
    """Make the Trainer's checkpoints ours: each ``output_dir/checkpoint-N`` it finished writing moves into
    ``checkpoints`` in one rename (so only complete ones are there, the newest ``keep`` kept), without
    ``training_args.bin`` (a pickle of the arguments that nothing reads back). Loss windows end at every
    save, so a resumed run logs the same rows as an uninterrupted one. A SIGINT/SIGTERM inside
    ``guard.graceful_stop`` makes the Trainer save the step it finished and stop."""

    def __init__(self, checkpoints):
        self.checkpoints = checkpoints

    def on_step_end(self, args, state, control, **kwargs):
        from pipeline.artifacts import guard

        guard.failpoint(f"sft:step:{state.global_step}")
        if guard.stop_requested() and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
        if control.should_save:  # runs after the Trainer's DefaultFlowCallback has set it
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (folder / "training_args.bin").unlink(missing_ok=True)
        self.checkpoints.install(folder, state.global_step)


def train_loss(log_history: list[dict]) -> float:
    """Mean training loss over every step, from the Trainer's logged windows (each ``loss`` is the mean
    over the steps since the previous log). The Trainer's own ``training_loss`` covers only the steps
    since a resume. Windows 2 steps at 1.0 then 1 step at 4.0: (2 * 1.0 + 1 * 4.0) / 3 = 2.0."""
    total, last = 0.0, 0
    for row in log_history:
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - last)
            last = row["step"]
    return total / last if last else float("nan")


class ReleaseMemory(TrainerCallback):
    """Hand freed activations back to the OS after an optimizer step once the process has grown by
    :data:`loading.STEP_TRIM_MARGIN_MB` since the last time (:class:`loading.HeapTrim`; PPO and the reward
    stage trim after every step): the full default SFT run peaked at 2.67 GB without any trim, a 6-step
    one at 2.23 GB."""

    def __init__(self):
        from pipeline.models import loading

        self.trim = loading.HeapTrim(loading.STEP_TRIM_MARGIN_MB)

    def on_step_end(self, args, state, control, **kwargs):
        self.trim()


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


# trl's fused LM head (trl.trainer.utils.add_fused_lm_head, which SFTTrainer installs) projects only the
# positions that carry a label onto the vocabulary where its Triton kernels run (CUDA, XPU), and every
# position elsewhere, so that compilers see fixed tile shapes. Eager CPU has no such constraint, and with
# the loss on assistant turns most positions are prompt: their 49k-way projections were thrown away.
COMPACT_LM_HEAD = True
# On CPU, those positions' log-probabilities from ppo_math.head_token_stats (the PPO stage's head) instead of
# trl's chunked function: trl makes each 32,768-column tile of logits twice (forward, and again in
# backward) and a third matmul for the gradient, out of cache; ours makes 2,048-column blocks once and
# folds the gradient's matmul into the forward. The head's forward+backward on one SFT micro-batch's 133
# labelled rows: 0.50x trl's time (README "Speed on CPUs without AMX").
BLOCKED_LM_HEAD = True


class _BlockedHeadLogProb:
    """Stands in for trl's ``ChunkedLogProbFunction`` (same ``apply`` arguments and 5 outputs) where
    :func:`ppo_math.head_token_stats` computes what trl asks for: a frozen bias-free head without soft-capping
    or scale on CPU, outputs among log-probs, entropy (no gradient: trl's trainer logs it detached) and
    top-1. Anything else goes to trl's function unchanged."""

    trl_function = None  # trl's own, set by compact_lm_head

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if (hidden.device.type != "cpu" or bias is not None or softcap is not None or logit_scale != 1.0
                or weight.requires_grad or not set(outputs) <= {"log_probs", "entropy", "is_top1"}):
            return cls.trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                          logit_scale, outputs)
        # trl's function computes in the autocast dtype when autocast is on (bf16 training); so do we
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        with torch.autocast("cpu", enabled=False):
            logprobs, entropy, top1 = ppo_math.head_token_stats(
                (hidden / temperature).to(dtype).unsqueeze(0), weight.to(dtype), targets.unsqueeze(0),
                "entropy" in outputs, "is_top1" in outputs)
        return (logprobs[0], None if entropy is None else entropy[0], None, None, None if top1 is None else top1[0])


@contextlib.contextmanager
def compact_lm_head():
    """Within the block, trl's fused LM head scores only the labelled positions on CPU too: the same
    log-probs, loss, entropy and accuracy (positions without a label count zero either way), with the
    head's matmuls over those rows alone, in vocabulary blocks (:data:`BLOCKED_LM_HEAD`). A no-op when trl
    no longer decides this where we patch it."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    function = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if not COMPACT_LM_HEAD or decide is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or decide(device)
    if BLOCKED_LM_HEAD and function is not None:
        _BlockedHeadLogProb.trl_function = function
        trl_utils._ChunkedLogProbFunction = _BlockedHeadLogProb
    try:
        yield
    finally:
        trl_utils._use_triton = decide
        if function is not None:
            trl_utils._ChunkedLogProbFunction = function


def logit_share(dataset, device: torch.device) -> float:
    """The share of a trl-tokenized ``dataset``'s tokens whose logits SFT computes: those that carry a
    label (``assistant_masks`` with assistant-only loss, ``completion_mask`` with completion-only loss)
    where the LM head is compact (:func:`compact_lm_head` on CPU; trl's own on CUDA and XPU), else all.
    E.g. rows of 4 and 6 tokens with 1 and 3 labelled: 4 / 10 = 0.4."""
    if not (device.type in ("cuda", "xpu") or (device.type == "cpu" and COMPACT_LM_HEAD)):
        return 1.0
    total = sum(len(x) for x in dataset["input_ids"])
    for key in ("assistant_masks", "completion_mask"):
        if key in dataset.column_names:
            return sum(sum(m) for m in dataset[key]) / max(total, 1)
    return 1.0
