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
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline import data, guard, lengths, models
from pipeline.artifacts import ArtifactError, MetricsLogger, is_complete, read_manifest, write_manifest
from pipeline.checkpoints import StageWork, load_state, restore_parameters, rng_state, save_state, set_rng_state
from pipeline.config import ModelConfig, PipelineConfig, to_dict
from pipeline.lengths import LengthReport
from pipeline.rollout import last_hidden_at, left_pad, response_pooled_hidden
from pipeline.trainer_utils import restore_fp32_trainables

REWARD_ADAPTER = "reward"
POOLINGS = ("mean", "last")


def encode_conversation(tokenizer, conv: list[dict], response: str,
                        max_length: Optional[int]) -> tuple[list[int], int, bool]:
    """Token ids of ``conv`` + the assistant ``response`` (chat template), the index where the response
    starts, and whether the row was cut: a row over ``max_length`` tokens (None: no limit) loses tokens
    from the left (the start of the prompt), so the response and the prompt's end are kept."""
    full = tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": response}], tokenize=True,
                                         return_dict=False)
    prompt = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    start = len(prompt) if full[:len(prompt)] == prompt else len(full) - 1
    cut = max(len(full) - max_length, 0) if max_length is not None else 0
    return full[cut:], max(start - cut, 0), cut > 0


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


def pooled_features(model, encoded: Sequence[tuple[list[int], int]], pad_id: int, pooling: str) -> torch.Tensor:
    """(B, H) float32 features the score head reads for left-padded rows ``(ids, response_start)``."""
    ids, mask = left_pad([e[0] for e in encoded], pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if pooling == "last":
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=device)
        return last_hidden_at(model, ids, mask, last).float()
    width = ids.shape[1]
    pos = torch.arange(width, device=device).unsqueeze(0)
    starts = torch.tensor([width - len(i) + s for i, s in encoded], device=device).unsqueeze(1)
    return response_pooled_hidden(model, ids, mask, (pos >= starts) & mask.bool())


class RewardModelScorer:
    """A reward plugin (prompts, responses -> scores) backed by a LoRA reward adapter + linear head.

    The conversation is rendered with the chat template exactly as in training; the head reads the
    final hidden states pooled as the model was trained (``pooling``: mean over the response tokens,
    or the last token for reward models trained with trl's RewardTrainer).
    """

    def __init__(self, model, tokenizer, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor] = None,
                 adapter: str = REWARD_ADAPTER, batch_size: int = 16, max_length: int = 1024, pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.head_weight = head_weight.detach().to(device, torch.float32).reshape(1, -1)
        self.head_bias = None if head_bias is None else head_bias.detach().to(device, torch.float32)
        self.adapter = adapter
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling

    def encode(self, prompts: Sequence[str], responses: Sequence[str],
               prompt_messages: Optional[Sequence[list[dict]]] = None) -> list[tuple[list[int], int]]:
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            conv = list(prompt_messages[i]) if prompt_messages is not None else [{"role": "user", "content": p}]
            ids, start, _ = encode_conversation(self.tokenizer, conv, r, self.max_length)
            out.append((ids, start))
        return out

    @torch.no_grad()
    def score_ids(self, seqs: list[tuple[list[int], int]], progress: Optional[str] = None) -> torch.Tensor:
        """Scores of encoded rows, in their order. Batches are formed in order of length, so that a batch
        is not padded to one long row (each row's score does not depend on its padding); ``progress``
        names a progress bar."""
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
        scores = torch.empty(len(seqs))
        try:
            with models.active_adapters(self.model, [self.adapter]):
                for s in tqdm(range(0, len(seqs), self.batch_size), desc=progress, unit="batch",
                              disable=progress is None):
                    idx = order[s:s + self.batch_size]
                    h = pooled_features(self.model, [seqs[i] for i in idx], self.tokenizer.pad_token_id, self.pooling)
                    v = h @ self.head_weight.T
                    if self.head_bias is not None:
                        v = v + self.head_bias
                    scores[idx] = v.squeeze(-1).float().cpu()
        finally:
            self.model.train(was_training)
        return scores

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
        trained_in = manifest["base"].get("quantization", {}).get("compute_dtype")
        used_in = base.quantization.get("compute_dtype")
        if trained_in and used_in and trained_in != used_in:
            # Measured: an fp32-trained reward model read bf16 hidden states with a ~0.12 offset.
            print(f"[reward] note: {path} was trained in {trained_in} and now scores in {used_in}; its scores "
                  "shift with the precision. Train the reward model in the precision PPO uses.", flush=True)
        if (manifest["base"].get("weights_sha256") == base.weights_sha256
                and manifest["base"].get("tokenizer_sha256") == base.tokenizer_sha256
                and isinstance(model, PeftModel)):
            if REWARD_ADAPTER not in model.peft_config:
                state = models.attach_adapter(model, path, REWARD_ADAPTER)
                model._rlhf_reward_head = _head_from_state(state, str(path))
            return RewardModelScorer(model, tok, *model._rlhf_reward_head, batch_size=batch_size,
                                     max_length=_max_length(manifest), pooling=_pooling(manifest))
    mcfg = ModelConfig(**manifest["config"]["model"])
    base_model, tok, _ = models.load_base(mcfg)
    from peft import get_peft_model

    # A placeholder adapter makes this a PeftModel; the reward adapter then attaches by name.
    peft_model = get_peft_model(base_model, models.lora_config(
        models.LoraConfigSection(r=1, target_modules=["q_proj"])), adapter_name="unused")
    state = models.attach_adapter(peft_model, path, REWARD_ADAPTER)
    with warnings.catch_warnings():  # peft notes that the deleted placeholder was the active adapter
        warnings.simplefilter("ignore", UserWarning)
        peft_model.delete_adapter("unused")
    return RewardModelScorer(peft_model, tok, *_head_from_state(state, str(path)), batch_size=batch_size,
                             max_length=_max_length(manifest), pooling=_pooling(manifest))


