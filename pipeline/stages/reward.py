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

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.artifacts import guard
from pipeline.artifacts.checkpoints import (
    Checkpoints,
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
from pipeline.data import batching, lengths, loaders
from pipeline.data.lengths import LengthReport
from pipeline.evaluation.stats import accuracy_se, spearman
from pipeline.models import ensemble, forwards, lean_ops, loading, throughput, trunk
from pipeline.models.reward_model import (
    EnsembleScorer,
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
    return metrics_of_scores(torch.as_tensor(scores), gold, gold_min_gap)


def metrics_of_scores(scores: torch.Tensor, gold: Optional[list[tuple[float, float]]], gold_min_gap: float) -> dict:
    """:func:`pair_metrics` from the scores (2n,) of the n chosen then the n rejected responses."""
    n = scores.shape[0] // 2
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


def spearman_on_sft_samples(scorer: RewardModelScorer, sft_dir: Path,
                            scores: Optional[list[float]] = None) -> Optional[dict]:
    """Rank correlation between the reward model and gold on responses the SFT policy sampled for the
    eval prompts (``sft/gold_samples.jsonl``, written by the SFT stage); None when there are none.
    ``scores``: the scorer's scores of those responses where already computed (:func:`normalise_members`)."""
    path = sft_dir / "gold_samples.jsonl"
    if not path.is_file():
        return None
    rows = [r for _, r in loaders.read_rows(str(path)) if r.get("model") == "sft"]
    if len(rows) < 3:
        return None
    learned = scores if scores is not None else scorer([r["prompt"] for r in rows], [r["response"] for r in rows])
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


# ---------------------------------------------------------------------------------------------
# The stage's steps


@dataclass
class PairSets:
    """The stage's preference pairs after fitting to reward.max_length: ``train`` as ((chosen ids,
    response start), (rejected ids, response start)); the kept held-out rows ``eval_rows`` with their
    gold scores (None when the file has none); the load and length reports the manifest records."""
    train: list[tuple[tuple[list[int], int], tuple[list[int], int]]]
    train_report: Any
    train_len: LengthReport
    eval_rows: list[dict]
    eval_report: Any
    eval_len: Optional[LengthReport]
    gold: Optional[list[tuple[float, float]]]


@dataclass
class RewardNet:
    """The model being trained: NF4 base + LoRA + linear score ``head`` as one peft SEQ_CLS adapter
    (``peft_model``), its tokenizer, the base's record for the manifest, and the trainable parameters.
    An ensemble (reward.ensemble > 1) holds one adapter and head per member (``adapters``, ``heads``),
    each member's trainable parameters (``member_named``), the decoder layer below which the members'
    forward is shared (``split``) and each member's bootstrap multiplicity of every training pair
    (``weights``, set once the pairs are known)."""
    peft_model: Any
    tok: Any
    base: Any
    head: torch.nn.Module
    named: list[tuple[str, torch.nn.Parameter]]
    shape: Any = None  # throughput.DecoderShape of the base, for the FLOP counts
    adapters: list[str] = field(default_factory=lambda: ["default"])
    heads: list[torch.nn.Module] = field(default_factory=list)
    member_named: list[list[tuple[str, torch.nn.Parameter]]] = field(default_factory=list)
    split: int = 0
    weights: Optional[torch.Tensor] = None  # (members, pairs)


@dataclass
class Progress:
    """Where training stands, all of it saved in a checkpoint: the data generator, the shuffled pair
    ``order``, the ``cursor`` into it and the ``epoch``; the per-micro-batch values since the last log
    line (``window``) and the last micro-batch loss of every step (``losses``)."""
    gen: torch.Generator
    order: list[int]
    cursor: int = 0
    epoch: int = 0
    window: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    # how each epoch's order is drawn (not saved: the config and the pairs give them): each pair's longest
    # response, for batches of ``batch`` pairs of similar length; None, a plain shuffle
    keys: Optional[list[int]] = None
    batch: int = 1


def load_pair_rows(data_cfg) -> tuple[list[dict], Any, list[dict], Any]:
    """Preference pairs (explicit conversational prompt) of ``data.pairs_train`` and ``data.pairs_eval``:
    ``(train rows, train LoadReport, held-out rows, held-out LoadReport or None)``; prints the reports."""
    dkw = loaders.loader_options(data_cfg)
    train_rows, train_report = loaders.load_pairs(data_cfg.pairs_train, **dkw)
    eval_rows, eval_report = loaders.load_pairs(data_cfg.pairs_eval, **dkw) if data_cfg.pairs_eval else ([], None)
    for rep in (train_report, eval_report):
        if rep is not None:
            print(f"[reward] {rep.summary()}", flush=True)
    return train_rows, train_report, eval_rows, eval_report


def build_reward_model(cfg: PipelineConfig) -> RewardNet:
    """The NF4 base (``cfg.model``) with a LoRA adapter (``reward.lora``) and a linear score head, seeded
    by reward.seed; LoRA and head weights are float32 masters."""
    from peft import get_peft_model

    # Seeded first: the score head is drawn while loading, then the LoRA weights (the same reward.seed gives
    # the same model whatever the caller did with the global RNG before; a resumed run relies on it too).
    torch.manual_seed(cfg.reward.seed)
    model, tok, base = loading.load_base(cfg.model, kind="seqcls", num_labels=1)
    shape = throughput.decoder_shape(model)  # before the adapter: LoRA matrices are not the model's
    peft_model = get_peft_model(model, loading.lora_config(cfg.reward.lora, task_type="SEQ_CLS", model=model))
    head = forwards.score_head(peft_model)
    adapters = [ensemble.member_adapter(m) for m in range(cfg.reward.ensemble)]
    for m, name in enumerate(adapters[1:], start=1):
        add_member(peft_model, cfg, name, cfg.reward.seed + m)
    restore_fp32_trainables(peft_model)  # LoRA and head weights are float32 masters in bf16 compute too
    lean_ops.install(peft_model)  # less kept for backward (RMSNorm, SwiGLU), one addmm per LoRA linear
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    member_named = [[(n, p) for n, p in named if f".{a}." in n] for a in adapters]
    heads = [head.modules_to_save[a] if hasattr(head, "modules_to_save") else head for a in adapters]
    return RewardNet(peft_model, tok, base, head, named, shape, adapters, heads, member_named,
                     trunk.trunk_split(peft_model, adapters))


def add_member(peft_model, cfg: PipelineConfig, name: str, seed: int) -> None:
    """One more ensemble member: a LoRA adapter of reward.lora and its own score head, both drawn from
    ``seed`` (the head as transformers initialises one: normal, std initializer_range), trainable."""
    torch.manual_seed(seed)
    peft_model.add_adapter(name, loading.lora_config(cfg.reward.lora, task_type="SEQ_CLS",
                                                     model=peft_model.get_base_model()))
    head = forwards.score_head(peft_model).modules_to_save[name]
    std = getattr(loading.text_config(peft_model.get_base_model()), "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.normal_(0.0, std)
        if head.bias is not None:
            head.bias.zero_()
    for n, p in peft_model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(True)


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], rc) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: LoRA at reward.learning_rate, the score head at
    reward.head_learning_rate (default: the same)."""
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if ".score." not in n], "lr": rc.learning_rate},
         {"params": [p for n, p in named if ".score." in n], "lr": rc.head_learning_rate or rc.learning_rate}],
        weight_decay=0.0)


def fit_pair_sets(tok, cfg: PipelineConfig, train_rows: list[dict], train_report, eval_rows: list[dict],
                  eval_report) -> PairSets:
    """The loaded pairs fitted to reward.max_length by data.long_rows (cut from the left, dropped or
    refused), in training and held-out scoring alike, with the held-out pairs' gold; prints the reports."""
    rc, policy = cfg.reward, cfg.data.long_rows
    _, pairs, train_len = fit_pairs(tok, train_rows, rc.max_length, policy, "reward training pairs",
                                    train_report.row_name)
    eval_len, gold = None, None
    if eval_rows:
        kept, _, eval_len = fit_pairs(tok, eval_rows, rc.max_length, policy, "reward held-out pairs",
                                      eval_report.row_name)
        gold = _pair_gold(cfg.data.pairs_eval, eval_report.row_numbers)
        eval_rows = [eval_rows[i] for i in kept]
        gold = [gold[i] for i in kept] if gold is not None else None
    for rep in (train_len, eval_len):
        if rep is not None:
            print(f"[reward] {rep.summary()}", flush=True)
    return PairSets(pairs, train_report, train_len, eval_rows, eval_report, eval_len, gold)


def schedule(rc, n_pairs: int) -> tuple[int, int]:
    """``(optimizer steps, warm-up steps)``: reward.max_steps, or reward.epochs over ``n_pairs`` pairs at
    batch_size * grad_accum pairs a step; warm-up is reward.warmup_ratio of the steps."""
    per_step = rc.batch_size * rc.grad_accum
    steps = rc.max_steps if rc.max_steps > 0 else max(1, math.ceil(rc.epochs * n_pairs / per_step))
    return steps, round(rc.warmup_ratio * steps)


def response_lengths(pairs: list) -> list[int]:
    """Each pair's longer response in tokens (its rows' own columns after the shared prompt), the length
    a batch of pairs pads to. E.g. ((ids of 9, start 5), (ids of 7, start 5)): 4."""
    return [max(len(ids) - start for ids, start in pair) for pair in pairs]


def pair_order(n_pairs: int, gen: torch.Generator, keys: Optional[list[int]], batch: int) -> list[int]:
    """An epoch's order of ``n_pairs`` pairs drawn from the data generator ``gen``: batches of ``batch``
    pairs of similar ``keys`` (:func:`pipeline.data.batching.length_grouped_order`; reward.group_by_length)
    or, with ``keys`` None, a plain shuffle."""
    if keys is None:
        return torch.randperm(n_pairs, generator=gen).tolist()
    return batching.length_grouped_order(keys, batch, int(torch.randint(0, 2 ** 62, (1,), generator=gen)))


def start_progress(seed: int, n_pairs: int, state: Optional[dict], ckpt: Optional[Path],
                   named: list[tuple[str, torch.nn.Parameter]], optimizer, keys: Optional[list[int]] = None,
                   batch: int = 1) -> tuple[int, Progress]:
    """``(first step, Progress)``: a fresh order of ``n_pairs`` pairs by ``seed`` (:func:`pair_order`), or,
    given a checkpoint's ``state``, everything it saved put back (parameters, optimizer, both RNGs, data
    position)."""
    gen = torch.Generator().manual_seed(seed)
    progress = Progress(gen, pair_order(n_pairs, gen, keys, batch), keys=keys, batch=batch)
    if state is None:
        return 0, progress
    restore_parameters(named, state["params"], ckpt)
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["data_rng"])
    set_rng_state(state["rng"])
    progress.order, progress.cursor, progress.epoch = state["order"], state["cursor"], state["epoch"]
    progress.window, progress.losses = state["window"], state["losses"]
    print(f"[reward] resumed from {ckpt} at step {state['step']}", flush=True)
    return state["step"], progress


