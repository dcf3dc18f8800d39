"""Stage 2: a reward model (LoRA + linear score head on the NF4 base) trained on preference pairs with
the pairwise (Bradley-Terry) loss, and the scorer that serves it as a reward plugin, on its own base or
on the policy's in-memory base.

The head reads the final hidden states **averaged over the response tokens** (``reward.pooling:
mean``). The usual last-token pooling (trl's RewardTrainer, AutoModelForSequenceClassification) did
not learn the default task within an epoch of 2,304 pairs: training loss stayed at log 2 and held-out
accuracy against gold reached 0.69 (README "Reward model"). With mean pooling a linear head sees a
bag of the response's token features from the first step. Reward models trained by earlier versions
(last-token, recorded in their manifest) still load and score as they were trained.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.artifacts import guard
from pipeline.artifacts.checkpoints import (
    StageWork,
    load_state,
    restore_parameters,
    rng_state,
    save_state,
    set_rng_state,
)
from pipeline.artifacts.outputs import (
    ArtifactError,
    MetricsLogger,
    write_manifest,
)
from pipeline.config import PipelineConfig, to_dict
from pipeline.data import lengths, loaders
from pipeline.data.lengths import LengthReport
from pipeline.evaluation.stats import accuracy_se, spearman
from pipeline.models import loading
from pipeline.models.reward_model import (
    RewardModelScorer,
    encode_conversation,
    pairwise_loss,
    pooled_features,
)
from pipeline.models.trainer_utils import restore_fp32_trainables


def fit_pairs(tokenizer, rows: list[dict], max_length: int, policy: str, what: str,
              name_row) -> tuple[list[int], list[tuple[tuple[list[int], int], tuple[list[int], int]]], LengthReport]:
    """Encode preference pairs and fit them to ``max_length`` by ``data.long_rows`` (``policy``), as the
    training loop and held-out scoring both do: ``(indices of the kept rows, their ((chosen ids,
    response start), (rejected ids, response start)), LengthReport)``. A pair is long when either side is."""
    full = [tuple(encode_conversation(tokenizer, r["prompt"], r[side][0]["content"], None)[:2]
                  for side in ("chosen", "rejected")) for r in rows]
    cuts, report = lengths.plan_cuts([[(len(ids), start) for ids, start in pair] for pair in full], max_length,
                                     policy, what, "reward.max_length", name_row)
    kept = [i for i, c in enumerate(cuts) if c is not None]
    pairs = [tuple((ids[c:], max(start - c, 0)) for (ids, start), c in zip(full[i], cuts[i])) for i in kept]
    return kept, pairs, report


def pair_metrics(scorer: RewardModelScorer, rows: list[dict], gold: Optional[list[tuple[float, float]]] = None,
                 gold_min_gap: float = 0.05, progress: Optional[str] = None) -> dict:
    """Held-out pairwise accuracy against the labels, and mean margin; with ``gold`` (per pair, the gold
    scores of chosen and rejected) also accuracy against gold over the pairs whose gold differs by at
    least ``gold_min_gap`` (near-ties have no meaningful order). Accuracies come with n and SE."""
    convs = [r["prompt"] for r in rows]
    n = len(rows)
    texts = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    scores = scorer.score_ids(scorer.encode([""] * 2 * n, texts, convs + convs), progress=progress)
    margin = scores[:n] - scores[n:]
    correct = int((margin > 0).sum())
    out = {"accuracy": correct / n, "accuracy_se": accuracy_se(correct, n), "accuracy_n": n,
           "margin": float(margin.mean()), "n_pairs": n}
    if gold is not None:
        gap = torch.tensor([c - r for c, r in gold], dtype=torch.float64)
        # gold is rounded to 4 decimals in the data files; round the gap too so 0.05 counts as 0.05.
        keep = gap.abs().round(decimals=4) >= gold_min_gap
        agree = ((margin.double() * gap.sign()) > 0)[keep]
        k = int(keep.sum())
        out.update({"accuracy_vs_gold": float(agree.double().mean()) if k else float("nan"),
                    "accuracy_vs_gold_se": accuracy_se(int(agree.sum()), k), "accuracy_vs_gold_n": k,
                    "accuracy_vs_gold_min_gap": gold_min_gap})
    return out


def _pair_gold(source: str, row_numbers: list[int]) -> Optional[list[tuple[float, float]]]:
    """(gold_chosen, gold_rejected) of the pairs loaded from these source rows, for pair files that
    record them (data/README.md); None when the file has no gold or a row gave more than one pair."""
    if len(set(row_numbers)) != len(row_numbers):
        return None
    try:
        by_number = dict(loaders.read_rows(source, max_rows=max(row_numbers, default=0)))
    except Exception:
        return None
    out = []
    for n in row_numbers:
        r = by_number.get(n, {})
        c, j = r.get("gold_chosen"), r.get("gold_rejected")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (c, j)):
            return None
        out.append((float(c), float(j)))
    return out


def spearman_on_sft_samples(scorer: RewardModelScorer, sft_dir: Path) -> Optional[dict]:
    """Rank correlation between the reward model and gold on responses the SFT policy sampled for the
    eval prompts (``sft/gold_samples.jsonl``, written by the SFT stage); None when there are none."""
    path = sft_dir / "gold_samples.jsonl"
    if not path.is_file():
        return None
    rows = [r for _, r in loaders.read_rows(str(path)) if r.get("model") == "sft"]
    if len(rows) < 3:
        return None
    learned = scorer([r["prompt"] for r in rows], [r["response"] for r in rows])
    return {"spearman_vs_gold_sft_samples": spearman(learned, [r["gold"] for r in rows]),
            "sft_samples_scored": len(rows)}


def lr_at(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warm-up over ``warmup`` steps, then
    "cosine" (to 0 at ``total``), "linear" (to 0) or "constant". E.g. total 10, warmup 2, cosine:
    step 1 -> 0.5, step 2 -> 1, step 6 -> (1 + cos(pi * 4 / 8)) / 2 = 0.5, step 10 -> 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1) if warmup else 1.0
    if kind == "constant":
        return 1.0
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def run_reward(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    from peft import get_peft_model
    from tqdm.auto import tqdm

    rc = cfg.reward
    # 0. where we write: RUN/reward.work (a checkpoint every reward.save_steps), renamed to RUN/reward at the end
    stage = StageWork(run_dir, "reward", keep=rc.keep_checkpoints)
    ckpt = stage.start(overwrite, resume, config=to_dict(cfg))
    if stage.finished:
        return stage.publish()
    state = load_state(ckpt) if ckpt is not None else None  # read (or refused) before any model loads
    out, work = stage.out, stage.work
    t0 = time.time()

    # 1. data: preference pairs with an explicit conversational prompt
    dkw = loaders.loader_options(cfg.data)
    train_rows, train_report = loaders.load_pairs(cfg.data.pairs_train, **dkw)
    eval_rows, eval_report = loaders.load_pairs(cfg.data.pairs_eval, **dkw) if cfg.data.pairs_eval else ([], None)
    for rep in (train_report, eval_report):
        if rep is not None:
            print(f"[reward] {rep.summary()}", flush=True)

    # 2. model: NF4 base + LoRA (top layers) + a linear score head, as one peft SEQ_CLS adapter
    # Seeded first: the score head is drawn while loading, then the LoRA weights (the same reward.seed gives
    # the same model whatever the caller did with the global RNG before; a resumed run relies on it too).
    torch.manual_seed(rc.seed)
    model, tok, base = loading.load_base(cfg.model, kind="seqcls", num_labels=1)
    peft_model = get_peft_model(model, loading.lora_config(rc.lora, task_type="SEQ_CLS", model=model))
    restore_fp32_trainables(peft_model)  # LoRA and head weights are float32 masters in bf16 compute too
    head = peft_model.base_model.model.score
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if ".score." not in n], "lr": rc.learning_rate},
         {"params": [p for n, p in named if ".score." in n], "lr": rc.head_learning_rate or rc.learning_rate}],
        weight_decay=0.0)
    trainable, total = loading.count_parameters(peft_model)
    print(f"[reward] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
          f"pooling {rc.pooling}", flush=True)

    # Pairs over reward.max_length are cut from the left, dropped or refused (data.long_rows), in training
    # and held-out scoring alike.
    pad = tok.pad_token_id
    policy = cfg.data.long_rows
    _, pairs, train_len = fit_pairs(tok, train_rows, rc.max_length, policy, "reward training pairs",
                                    train_report.row_name)
    eval_len = None
    if eval_rows:
        kept, _, eval_len = fit_pairs(tok, eval_rows, rc.max_length, policy, "reward held-out pairs",
                                      eval_report.row_name)
        gold = _pair_gold(cfg.data.pairs_eval, eval_report.row_numbers)
        eval_rows = [eval_rows[i] for i in kept]
        gold = [gold[i] for i in kept] if gold is not None else None
    for rep in (train_len, eval_len):
        if rep is not None:
            print(f"[reward] {rep.summary()}", flush=True)
    per_step = rc.batch_size * rc.grad_accum
    steps = rc.max_steps if rc.max_steps > 0 else max(1, math.ceil(rc.epochs * len(pairs) / per_step))
    warmup = round(rc.warmup_ratio * steps)

    # 3. train: shuffled batches of pairs, chosen and rejected rows in one forward; resumable
    t_train = time.time()
    gen = torch.Generator().manual_seed(rc.seed)
    start, order, cursor, epoch = 0, torch.randperm(len(pairs), generator=gen).tolist(), 0, 0
    window: dict[str, list[float]] = {}
    losses: list[float] = []
    if state is not None:
        restore_parameters(named, state["params"], ckpt)
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        set_rng_state(state["rng"])
        start, order, cursor, epoch = state["step"], state["order"], state["cursor"], state["epoch"]
        window, losses = state["window"], state["losses"]
        state = None  # the parameters and the optimizer hold it now
        print(f"[reward] resumed from {ckpt} at step {start}", flush=True)
    logger = MetricsLogger(work / "metrics.jsonl", work / "tensorboard" if rc.tensorboard else None,
                           resume_step=start if ckpt is not None else None)

    def save(step: int) -> Path:
        """Weights, optimizer, both RNGs and the data position after ``step`` steps."""
        saved = {"params": dict(named), "optimizer": optimizer.state_dict(), "data_rng": gen.get_state(),
                 "rng": rng_state(), "step": step, "order": order, "cursor": cursor, "epoch": epoch,
                 "window": window, "losses": losses}
        return stage.checkpoints.save(step, lambda folder: save_state(folder, saved))

    peft_model.train()
    bar = tqdm(range(start, steps), desc="reward", unit="step", initial=start, total=steps)
    guard.graceful_stop(True)  # SIGINT/SIGTERM from here on: finish the step, save it, stop
    for step in bar:
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g["lr"] = g["initial_lr"] * lr_at(step, steps, warmup, rc.lr_scheduler)
        for _ in range(rc.grad_accum):
            batch = []
            while len(batch) < rc.batch_size:
                if cursor == len(order):
                    order, cursor, epoch = torch.randperm(len(pairs), generator=gen).tolist(), 0, epoch + 1
                batch.append(pairs[order[cursor]])
                cursor += 1
            feats = pooled_features(peft_model, [b[0] for b in batch] + [b[1] for b in batch], pad, rc.pooling)
            scores = head(feats).squeeze(-1)  # float32 features, float32 head (restored above)
            chosen, rejected = scores[:len(batch)], scores[len(batch):]
            loss = pairwise_loss(chosen, rejected, rc.center_rewards_coefficient)
            if not torch.isfinite(loss):
                raise ArtifactError(f"reward step {step + 1}: loss is {loss.item()}; lower reward.learning_rate")
            (loss / rc.grad_accum).backward()
            for k, v in (("loss", loss.item()), ("accuracy", (chosen > rejected).float().mean().item()),
                         ("margin", (chosen - rejected).mean().item())):
                window.setdefault(k, []).append(v)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loading.release_free_memory()  # the step's freed activations go back to the OS
        losses.append(window["loss"][-1])
        if (step + 1) % rc.logging_steps == 0 or step + 1 == steps:
            row = {f"reward/{k}": sum(v) / len(v) for k, v in window.items()}
            logger.log({"step": step + 1, **row, "reward/grad_norm": float(grad_norm),
                        "reward/learning_rate": optimizer.param_groups[0]["lr"],
                        "reward/epoch": epoch + cursor / len(order),
                        "time/elapsed": round(time.time() - t_train, 2)}, step=step + 1)
            bar.set_postfix(loss=f"{row['reward/loss']:.3f}", acc=f"{row['reward/accuracy']:.2f}")
            window = {}
        guard.end_of_step("reward", step + 1, steps, rc.save_steps, lambda: save(step + 1))
    guard.graceful_stop(False)
    peft_model.eval()
    metrics: dict = {"trainable_params": trainable, "total_params": total, "steps": steps,
                     "train_loss": sum(losses) / len(losses), "train_seconds": round(time.time() - t_train, 1),
                     **train_len.metrics("train"), **(eval_len.metrics("eval") if eval_len else {})}

    # 4. held-out accuracy and margin, with the same scorer PPO will use
    wrapped = getattr(head, "modules_to_save", None)
    head_module = wrapped["default"] if wrapped is not None else head
    scorer = RewardModelScorer(peft_model, tok, head_module.weight, head_module.bias, adapter="default",
                               max_length=rc.max_length, pooling=rc.pooling)
    if eval_rows:
        held = pair_metrics(scorer, eval_rows, gold, rc.gold_min_gap, progress="reward held-out pairs")
        metrics.update({f"eval_{k}": v for k, v in held.items()})
    on_sft = spearman_on_sft_samples(scorer, Path(run_dir) / "sft")
    if on_sft is not None:
        metrics.update(on_sft)
    elif cfg.data.sft_eval:
        sft_rows, _ = loaders.load_sft(cfg.data.sft_eval, **dkw)
        convs = [r["messages"][:-1] for r in sft_rows]
        responses = [r["messages"][-1]["content"] for r in sft_rows]
        learned = scorer([""] * len(convs), responses, prompt_messages=convs)
        from reward.registry import build_reward

        gold = build_reward("sentiment")([c[-1]["content"] for c in convs], responses).total
        metrics["spearman_vs_gold_sft_eval"] = spearman(learned, gold)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    logger.log({"step": steps, **{f"reward/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
    logger.close()

    # 5. save: adapter (LoRA + score head) + tokenizer + config + manifest (last), then RUN/reward.work -> RUN/reward
    peft_model.save_pretrained(work)
    tok.save_pretrained(work)
    write_manifest(work, "reward", cfg, base, metrics,
                   data={"train": loaders.manifest_entry(cfg.data.pairs_train, train_report, cfg.data.split, train_len),
                         "eval": loaders.manifest_entry(cfg.data.pairs_eval, eval_report, cfg.data.split, eval_len)
                         if eval_report else {"source": cfg.data.pairs_eval}},
                   extra={"pooling": rc.pooling})
    stage.publish()
    print(f"[reward] done in {metrics['wall_seconds']}s -> {out}", flush=True)
    if "eval_accuracy" in metrics:
        print(f"[reward] held-out accuracy vs labels {metrics['eval_accuracy']:.3f} ± {metrics['eval_accuracy_se']:.3f} "
              f"(n={metrics['eval_accuracy_n']}), margin {metrics['eval_margin']:.3f}", flush=True)
    if "eval_accuracy_vs_gold" in metrics:
        print(f"[reward] held-out accuracy vs gold {metrics['eval_accuracy_vs_gold']:.3f} ± "
              f"{metrics['eval_accuracy_vs_gold_se']:.3f} (n={metrics['eval_accuracy_vs_gold_n']} pairs whose gold "
              f"differs by >= {rc.gold_min_gap})", flush=True)
    for k in ("spearman_vs_gold_sft_samples", "spearman_vs_gold_sft_eval"):
        if k in metrics:
            print(f"[reward] {k}: {metrics[k]:.3f}", flush=True)
    return out
