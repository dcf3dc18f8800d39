"""Stage 1: supervised fine-tuning of a LoRA adapter on the 4-bit base (QLoRA), with trl's SFTTrainer."""
from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.artifacts import guard
from pipeline.artifacts.checkpoints import (
    TRAINER_STATE,
    StageWork,
    check_trainer_checkpoint,
)
from pipeline.artifacts.outputs import (
    MetricsLogger,
    write_jsonl,
    write_manifest,
    write_text_atomic,
)
from pipeline.config import PipelineConfig, to_dict
from pipeline.data import batching, lengths, loaders
from pipeline.evaluation.stats import mean_se
from pipeline.models import forwards, lean_ops, loading, stacking, throughput
from pipeline.models.trainer_utils import (
    JsonlMetrics,
    ReleaseMemory,
    ResumableCheckpoints,
    compact_lm_head,
    logit_share,
    restore_fp32_trainables,
    train_loss,
    trainer_precision_kwargs,
)
from pipeline.rl import rollout


def _to_trainer_rows(rows: list[dict], assistant_masks: bool) -> list[dict]:
    """Chat rows for trl: whole conversations when the template marks assistant turns, otherwise
    prompt/completion split at the last assistant turn (loss on the completion only)."""
    if assistant_masks:
        return rows
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


GOLD_SAMPLES = "gold_samples.jsonl"


def gold_samples(model, tok, prompts: list[list[dict]], per_prompt: int, max_new_tokens: int, temperature: float,
                 seed: int, batch_size: int, max_prompt_length: int = 512) -> list[dict]:
    """``per_prompt`` sampled responses per prompt with their gold (VADER sentiment) score: the default
    task's quality signal. Rows ``{"prompt", "response", "gold"}``."""
    from pipeline.rl.rollout import sample_texts
    from reward.registry import build_reward

    torch.manual_seed(seed)
    jobs = [p for p in prompts for _ in range(per_prompt)]
    was_training = model.training
    model.eval()
    try:
        # Dense weights with the adapter merged in: sampling 2x faster on CPU (README), freed on exit.
        with stacking.merged_linear_weights(model):
            texts = sample_texts(model, tok, jobs, max_new_tokens, temperature, batch_size=batch_size,
                                 max_prompt_length=max_prompt_length, progress="gold eval")
    finally:
        model.train(was_training)
    prompt_texts = [p[-1]["content"] for p in jobs]
    scores = build_reward("sentiment")(prompt_texts, texts).total
    return [{"prompt": p, "response": t, "gold": float(g)} for p, t, g in zip(prompt_texts, texts, scores)]


def _fit_lengths(trainer, split: str, report: loaders.LoadReport, cfg: PipelineConfig) -> lengths.LengthReport:
    """Fit the trainer's tokenized ``split`` rows to sft.max_length by data.long_rows (trl got them whole:
    its own truncation keeps a row's start and so cuts the response), then pack them when padding-free."""
    attr = f"{split}_dataset"
    ds, rep = lengths.fit_token_rows(getattr(trainer, attr), cfg.sft.max_length, cfg.data.long_rows,
                                     f"SFT {split} rows", "sft.max_length", report.row_name)
    if cfg.sft.padding_free:
        from trl.data_utils import pack_dataset

        ds = pack_dataset(ds, cfg.sft.max_length, "bfd")
    setattr(trainer, attr, ds)
    print(f"[sft] {rep.summary()}", flush=True)
    return rep