def save_checkpoint(checkpoints: Checkpoints, step: int, named: list[tuple[str, torch.nn.Parameter]], optimizer,
                    progress: Progress) -> Path:
    """Weights, optimizer, both RNGs and the data position after ``step`` steps, as checkpoint ``step``;
    returns its folder."""
    saved = {"params": dict(named), "optimizer": optimizer.state_dict(), "data_rng": progress.gen.get_state(),
             "rng": rng_state(), "step": step, "order": progress.order, "cursor": progress.cursor,
             "epoch": progress.epoch, "window": progress.window, "losses": progress.losses}
    return checkpoints.save(step, functools.partial(save_state, state=saved))


def set_learning_rate(optimizer, step: int, steps: int, warmup: int, kind: str) -> None:
    """Each parameter group's rate for ``step``: its initial rate times :func:`lr_at`."""
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * lr_at(step, steps, warmup, kind)


def next_batch(n_pairs: int, progress: Progress, size: int) -> list[int]:
    """Indices of the next ``size`` pairs in the shuffled order; at the end of an epoch the data generator
    draws a new order (:func:`pair_order`). Advances ``progress``."""
    batch = []
    while len(batch) < size:
        if progress.cursor == len(progress.order):
            progress.order = pair_order(n_pairs, progress.gen, progress.keys, progress.batch)
            progress.cursor, progress.epoch = 0, progress.epoch + 1
        batch.append(progress.order[progress.cursor])
        progress.cursor += 1
    return batch


