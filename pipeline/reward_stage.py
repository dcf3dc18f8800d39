"""Stage 2: a reward model (LoRA + score head on the NF4 base) trained with trl's RewardTrainer,
and the scorer that serves it as a reward plugin, on its own base or on the policy's in-memory base."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline import data, models
from pipeline.artifacts import (ArtifactError, MetricsLogger, atomic_output, is_complete, read_manifest,
                                write_manifest)
from pipeline.config import ModelConfig, PipelineConfig
from pipeline.rollout import last_hidden_at, left_pad
from pipeline.trainer_utils import JsonlMetrics, restore_fp32_trainables, trainer_precision_kwargs

REWARD_ADAPTER = "reward"


class RewardModelScorer:
    """A reward plugin (prompts, responses -> scores) backed by a LoRA reward adapter + linear head.

    The conversation is rendered with the chat template exactly as trl's RewardTrainer renders it
    during training, and the head reads the final hidden state of the last token.
    """

    def __init__(self, model, tokenizer, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor] = None,
                 adapter: str = REWARD_ADAPTER, batch_size: int = 16, max_length: int = 1024):
        self.model = model
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.head_weight = head_weight.detach().to(device, torch.float32).reshape(1, -1)
        self.head_bias = None if head_bias is None else head_bias.detach().to(device, torch.float32)
        self.adapter = adapter
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, prompts: Sequence[str], responses: Sequence[str],
               prompt_messages: Optional[Sequence[list[dict]]] = None) -> list[list[int]]:
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            conv = list(prompt_messages[i]) if prompt_messages is not None else [{"role": "user", "content": p}]
            ids = self.tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": r}], tokenize=True,
                                                     return_dict=False)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            out.append(ids[-self.max_length:])
        return out

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        scores = []
        try:
            with models.active_adapters(self.model, [self.adapter]):
                for s in range(0, len(seqs), self.batch_size):
                    ids, mask = left_pad(seqs[s:s + self.batch_size], self.tokenizer.pad_token_id)
                    device = self.head_weight.device
                    last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=device)
                    h = last_hidden_at(self.model, ids.to(device), mask.to(device), last).float()
                    v = h @ self.head_weight.T
                    if self.head_bias is not None:
                        v = v + self.head_bias
                    scores.append(v.squeeze(-1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(scores)

    def __call__(self, prompts, responses, prompt_messages=None, **info) -> list[float]:
        return self.score_ids(self.encode(prompts, responses, prompt_messages)).tolist()


def _head_from_state(state: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = next((v for k, v in state.items() if k.endswith("score.weight")), None)
    if weight is None:
        raise ArtifactError(f"{where}: no score head (score.weight) in the reward adapter")
    bias = next((v for k, v in state.items() if k.endswith("score.bias")), None)
    return weight, bias


def load_reward_scorer(path: str | Path, host=None, batch_size: int = 16) -> RewardModelScorer:
    """Serve a trained reward model (a RUN/reward folder, or a run folder containing reward/).

    ``host`` is ``(peft_model, tokenizer, base_info)`` of an already loaded model: when the reward
    model was trained on the same base (weights and tokenizer hashes), its adapter attaches to that
    model and no second base is loaded. Otherwise it loads its own base as its manifest describes.
    """
    from peft import PeftModel

    path = Path(path)
    if not is_complete(path) and is_complete(path / "reward"):
        path = path / "reward"
    manifest = read_manifest(path)
    if manifest.get("stage") != "reward":
        raise ArtifactError(f"{path} is a '{manifest.get('stage')}' output, not a reward model")
    if host is not None:
        model, tok, base = host
        if (manifest["base"].get("weights_sha256") == base.weights_sha256
                and manifest["base"].get("tokenizer_sha256") == base.tokenizer_sha256
                and isinstance(model, PeftModel)):
            if REWARD_ADAPTER not in model.peft_config:
                state = models.attach_adapter(model, path, REWARD_ADAPTER)
                model._rlhf_reward_head = _head_from_state(state, str(path))
            return RewardModelScorer(model, tok, *model._rlhf_reward_head, batch_size=batch_size)
    mcfg = ModelConfig(**manifest["config"]["model"])
    base_model, tok, _ = models.load_base(mcfg)
    from peft import get_peft_model

    # A placeholder adapter makes this a PeftModel; the reward adapter then attaches by name.
    peft_model = get_peft_model(base_model, models.lora_config(
        models.LoraConfigSection(r=1, target_modules=["q_proj"])), adapter_name="unused")
    state = models.attach_adapter(peft_model, path, REWARD_ADAPTER)
    peft_model.delete_adapter("unused")
    return RewardModelScorer(peft_model, tok, *_head_from_state(state, str(path)), batch_size=batch_size)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in t.unique():
            idx = (t == v).nonzero().flatten()
            r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-12))


def pair_metrics(scorer: RewardModelScorer, rows: list[dict], gold_flipped: Optional[list[bool]] = None) -> dict:
    """Held-out pairwise accuracy and mean margin; with ``gold_flipped``, accuracy against gold too."""
    convs = [r["prompt"] for r in rows]
    chosen = scorer.score_ids(scorer.encode([""] * len(rows), [r["chosen"][0]["content"] for r in rows], convs))
    rejected = scorer.score_ids(scorer.encode([""] * len(rows), [r["rejected"][0]["content"] for r in rows], convs))
    margin = chosen - rejected
    out = {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
           "n_pairs": len(rows)}
    if gold_flipped is not None:
        gold_sign = torch.tensor([-1.0 if f else 1.0 for f in gold_flipped])
        out["accuracy_vs_gold"] = float(((margin * gold_sign) > 0).float().mean())
    return out


def _gold_flips(source: str, n: int) -> Optional[list[bool]]:
    """The shipped pairs record whether the label was flipped from the gold order (data/README.md)."""
    try:
        rows = [r for _, r in data.read_rows(source)]
    except Exception:
        return None
    flips = [r.get("flipped") for r in rows]
    if len(flips) != n or any(not isinstance(f, bool) for f in flips):
        return None
    return flips


def run_reward(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False) -> Path:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    out = Path(run_dir) / "reward"
    if is_complete(out) and not overwrite:
        raise ArtifactError(f"{out} already holds a complete reward output; pass --overwrite to replace it")
    rc = cfg.reward
    t0 = time.time()

    # 1. data: preference pairs with an explicit conversational prompt
    dkw = data.loader_options(cfg.data)
    train_rows, train_report = data.load_pairs(cfg.data.pairs_train, **dkw)
    eval_rows, eval_report = data.load_pairs(cfg.data.pairs_eval, **dkw) if cfg.data.pairs_eval else ([], None)
    for rep in (train_report, eval_report):
        if rep is not None:
            print(f"[reward] {rep.summary()}", flush=True)

    # 2. model: NF4 base as a 1-output sequence classifier + LoRA (score head trained in full)
    model, tok, base = models.load_base(cfg.model, kind="seqcls", num_labels=1)
    device = next(model.parameters()).device
    dtype = models.compute_dtype(cfg.model, device)

    with atomic_output(out, overwrite=overwrite) as tmp:
        logger = MetricsLogger(tmp / "metrics.jsonl", tmp / "tensorboard" if rc.tensorboard else None)
        args = RewardConfig(
            output_dir=str(tmp / "trainer"), per_device_train_batch_size=rc.batch_size,
            per_device_eval_batch_size=rc.batch_size, gradient_accumulation_steps=rc.grad_accum,
            learning_rate=rc.learning_rate, num_train_epochs=rc.epochs, max_steps=rc.max_steps,
            lr_scheduler_type=rc.lr_scheduler, warmup_steps=rc.warmup_ratio, logging_steps=rc.logging_steps,
            save_strategy="no", eval_strategy="no", report_to=[], max_length=rc.max_length,
            center_rewards_coefficient=rc.center_rewards_coefficient or None, seed=rc.seed, data_seed=rc.seed,
            dataloader_num_workers=0, **trainer_precision_kwargs(device, dtype))
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                processing_class=tok,
                                peft_config=models.lora_config(rc.lora, task_type="SEQ_CLS"),
                                callbacks=[JsonlMetrics(logger, "reward")])
        restore_fp32_trainables(trainer.model, dtype)
        trainable, total = models.count_parameters(trainer.model)
        print(f"[reward] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
              flush=True)

        # 3. train
        t_train = time.time()
        result = trainer.train()
        metrics: dict = {"trainable_params": trainable, "total_params": total, "train_loss": result.training_loss,
                         "train_seconds": round(time.time() - t_train, 1)}

        # 4. held-out accuracy and margin, with the same scorer PPO will use
        score_module = trainer.model.get_base_model().score
        wrapped = getattr(score_module, "modules_to_save", None)
        head = wrapped["default"] if wrapped is not None else score_module
        scorer = RewardModelScorer(trainer.model, tok, head.weight, head.bias, adapter="default")
        if eval_rows:
            held = pair_metrics(scorer, eval_rows, _gold_flips(cfg.data.pairs_eval, len(eval_rows)))
            metrics.update({f"eval_{k}": v for k, v in held.items()})
        if cfg.data.sft_eval:
            sft_rows, _ = data.load_sft(cfg.data.sft_eval, **dkw)
            convs = [r["messages"][:-1] for r in sft_rows]
            responses = [r["messages"][-1]["content"] for r in sft_rows]
            learned = scorer([""] * len(convs), responses, prompt_messages=convs)
            from reward.registry import build_reward

            gold = build_reward("sentiment")([c[-1]["content"] for c in convs], responses).total
            metrics["spearman_vs_gold_sft_eval"] = _spearman(learned, gold)
        metrics["wall_seconds"] = round(time.time() - t0, 1)
        logger.log({"step": trainer.state.global_step,
                    **{f"reward/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
        logger.close()

        # 5. save: adapter (LoRA + score head) + tokenizer + config + manifest (last)
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        write_manifest(tmp, "reward", cfg, base, metrics,
                       data={"train": {"source": cfg.data.pairs_train, "sha256": data.data_hash(cfg.data.pairs_train),
                                       "rows": train_report.kept, "skipped": train_report.skipped},
                             "eval": {"source": cfg.data.pairs_eval,
                                      "sha256": data.data_hash(cfg.data.pairs_eval) if cfg.data.pairs_eval else None}})
    print(f"[reward] done in {metrics['wall_seconds']}s -> {out}", flush=True)
    for k in ("eval_accuracy", "eval_accuracy_vs_gold", "eval_margin", "spearman_vs_gold_sft_eval"):
        if k in metrics:
            print(f"[reward] {k}: {metrics[k]:.4f}", flush=True)
    return out
