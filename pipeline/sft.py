"""Stage 1: supervised fine-tuning of a LoRA adapter on the 4-bit base (QLoRA), with trl's SFTTrainer."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from pipeline import data, models
from pipeline.artifacts import ArtifactError, MetricsLogger, atomic_output, is_complete, write_manifest
from pipeline.config import PipelineConfig
from pipeline.trainer_utils import JsonlMetrics, restore_fp32_trainables, trainer_precision_kwargs


def _to_trainer_rows(rows: list[dict], assistant_masks: bool) -> list[dict]:
    """Chat rows for trl: whole conversations when the template marks assistant turns, otherwise
    prompt/completion split at the last assistant turn (loss on the completion only)."""
    if assistant_masks:
        return rows
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def gold_mean(model, tok, prompts: list[list[dict]], max_new_tokens: int, temperature: float, seed: int) -> float:
    """Mean gold (VADER sentiment) score of sampled responses: the default task's quality signal."""
    from pipeline.rollout import sample_texts
    from reward.registry import build_reward

    torch.manual_seed(seed)
    texts = sample_texts(model, tok, prompts, max_new_tokens, temperature, progress="gold eval")
    prompt_texts = [p[-1]["content"] for p in prompts]
    scores = build_reward("sentiment")(prompt_texts, texts).total
    return float(sum(scores) / len(scores))


def _eval_loss(trainer, max_length: int) -> float:
    result = trainer.evaluate()
    if "eval_loss" not in result:
        raise data.DataError(f"the SFT eval split has no assistant tokens left within sft.max_length={max_length}; "
                             "raise sft.max_length or check data.sft_eval")
    return result["eval_loss"]


def run_sft(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(run_dir) / "sft"
    if is_complete(out) and not overwrite:
        raise ArtifactError(f"{out} already holds a complete SFT output; pass --overwrite to replace it")
    sc = cfg.sft
    t0 = time.time()

    # 1. data
    dkw = data.loader_options(cfg.data)
    train_rows, train_report = data.load_sft(cfg.data.sft_train, **dkw)
    eval_rows, eval_report = data.load_sft(cfg.data.sft_eval, **dkw) if cfg.data.sft_eval else ([], None)
    for rep in (train_report, eval_report):
        if rep is not None:
            print(f"[sft] {rep.summary()}", flush=True)

    # 2. model: NF4 base (guarded against the bf16 repack) + a fresh LoRA adapter
    model, tok, base = models.load_base(cfg.model)
    device = next(model.parameters()).device
    dtype = models.compute_dtype(cfg.model, device)
    assistant_masks = "{% generation %}" in (tok.chat_template or "")
    train_ds = Dataset.from_list(_to_trainer_rows(train_rows, assistant_masks))
    eval_ds = Dataset.from_list(_to_trainer_rows(eval_rows, assistant_masks)) if eval_rows else None

    with atomic_output(out, overwrite=overwrite) as tmp:
        logger = MetricsLogger(tmp / "metrics.jsonl", tmp / "tensorboard" if sc.tensorboard else None)
        args = SFTConfig(
            output_dir=str(tmp / "trainer"), per_device_train_batch_size=sc.batch_size,
            per_device_eval_batch_size=sc.batch_size, gradient_accumulation_steps=sc.grad_accum,
            learning_rate=sc.learning_rate, num_train_epochs=sc.epochs, max_steps=sc.max_steps,
            lr_scheduler_type=sc.lr_scheduler, warmup_steps=sc.warmup_ratio, weight_decay=sc.weight_decay,
            logging_steps=sc.logging_steps, save_strategy="no", eval_strategy="no", report_to=[],
            max_length=sc.max_length, assistant_only_loss=assistant_masks, padding_free=sc.padding_free,
            # trl enforces max_length in padding-free mode only through best-fit-decreasing packing.
            packing=sc.padding_free, packing_strategy="bfd",
            gradient_checkpointing=sc.gradient_checkpointing, seed=sc.seed, data_seed=sc.seed,
            dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
            # PeftModel.forward hides `labels` behind **kwargs, so the Trainer cannot infer it.
            label_names=["labels"],
            **trainer_precision_kwargs(device, dtype))
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, peft_config=models.lora_config(sc.lora),
                             callbacks=[JsonlMetrics(logger, "sft")])
        restore_fp32_trainables(trainer.model, dtype)
        trainable, total = models.count_parameters(trainer.model)
        print(f"[sft] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)", flush=True)
        eval_prompts = [r["messages"][:-1] for r in eval_rows[:sc.gold_eval_prompts]]

        # 3. evaluate before training
        metrics: dict = {"trainable_params": trainable, "total_params": total}
        if eval_ds is not None:
            metrics["eval_loss_before"] = _eval_loss(trainer, sc.max_length)
        if eval_prompts:
            metrics["gold_before"] = gold_mean(trainer.model, tok, eval_prompts, sc.gold_max_new_tokens,
                                             cfg.ppo.temperature, sc.seed)

        # 4. train
        t_train = time.time()
        result = trainer.train()
        metrics["train_seconds"] = round(time.time() - t_train, 1)
        metrics["train_loss"] = result.training_loss
        # Non-padding tokens (include_num_input_tokens_seen="non_padding"), so padding-free runs compare fairly.
        metrics["train_tokens"] = int(trainer.state.num_input_tokens_seen)
        metrics["train_tokens_per_second"] = round(metrics["train_tokens"] / max(metrics["train_seconds"], 1e-9), 1)

        # 5. evaluate after training
        if eval_ds is not None:
            metrics["eval_loss_after"] = _eval_loss(trainer, sc.max_length)
        if eval_prompts:
            metrics["gold_after"] = gold_mean(trainer.model, tok, eval_prompts, sc.gold_max_new_tokens,
                                             cfg.ppo.temperature, sc.seed)
        metrics["wall_seconds"] = round(time.time() - t0, 1)
        logger.log({"step": trainer.state.global_step, **{f"sft/{k}": v for k, v in metrics.items()
                                                          if isinstance(v, (int, float))}})
        logger.close()

        # 6. save: adapter (safetensors) + tokenizer + config + manifest (last)
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        write_manifest(tmp, "sft", cfg, base, metrics,
                       data={"train": {"source": cfg.data.sft_train, "sha256": data.data_hash(cfg.data.sft_train),
                                       "rows": train_report.kept, "skipped": train_report.skipped},
                             "eval": {"source": cfg.data.sft_eval,
                                      "sha256": data.data_hash(cfg.data.sft_eval) if cfg.data.sft_eval else None}})
    print(f"[sft] done in {metrics['wall_seconds']}s -> {out}", flush=True)
    for k in ("eval_loss_before", "eval_loss_after", "gold_before", "gold_after"):
        if k in metrics:
            print(f"[sft] {k}: {metrics[k]:.4f}", flush=True)
    return out