@dataclass
class Perf:
    """What MFU is computed from (:mod:`pipeline.models.throughput`): the shape of the base, the trained
    extent of the adapter, this machine's measured peak; and the model FLOPs and seconds since the last log
    line and over the whole run (this process's share, after a resume)."""
    shape: Any
    lora_params: int
    trained_layers: int
    peak: float
    window_flops: float = 0.0
    window_tokens: int = 0
    window_seconds: float = 0.0
    total_flops: float = 0.0
    total_tokens: int = 0
    total_seconds: float = 0.0
    members: int = 1
    split: int = 0

    def flops(self, pairs: list, weights: Optional[torch.Tensor] = None) -> tuple[float, int]:
        """Model FLOPs and tokens of training on ``pairs`` ((chosen ids, start), (rejected ids, start)):
        each pair's prompt runs once (:func:`pipeline.models.throughput.pair_train_flops`); an ensemble
        runs the trunk once and each member only the pairs of nonzero bootstrap ``weights`` (members,
        len(pairs)) (:func:`pipeline.models.throughput.ensemble_train_flops`)."""
        counts = [(min(c[1], r[1]), len(c[0]) - min(c[1], r[1]), len(r[0]) - min(c[1], r[1])) for c, r in pairs]
        tokens = sum(sum(x) for x in counts)
        if self.members > 1:
            member_pairs = [[i for i, w in enumerate(row) if w > 0] for row in weights.tolist()]
            return (throughput.ensemble_train_flops(self.shape, counts, member_pairs, self.split, self.trained_layers,
                                                    self.lora_params // self.members), tokens)
        return throughput.pair_train_flops(self.shape, counts, self.trained_layers, self.lora_params), tokens

    def add(self, flops: float, tokens: int, seconds: float) -> None:
        self.window_flops += flops
        self.window_tokens += tokens
        self.window_seconds += seconds
        self.total_flops += flops
        self.total_tokens += tokens
        self.total_seconds += seconds

    def take_window(self) -> dict:
        """``perf/*`` of the log window (tokens/s, MFU), then an empty window."""
        row = {"perf/tokens_per_s": self.window_tokens / max(self.window_seconds, 1e-9),
               "perf/mfu": throughput.mfu(self.window_flops, self.window_seconds, self.peak)}
        self.window_flops, self.window_tokens, self.window_seconds = 0.0, 0, 0.0
        return row


def start_perf(net: RewardNet, pairs: list, cfg: PipelineConfig, steps: int) -> Perf:
    """The FLOP counter of this run, after printing the a-priori duration of its ``steps`` steps."""
    rc = cfg.reward
    lora_params, trained_layers = throughput.trained_extent(net.peft_model, net.shape.layers)
    device = next(net.peft_model.parameters()).device
    perf = Perf(net.shape, lora_params, trained_layers,
                throughput.measured_peak(loading.compute_dtype(cfg.model, device), device),
                members=len(net.adapters), split=net.split)
    all_pairs, _ = perf.flops(pairs, net.weights)  # one pass over every pair; the run takes steps x pairs per step
    per_step = all_pairs / max(len(pairs), 1) * rc.batch_size * rc.grad_accum
    print(throughput.estimate_line("reward", f"{steps} steps of {rc.batch_size * rc.grad_accum} pairs",
                                   per_step * steps, perf.peak), flush=True)
    return perf


def pair_scores(net: RewardNet, batch: list, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scores ``(chosen, rejected)`` of a batch of pairs, both sides in one forward."""
    # Both sides of a pair share their prompt: it runs once per pair (groups 0..n-1, then 0..n-1 again).
    groups = list(range(len(batch))) * 2
    feats = pooled_features(net.peft_model, [b[0] for b in batch] + [b[1] for b in batch], net.tok.pad_token_id,
                            pooling, groups)
    scores = net.head(feats).squeeze(-1)  # float32 features, float32 head (restore_fp32_trainables)
    return scores[:len(batch)], scores[len(batch):]


def train_step(net: RewardNet, optimizer, pairs: list, progress: Progress, rc, step: int, steps: int,
               warmup: int, perf: Perf) -> torch.Tensor:
    """One optimizer step (index ``step`` of ``steps``) over reward.grad_accum batches of pairs with the
    pairwise loss; records loss, accuracy and margin in ``progress`` and the step's FLOPs and time in
    ``perf``. Returns the gradient norm."""
    t0 = time.perf_counter()
    flops, tokens = 0.0, 0
    set_learning_rate(optimizer, step, steps, warmup, rc.lr_scheduler)
    for _ in range(rc.grad_accum):
        idx = next_batch(len(pairs), progress, rc.batch_size)
        batch = [pairs[i] for i in idx]
        f, n = perf.flops(batch, net.weights[:, idx] if len(net.adapters) > 1 else None)
        flops, tokens = flops + f, tokens + n
        if len(net.adapters) == 1:
            chosen, rejected = pair_scores(net, batch, rc.pooling)
            loss = pairwise_loss(chosen, rejected, rc.center_rewards_coefficient)
            check_loss(loss, step)
            (loss / rc.grad_accum).backward()
            record(progress, "", loss, chosen, rejected)
        else:
            ensemble_backward(net, batch, idx, rc, step, progress)
    groups = net.member_named if len(net.adapters) > 1 else [net.named]  # each member clipped as one model is
    grad_norm = torch.stack([torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0) for named in groups]).mean()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loading.release_free_memory()  # the step's freed activations go back to the OS
    progress.losses.append(progress.window["loss"][-1])
    perf.add(flops, tokens, time.perf_counter() - t0)
    return grad_norm


def check_loss(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise ArtifactError(f"reward step {step + 1}: loss is {loss.item()}; lower reward.learning_rate")


def record(progress: Progress, prefix: str, loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """The micro-batch's loss, accuracy and margin into the log window, under ``prefix``."""
    for k, v in (("loss", loss.item()), ("accuracy", (chosen > rejected).float().mean().item()),
                 ("margin", (chosen - rejected).mean().item())):
        progress.window.setdefault(prefix + k, []).append(v)


def ensemble_backward(net: RewardNet, batch: list, idx: list[int], rc, step: int, progress: Progress) -> None:
    """Gradients of every member on one micro-batch: the trunk below ``net.split`` runs once, then the
    members' own layers and heads, each member on only the pairs its bootstrap resample holds, its loss
    weighted by their multiplicities (:func:`trunk.take_rows`); all members' rows in one batch through
    their layers (:func:`trunk.members_hidden`; reward.ensemble_together), else one member at a time. Both sides of a pair share
    their prompt: it runs once per pair, and the system prompt the pairs share once per batch, in the
    trunk and in each member's layers (:func:`trunk.shared_trunk`, :func:`forwards.prefix_levels`). Logs
    the members' mean loss, accuracy and margin on their own resamples, and each member's loss (``m<i>/loss``)."""
    encoded = [b[0] for b in batch] + [b[1] for b in batch]
    laid, shared = trunk.shared_trunk(net.peft_model, encoded, net.tok.pad_token_id, net.split, net.adapters[0],
                                         groups=list(range(len(batch))) * 2)
    members = []  # (member, its pairs of the batch)
    for m in range(len(net.adapters)):
        keep = torch.nonzero(net.weights[m, idx] > 0).squeeze(1)
        if keep.numel():  # else this member's resample holds none of these pairs
            members.append((m, keep))
    rows = [torch.cat([keep, keep + len(batch)]) for _, keep in members]
    together = trunk.members_hidden(net.peft_model, laid, net.split, shared, [net.adapters[m] for m, _ in members],
                                    rows) if members and rc.ensemble_together else None
    total = None
    for i, (m, keep) in enumerate(members):
        if together is not None:
            hidden, m_rows = together[i]
        else:
            cut = trunk.take_rows(rows[i], laid, shared)
            if cut is None:
                cut, keep = (laid, shared), torch.arange(len(batch))
            m_rows, m_trunk = cut
            hidden = trunk.member_hidden(net.peft_model, m_rows, net.split, m_trunk, net.adapters[m])
        scores = net.heads[m](forwards.pool_hidden(hidden, m_rows.pool, m_rows.last, rc.pooling)).squeeze(-1)
        chosen, rejected = scores[:len(keep)], scores[len(keep):]
        loss = ensemble.weighted_pairwise_loss(chosen, rejected, net.weights[m, idx][keep], rc.center_rewards_coefficient)
        check_loss(loss, step)
        if together is None:  # one member's graph at a time
            (loss / rc.grad_accum).backward()
        else:
            total = loss if total is None else total + loss
        record(progress, "", loss, chosen.detach(), rejected.detach())
        progress.window.setdefault(f"m{m}/loss", []).append(loss.item())
    if total is not None:
        (total / rc.grad_accum).backward()


def log_window(logger: MetricsLogger, bar, progress: Progress, step: int, optimizer, grad_norm: torch.Tensor,
               t_train: float, perf: Perf) -> None:
    """One metrics row for ``step``: the window's means, gradient norm, rate, epoch, tokens/s and MFU;
    empties the window."""
    row = {f"reward/{k}": sum(v) / len(v) for k, v in progress.window.items()}
    logger.log({"step": step, **row, **perf.take_window(), "reward/grad_norm": float(grad_norm),
                "reward/learning_rate": optimizer.param_groups[0]["lr"],
                "reward/epoch": progress.epoch + progress.cursor / len(progress.order),
                "time/elapsed": round(time.time() - t_train, 2)}, step=step)
    bar.set_postfix(loss=f"{row['reward/loss']:.3f}", acc=f"{row['reward/accuracy']:.2f}")
    progress.window = {}


def trained_scorer(net: RewardNet, rc):
    """The scorer PPO will use, on the model just trained: its own adapter "default", or for an ensemble
    all members' mean (standardisation set by :func:`normalise_members`)."""
    if len(net.adapters) > 1:
        k = len(net.adapters)
        return EnsembleScorer(net.peft_model, net.tok, [(a, h.weight, h.bias) for a, h in zip(net.adapters, net.heads)],
                              [0.0] * k, [1.0] * k, "mean", max_length=rc.max_length, pooling=rc.pooling)
    return RewardModelScorer(net.peft_model, net.tok, net.heads[0].weight, net.heads[0].bias, adapter="default",
                             max_length=rc.max_length, pooling=rc.pooling)


def sft_responses(sft_dir: Path, data_cfg) -> tuple[list[list[dict]], list[str], str]:
    """``(conversations, responses, source)`` of the SFT policy's own samples (``sft/gold_samples.jsonl``)
    or, without them, of the data.sft_eval responses."""
    path = sft_dir / "gold_samples.jsonl"
    if path.is_file():
        rows = [r for _, r in loaders.read_rows(str(path)) if r.get("model") == "sft"]
        if len(rows) >= 3:
            return [[{"role": "user", "content": r["prompt"]}] for r in rows], [r["response"] for r in rows], str(path)
    sft_rows, _ = loaders.load_sft(data_cfg.sft_eval, **loaders.loader_options(data_cfg))
    return [r["messages"][:-1] for r in sft_rows], [r["messages"][-1]["content"] for r in sft_rows], data_cfg.sft_eval


def normalise_members(scorer: EnsembleScorer, sft_dir: Path, data_cfg) -> tuple[dict, list[float]]:
    """Each member's mean and std on the SFT policy's responses (Coste et al. 2023 normalise members
    before combining them), set on ``scorer``: ``(the manifest's record, the ensemble's scores of those
    responses)``, which the rank correlation with gold reads (:func:`held_out_metrics`) rather than run
    every member over them again."""
    convs, responses, source = sft_responses(sft_dir, data_cfg)
    raw = scorer.member_scores_ids(scorer.encode([""] * len(convs), responses, convs), progress="ensemble normalisation")
    scorer.mean = raw.double().mean(dim=1).tolist()
    scorer.std = raw.double().std(dim=1, unbiased=False).clamp(min=1e-6).tolist()
    record = {"source": source, "responses": len(responses), "mean": scorer.mean, "std": scorer.std}
    return record, scorer.combine(raw).tolist()


def member_metrics(scorer: EnsembleScorer, gold: Optional[list[tuple[float, float]]], gold_min_gap: float) -> dict:
    """Each member's held-out accuracy (``member<i>_eval_*``) from the scores of the last held-out pass."""
    details = scorer.details()
    out = {}
    for label in scorer.labels:
        for k, v in metrics_of_scores(torch.tensor(details[label]), gold, gold_min_gap).items():
            if k.startswith("accuracy") and not k.endswith("_n") and not k.endswith("min_gap"):
                out[f"{label}_eval_{k}"] = v
    return out


def spearman_on_sft_eval(scorer: RewardModelScorer, data_cfg, scores: Optional[list[float]] = None) -> float:
    """Rank correlation between the reward model and gold (VADER sentiment) on the data.sft_eval
    responses, for runs whose SFT stage left no samples of its own (``scores``: the scorer's, where
    already computed)."""
    from reward.registry import build_reward

    sft_rows, _ = loaders.load_sft(data_cfg.sft_eval, **loaders.loader_options(data_cfg))
    convs = [r["messages"][:-1] for r in sft_rows]
    responses = [r["messages"][-1]["content"] for r in sft_rows]
    learned = scores if scores is not None else scorer([""] * len(convs), responses, prompt_messages=convs)
    gold = build_reward("sentiment")([c[-1]["content"] for c in convs], responses).total
    return spearman(learned, gold)


def held_out_metrics(scorer: RewardModelScorer, pairs: PairSets, cfg: PipelineConfig, sft_dir: Path,
                     sft_scores: Optional[list[float]] = None) -> dict:
    """Held-out pair accuracy and margin (``eval_*``), and the rank correlation with gold on the SFT
    policy's samples (or, without them, on data.sft_eval); ``sft_scores``: the scorer's scores of those
    responses (:func:`sft_responses`' order) where the ensemble's normalisation already computed them."""
    metrics: dict = {}
    if pairs.eval_rows:
        held = pair_metrics(scorer, pairs.eval_rows, pairs.gold, cfg.reward.gold_min_gap,
                            progress="reward held-out pairs")
        metrics.update({f"eval_{k}": v for k, v in held.items()})
        if isinstance(scorer, EnsembleScorer):
            metrics.update(member_metrics(scorer, pairs.gold, cfg.reward.gold_min_gap))
    on_sft = spearman_on_sft_samples(scorer, sft_dir, sft_scores)
    if on_sft is not None:
        metrics.update(on_sft)
    elif cfg.data.sft_eval:
        metrics["spearman_vs_gold_sft_eval"] = spearman_on_sft_eval(scorer, cfg.data, sft_scores)
    return metrics


def write_outputs(work: Path, cfg: PipelineConfig, net: RewardNet, pairs: PairSets, metrics: dict,
                  normalization: Optional[dict] = None) -> None:
    """Adapter (LoRA + score head; an ensemble's member i > 0 in ``member<i>/``), tokenizer, config and
    manifest (last) into ``work``."""
    net.peft_model.save_pretrained(work)
    net.tok.save_pretrained(work)
    dc = cfg.data
    write_manifest(work, "reward", cfg, net.base, metrics,
                   data={"train": loaders.manifest_entry(dc.pairs_train, pairs.train_report, dc.split, pairs.train_len),
                         "eval": loaders.manifest_entry(dc.pairs_eval, pairs.eval_report, dc.split, pairs.eval_len)
                         if pairs.eval_report else {"source": dc.pairs_eval}},
                   extra={"pooling": cfg.reward.pooling,
                          **({"ensemble": {"members": len(net.adapters), "folders": ["."] + net.adapters[1:],
                                           "trunk_split": net.split, "bootstrap": True,
                                           "normalization": normalization}} if len(net.adapters) > 1 else {})})


def print_summary(metrics: dict, gold_min_gap: float, out: Path) -> None:
    """The stage's closing lines: time, output folder, held-out accuracies and rank correlations."""
    print(f"[reward] done in {metrics['wall_seconds']}s -> {out}", flush=True)
    if "eval_accuracy" in metrics:
        print(f"[reward] held-out accuracy vs labels {metrics['eval_accuracy']:.3f} ± "
              f"{metrics['eval_accuracy_se']:.3f} (n={metrics['eval_accuracy_n']}), margin {metrics['eval_margin']:.3f}",
              flush=True)
    if "eval_accuracy_vs_gold" in metrics:
        print(f"[reward] held-out accuracy vs gold {metrics['eval_accuracy_vs_gold']:.3f} ± "
              f"{metrics['eval_accuracy_vs_gold_se']:.3f} (n={metrics['eval_accuracy_vs_gold_n']} pairs whose gold "
              f"differs by >= {gold_min_gap})", flush=True)
    for k in ("spearman_vs_gold_sft_samples", "spearman_vs_gold_sft_eval"):
        if k in metrics:
            print(f"[reward] {k}: {metrics[k]:.3f}", flush=True)


# ---------------------------------------------------------------------------------------------
# Stage


def run_reward(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Train the reward model of ``cfg.reward`` into ``RUN/reward`` (resumable from RUN/reward.work with
    ``resume``); returns ``RUN/reward``."""
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
    train_rows, train_report, eval_rows, eval_report = load_pair_rows(cfg.data)

    # 2. model: NF4 base + LoRA (top layers) + a linear score head, as one peft SEQ_CLS adapter
    net = build_reward_model(cfg)
    optimizer = build_optimizer(net.named, rc)
    trainable, total = loading.count_parameters(net.peft_model)
    print(f"[reward] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
          f"pooling {rc.pooling}", flush=True)

    # 3. the pairs fitted to reward.max_length (the tokenizer came with the model), and the schedule
    pairs = fit_pair_sets(net.tok, cfg, train_rows, train_report, eval_rows, eval_report)
    steps, warmup = schedule(rc, len(pairs.train))
    if len(net.adapters) > 1:  # member m's bootstrap resample of the pairs, as multiplicities (same on resume)
        net.weights = torch.stack([ensemble.bootstrap_weights(len(pairs.train), rc.seed + m)
                                   for m in range(len(net.adapters))])
        print(f"[reward] ensemble of {len(net.adapters)} members (seeds {rc.seed}..{rc.seed + len(net.adapters) - 1}, "
              f"bootstrap resamples of the pairs); decoder layers below {net.split} run once for all", flush=True)
    perf = start_perf(net, pairs.train, cfg, steps)

    # 4. resume: shuffled pair order from reward.seed, or everything a checkpoint saved
    t_train = time.time()
    start, progress = start_progress(rc.seed, len(pairs.train), state, ckpt, net.named, optimizer,
                                     response_lengths(pairs.train) if rc.group_by_length else None, rc.batch_size)
    state = None  # the parameters and the optimizer hold it now
    logger = MetricsLogger(work / "metrics.jsonl", work / "tensorboard" if rc.tensorboard else None,
                           resume_step=start if ckpt is not None else None)

    # 5. train: shuffled batches of pairs, chosen and rejected rows in one forward; a checkpoint every save_steps
    net.peft_model.train()
    bar = tqdm(range(start, steps), desc="reward", unit="step", initial=start, total=steps)
    guard.graceful_stop(True)  # SIGINT/SIGTERM from here on: finish the step, save it, stop
    for step in bar:
        grad_norm = train_step(net, optimizer, pairs.train, progress, rc, step, steps, warmup, perf)
        if (step + 1) % rc.logging_steps == 0 or step + 1 == steps:
            log_window(logger, bar, progress, step + 1, optimizer, grad_norm, t_train, perf)
        guard.end_of_step("reward", step + 1, steps, rc.save_steps,
                          functools.partial(save_checkpoint, stage.checkpoints, step + 1, net.named, optimizer,
                                            progress))
    guard.graceful_stop(False)
    net.peft_model.eval()
    metrics: dict = {"trainable_params": trainable, "total_params": total, "steps": steps,
                     "train_loss": sum(progress.losses) / len(progress.losses),
                     "train_seconds": round(time.time() - t_train, 1),
                     # this process's steps (after a resume, those since it)
                     "train_tokens_per_second": round(perf.total_tokens / max(perf.total_seconds, 1e-9), 1),
                     "train_mfu": throughput.mfu(perf.total_flops, perf.total_seconds, perf.peak),
                     "peak_flops_per_s": perf.peak, **pairs.train_len.metrics("train"),
                     **(pairs.eval_len.metrics("eval") if pairs.eval_len else {})}

    # 6. held-out accuracy and margin, with the same scorer PPO will use; rank correlation with gold.
    #    An ensemble's members are first standardised on the SFT policy's responses.
    scorer, normalization, sft_scores = trained_scorer(net, rc), None, None
    if len(net.adapters) > 1:
        normalization, sft_scores = normalise_members(scorer, Path(run_dir) / "sft", cfg.data)
    metrics.update(held_out_metrics(scorer, pairs, cfg, Path(run_dir) / "sft", sft_scores))
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    logger.log({"step": steps, **{f"reward/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
    logger.close()

    # 7. save: adapter (LoRA + score head) + tokenizer + config + manifest (last), then RUN/reward.work -> RUN/reward
    write_outputs(work, cfg, net, pairs, metrics, normalization)
    stage.publish()
    print_summary(metrics, rc.gold_min_gap, out)
    return out