def _max_length(manifest: dict) -> int:
    """The token limit the reward model was trained with: it scores under the same left-cut rule."""
    return int(manifest.get("config", {}).get("reward", {}).get("max_length", 1024))


def _pooling(manifest: dict) -> str:
    """How the saved reward model pools hidden states; "last" for models from before mean pooling."""
    pooling = manifest.get("pooling", "last")
    if pooling not in POOLINGS:
        raise ArtifactError(f"reward model pooling {pooling!r} is not one of {POOLINGS}")
    return pooling


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


def accuracy_se(correct: int, n: int) -> float:
    """Binomial standard error of an accuracy, sqrt(p (1 - p) / n); 0.8 on 400 pairs: sqrt(0.16 / 400) = 0.02."""
    if n == 0:
        return float("nan")
    p = correct / n
    return (p * (1 - p) / n) ** 0.5


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
        by_number = dict(data.read_rows(source, max_rows=max(row_numbers, default=0)))
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
    rows = [r for _, r in data.read_rows(str(path)) if r.get("model") == "sft"]
    if len(rows) < 3:
        return None
    learned = scorer([r["prompt"] for r in rows], [r["response"] for r in rows])
    return {"spearman_vs_gold_sft_samples": _spearman(learned, [r["gold"] for r in rows]),
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


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_c - r_r), mean over pairs (Ouyang et al. 2022, eq. 1), plus
    ``center`` * mean((r_c + r_r)^2) to keep rewards near 0 (Eisenstein et al. 2023; trl's
    center_rewards_coefficient). Margins (2, 0): (-log sigmoid(2) - log sigmoid(0)) / 2 = (0.1269 + 0.6931) / 2."""
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss


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
    dkw = data.loader_options(cfg.data)
    train_rows, train_report = data.load_pairs(cfg.data.pairs_train, **dkw)
    eval_rows, eval_report = data.load_pairs(cfg.data.pairs_eval, **dkw) if cfg.data.pairs_eval else ([], None)
    for rep in (train_report, eval_report):
        if rep is not None:
            print(f"[reward] {rep.summary()}", flush=True)

    # 2. model: NF4 base + LoRA (top layers) + a linear score head, as one peft SEQ_CLS adapter
    # Seeded first: the score head is drawn while loading, then the LoRA weights (the same reward.seed gives
    # the same model whatever the caller did with the global RNG before; a resumed run relies on it too).
    torch.manual_seed(rc.seed)
    model, tok, base = models.load_base(cfg.model, kind="seqcls", num_labels=1)
    peft_model = get_peft_model(model, models.lora_config(rc.lora, task_type="SEQ_CLS", model=model))
    restore_fp32_trainables(peft_model)  # LoRA and head weights are float32 masters in bf16 compute too
    head = peft_model.base_model.model.score
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if ".score." not in n], "lr": rc.learning_rate},
         {"params": [p for n, p in named if ".score." in n], "lr": rc.head_learning_rate or rc.learning_rate}],
        weight_decay=0.0)
    trainable, total = models.count_parameters(peft_model)
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
        models.release_free_memory()  # the step's freed activations go back to the OS
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
        sft_rows, _ = data.load_sft(cfg.data.sft_eval, **dkw)
        convs = [r["messages"][:-1] for r in sft_rows]
        responses = [r["messages"][-1]["content"] for r in sft_rows]
        learned = scorer([""] * len(convs), responses, prompt_messages=convs)
        from reward.registry import build_reward

        gold = build_reward("sentiment")([c[-1]["content"] for c in convs], responses).total
        metrics["spearman_vs_gold_sft_eval"] = _spearman(learned, gold)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    logger.log({"step": steps, **{f"reward/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
    logger.close()

    # 5. save: adapter (LoRA + score head) + tokenizer + config + manifest (last), then RUN/reward.work -> RUN/reward
    peft_model.save_pretrained(work)
    tok.save_pretrained(work)
    write_manifest(work, "reward", cfg, base, metrics,
                   data={"train": data.manifest_entry(cfg.data.pairs_train, train_report, cfg.data.split, train_len),
                         "eval": data.manifest_entry(cfg.data.pairs_eval, eval_report, cfg.data.split, eval_len)
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