def build_trainer(cfg: PipelineConfig, model, tok, train_rows: list[dict], eval_rows: list[dict],
                  reports: tuple[loaders.LoadReport, Optional[loaders.LoadReport]], output_dir: Path, peft_config,
                  callbacks: list, save_steps: int = 0, dtype: Optional[torch.dtype] = None):
    """trl's SFTTrainer on ``model`` as the SFT stage configures it (``cfg.sft``): chat rows with the loss
    on assistant turns, rows fitted to sft.max_length by data.long_rows, trainer checkpoints every
    ``save_steps`` (0 = none), mixed precision by ``dtype`` (default: the configured compute dtype).
    ``peft_config`` None trains every parameter (benchmarks/forgetting_demo.py).
    Returns ``(trainer, {"train": LengthReport, "eval": LengthReport})`` ("eval" with eval rows only)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sc = cfg.sft
    device = next(model.parameters()).device
    dtype = dtype or loading.compute_dtype(cfg.model, device)
    assistant_masks = "{% generation %}" in (tok.chat_template or "")
    train_ds = Dataset.from_list(_to_trainer_rows(train_rows, assistant_masks))
    eval_ds = Dataset.from_list(_to_trainer_rows(eval_rows, assistant_masks)) if eval_rows else None
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=sc.batch_size,
        per_device_eval_batch_size=sc.batch_size, gradient_accumulation_steps=sc.grad_accum,
        learning_rate=sc.learning_rate, num_train_epochs=sc.epochs, max_steps=sc.max_steps,
        lr_scheduler_type=sc.lr_scheduler, warmup_steps=sc.warmup_ratio, weight_decay=sc.weight_decay,
        logging_steps=sc.logging_steps, eval_strategy="no", report_to=[], **saving,
        # No length limit or packing in trl: _fit_lengths applies data.long_rows, then packs (best-fit decreasing).
        max_length=None, assistant_only_loss=assistant_masks, padding_free=sc.padding_free, packing=False,
        gradient_checkpointing=sc.gradient_checkpointing, seed=sc.seed, data_seed=sc.seed,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        # PeftModel.forward hides `labels` behind **kwargs, so the Trainer cannot infer it.
        label_names=["labels"],
        **trainer_precision_kwargs(device, dtype))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    restore_fp32_trainables(trainer.model)
    fitted = {"train": _fit_lengths(trainer, "train", reports[0], cfg)}
    if eval_ds is not None:
        fitted["eval"] = _fit_lengths(trainer, "eval", reports[1], cfg)
    if sc.group_by_length and not sc.padding_free:
        # Each optimizer step's rows drawn from a window of similar lengths (pipeline/data/batching.py), in
        # an order fixed by the seed and the epoch the trainer's state is in: a resumed run reads the same.
        row_lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        trainer._get_train_sampler = lambda _dataset=None: batching.GroupedSampler(
            row_lengths, sc.batch_size * sc.grad_accum, sc.seed, lambda: int(trainer.state.epoch or 0))
    return trainer, fitted


def training_flops(cfg: PipelineConfig, trainer, shape) -> tuple[Callable[[int, int], float], float]:
    """``(work, peak)``: ``work(given, ran)`` the model FLOPs of training on ``given`` tokens of which
    ``ran`` ran through the decoder (:func:`throughput.lm_train_flops`: LoRA training with logits where
    they are computed, :func:`trainer_utils.logit_share`; each token attending to the mean row length),
    and this machine's measured peak FLOP/s. Prints the a-priori duration of training first
    (:func:`pipeline.models.throughput.estimate_line`), with the start every row shares run once per
    micro-batch (:func:`forwards.shared_row_starts`)."""
    rows = trainer.train_dataset["input_ids"]
    lengths = [len(x) for x in rows]
    mean_length = sum(lengths) / max(len(lengths), 1)
    lora_params, trained_layers = throughput.trained_extent(trainer.model, shape.layers)
    device = next(trainer.model.parameters()).device
    work = functools.partial(throughput.lm_train_flops, shape, attended=mean_length, trained_layers=trained_layers,
                             lora_params=lora_params, logit_share=logit_share(trainer.train_dataset, device))
    peak = throughput.measured_peak(loading.compute_dtype(cfg.model, device), device)
    tokens = sum(lengths) * cfg.sft.epochs if cfg.sft.max_steps <= 0 else (
        mean_length * cfg.sft.max_steps * cfg.sft.batch_size * cfg.sft.grad_accum)
    b = 1 if cfg.sft.padding_free else cfg.sft.batch_size
    start = forwards.common_prefix(rows, min(lengths) - 1) if rows and forwards.shares_row_starts(b) else 0
    ran = tokens * (1 - (b - 1) / b * start / max(mean_length, 1))
    print(throughput.estimate_line("sft", f"training on {tokens:,.0f} tokens", work(tokens, ran), peak), flush=True)
    return work, peak


def eval_loss(trainer, max_length: int) -> float:
    """Mean token loss on the trainer's eval split (the SFT eval rows)."""
    with compact_lm_head():
        result = trainer.evaluate()
    if "eval_loss" not in result:
        raise loaders.DataError(f"the SFT eval split has no assistant tokens left within sft.max_length={max_length}; "
                             "raise sft.max_length or check data.sft_eval")
    return result["eval_loss"]


def fit_gold_prompts(tok, eval_rows: list[dict], eval_report: Optional[loaders.LoadReport],
                     cfg: PipelineConfig) -> tuple[list[list[dict]], lengths.LengthReport]:
    """The prompts of the first sft.gold_eval_prompts eval conversations, fitted to ppo.max_prompt_length
    by data.long_rows, as PPO will sample them: ``(prompts, LengthReport)``."""
    kept, _, report = rollout.fit_prompts(
        tok, [{"prompt": r["messages"][:-1]} for r in eval_rows[:cfg.sft.gold_eval_prompts]], eval_report,
        cfg.ppo.max_prompt_length, cfg.data.long_rows, "SFT gold-check prompts")
    if report.over:
        print(f"[sft] {report.summary()}", flush=True)
    return [r["prompt"] for r in kept], report


def sft_gold_samples(model, tok, prompts: list[list[dict]], cfg: PipelineConfig) -> list[dict]:
    """:func:`gold_samples` of ``model`` on ``prompts`` with the SFT stage's settings (sft.gold_*,
    ppo.temperature, ppo.max_prompt_length)."""
    sc = cfg.sft
    return gold_samples(model, tok, prompts, sc.gold_samples_per_prompt, sc.gold_max_new_tokens, cfg.ppo.temperature,
                        sc.seed, sc.gold_batch_size, cfg.ppo.max_prompt_length)


def evaluate_before(trainer, tok, eval_prompts: list[list[dict]], cfg: PipelineConfig, has_eval: bool) -> dict:
    """Eval loss (with eval rows) and gold of the base's samples before training: ``{"metrics": {...},
    "samples": [rows tagged "base"]}``."""
    before: dict = {"metrics": {}, "samples": []}
    if has_eval:
        before["metrics"]["eval_loss_before"] = eval_loss(trainer, cfg.sft.max_length)
    if eval_prompts:
        # The base model: the SFT adapter is a no-op before training (LoRA B starts at zero).
        rows = sft_gold_samples(trainer.model, tok, eval_prompts, cfg)
        before["samples"] = [{"model": "base", **r} for r in rows]
        before["metrics"]["gold_before"], before["metrics"]["gold_before_se"] = mean_se([r["gold"] for r in rows])
    return before


def evaluate_after(trainer, tok, eval_prompts: list[list[dict]], cfg: PipelineConfig,
                   has_eval: bool) -> tuple[dict, list[dict]]:
    """Eval loss (with eval rows) and gold of the trained policy's samples: ``(metrics, samples tagged
    "sft")``."""
    metrics: dict = {}
    if has_eval:
        metrics["eval_loss_after"] = eval_loss(trainer, cfg.sft.max_length)
    rows: list[dict] = []
    if eval_prompts:
        rows = sft_gold_samples(trainer.model, tok, eval_prompts, cfg)
        metrics["gold_after"], metrics["gold_after_se"] = mean_se([r["gold"] for r in rows])
        metrics["gold_samples"] = len(rows)
    return metrics, [{"model": "sft", **r} for r in rows]


def print_summary(metrics: dict, n_prompts: int, out: Path) -> None:
    """The stage's closing lines: time, output folder, eval loss and gold before and after."""
    print(f"[sft] done in {metrics['wall_seconds']}s -> {out}", flush=True)
    for k in ("eval_loss_before", "eval_loss_after"):
        if k in metrics:
            print(f"[sft] {k}: {metrics[k]:.4f}", flush=True)
    if "gold_after" in metrics:
        print(f"[sft] gold on {metrics['gold_samples']} samples of {n_prompts} eval prompts: base "
              f"{metrics['gold_before']:.3f} ± {metrics['gold_before_se']:.3f} -> SFT {metrics['gold_after']:.3f} ± "
              f"{metrics['gold_after_se']:.3f}", flush=True)


def run_sft(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Fine-tune a LoRA adapter on ``data.sft_train`` into ``RUN/sft`` (resumable from RUN/sft.work with
    ``resume``); returns ``RUN/sft``."""
    sc = cfg.sft
    # 0. where we write: RUN/sft.work (a checkpoint every sft.save_steps), renamed to RUN/sft at the end
    stage = StageWork(run_dir, "sft", keep=sc.keep_checkpoints, complete=(TRAINER_STATE,))
    ckpt = stage.start(overwrite, resume, config=to_dict(cfg))
    if stage.finished:
        return stage.publish()
    out, work = stage.out, stage.work
    resumed_at = None
    if ckpt is not None:
        # transformers reads optimizer/scheduler/RNG files with torch.load(weights_only=True); refuse
        # a file it would refuse, or a damaged one, by name, before any model loads.
        resumed_at = check_trainer_checkpoint(ckpt)
        shutil.rmtree(work / "trainer", ignore_errors=True)  # a checkpoint the killed run was writing
    t0 = time.time()

    # 1. data
    dkw = loaders.loader_options(cfg.data)
    train_rows, train_report = loaders.load_sft(cfg.data.sft_train, **dkw)
    eval_rows, eval_report = loaders.load_sft(cfg.data.sft_eval, **dkw) if cfg.data.sft_eval else ([], None)
    for rep in (train_report, eval_report):
        if rep is not None:
            print(f"[sft] {rep.summary()}", flush=True)

    # 2. model: NF4 base (guarded against the bf16 repack) + a fresh LoRA adapter
    model, tok, base = loading.load_base(cfg.model)
    shape = throughput.decoder_shape(model)  # before the adapter: LoRA matrices are not the model's
    logger = MetricsLogger(work / "metrics.jsonl", work / "tensorboard" if sc.tensorboard else None,
                           resume_step=resumed_at)
    trainer, fitted = build_trainer(
        cfg, model, tok, train_rows, eval_rows, (train_report, eval_report), work / "trainer",
        loading.lora_config(sc.lora, model=model),
        [metrics_cb := JsonlMetrics(logger, "sft"), ReleaseMemory(), ResumableCheckpoints(stage.checkpoints)],
        sc.save_steps)
    eval_prompts, fitted["gold_prompts"] = fit_gold_prompts(tok, eval_rows, eval_report, cfg)
    trainable, total = loading.count_parameters(trainer.model)
    print(f"[sft] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)", flush=True)
    flops_of, metrics_cb.peak = training_flops(cfg, trainer, shape)
    metrics_cb.flops_per_token = flops_of(1, 1)

    # 3. evaluate before training; kept in the work folder, where a resumed run reads it back
    metrics: dict = {"trainable_params": trainable, "total_params": total,
                     **{k: v for split, rep in fitted.items() for k, v in rep.metrics(split).items()}}
    before_path = work / "before.json"
    if ckpt is not None and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = evaluate_before(trainer, tok, eval_prompts, cfg, "eval" in fitted)
        write_text_atomic(before_path, json.dumps(before))
    metrics.update(before["metrics"])

    # 4. train (from the checkpoint when resuming: adapter, optimizer, scheduler, RNG, data position)
    t_train = time.time()
    # The trainer autocasts each step itself. An autocast around all of train() would be wrong: its
    # cache of bf16 weight copies would outlive the step, and from the second step on the LoRA A
    # weights got no gradient (a test caught it: layer-0 A unchanged after training).
    guard.graceful_stop(True)  # SIGINT/SIGTERM from here on: the Trainer saves the step it finished and stops
    # The lean kernels for training only (-7% time, README "Speed on CPUs without AMX"): the evaluations
    # before and after run the model's own forwards, as a plain reload of the saved adapter would.
    # The start every row of a micro-batch of 8 or more shares (the system prompt) runs once for the rows
    # (README "Speed on CPUs without AMX", "SFT rows share their start").
    lean_ops.install(trainer.model)
    try:
        with compact_lm_head(), forwards.shared_row_starts(trainer.model) as starts:
            metrics_cb.flops_so_far = lambda: flops_of(starts.given, starts.ran)
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    finally:
        lean_ops.uninstall(trainer.model)
    metrics_cb.flops_so_far = None
    guard.graceful_stop(False)
    if guard.stop_requested() and trainer.state.global_step < trainer.state.max_steps:
        raise guard.StopRequested(guard.stop_requested(), f"after step {trainer.state.global_step}")
    metrics["train_seconds"] = round(time.time() - t_train, 1)
    metrics["train_loss"] = train_loss(trainer.state.log_history)
    # Non-padding tokens (include_num_input_tokens_seen="non_padding"), so padding-free runs compare fairly.
    metrics["train_tokens"] = int(trainer.state.num_input_tokens_seen)
    metrics["train_tokens_per_second"] = round(metrics["train_tokens"] / max(metrics["train_seconds"], 1e-9), 1)
    # MFU over this process's tokens, as train_seconds is its time (a resumed run's train_tokens count the
    # earlier ones too); not recorded, so that a resumed run's metrics equal an uninterrupted one's.
    if starts.given > starts.ran:
        print(f"[sft] the start rows share ran once per micro-batch: {starts.ran:,} of {starts.given:,} tokens run "
              f"through the model ({starts.ran / starts.given:.0%})", flush=True)
    metrics["train_mfu"] = throughput.mfu(flops_of(starts.given, starts.ran), metrics["train_seconds"], metrics_cb.peak)
    metrics["peak_flops_per_s"] = metrics_cb.peak

    # 5. evaluate after training
    after, sft_samples = evaluate_after(trainer, tok, eval_prompts, cfg, "eval" in fitted)
    metrics.update(after)
    if eval_prompts:
        # Kept for the reward stage: its correlation with gold on what the SFT policy writes.
        write_jsonl(work / GOLD_SAMPLES, before["samples"] + sft_samples)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    logger.log({"step": trainer.state.global_step, **{f"sft/{k}": v for k, v in metrics.items()
                                                      if isinstance(v, (int, float))}})
    logger.close()

    # 6. save: adapter (safetensors) + tokenizer + config + manifest (last), then RUN/sft.work -> RUN/sft
    trainer.model.save_pretrained(work)
    tok.save_pretrained(work)
    shutil.rmtree(work / "trainer", ignore_errors=True)
    before_path.unlink()
    write_manifest(work, "sft", cfg, base, metrics,
                   data={"train": loaders.manifest_entry(cfg.data.sft_train, train_report, cfg.data.split,
                                                      fitted["train"]),
                         "eval": loaders.manifest_entry(cfg.data.sft_eval, eval_report, cfg.data.split, fitted["eval"])
                         if eval_report else {"source": cfg.data.sft_eval}})
    stage.publish()
    print_summary(metrics, len(eval_prompts), out)
    return out
