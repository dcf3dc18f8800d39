"""``fuse.method: learned``: train a per-layer, per-token gate over the frozen stage adapters.

The gate (pipeline/fusion/gating.py) starts where the stacked adapters are (SFT + PPO: the trained policy)
and is the only thing that trains. Objective: token cross-entropy on a mixture of

* the policy's own samples, reward-ranked: for each of ``fuse.prompts`` training prompts,
  ``fuse.samples_per_prompt`` responses from the stacked model at ``ppo.temperature``, scored by
  ``ppo.rewards`` (the proxy PPO optimised), the best one kept. This is reward-ranked fine-tuning
  (RAFT, Dong et al. 2023, arXiv 2304.06767; ReST, Gulcehre et al. 2023): a policy-improvement
  step that needs no value model and no fresh rollouts while it trains;
* ``fuse.sft_rows`` SFT conversations (``data.sft_train``), so the gate keeps what the SFT adapter
  was for (DESIGN.md 10: SFT data alone pulls the gate back to the SFT adapter).

Why this and not a KL-regularised reward objective against the stacked model: that is an RL run of
its own (rollouts every step, a baseline, a KL coefficient to tune) for ~300k parameters whose
start already is the PPO policy; RAFT uses the same reward with one sampling pass, and the
cross-entropy on the policy's own samples keeps the gate near the stacked model by construction.

Steps of :func:`train_learned` (inside RUN/fused, which run_fuse writes atomically, manifest last;
run_fuse has loaded the base and the source adapters as one PeftModel)::

    1. gates at zero over the source adapters
    2. check: the zero gate reproduces the stacked adapters
    3. training rows: reward-ranked policy samples + SFT conversations
    4. train the gates (AdamW), JSONL metrics per step
    5. check: the gates are finite; frozen tensors unchanged
    6. mean gate per module -> adapter/ (a weighted LoRA adapter, labelled an approximation);
       KL per token of that approximation, and of the stacked model, to the learned fusion
    7. save the fusion; reload it into fresh slots and compare logits
    8. plot of the mean gate by layer; metrics
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.artifacts.outputs import MetricsLogger
from pipeline.config import substitute_run_dir
from pipeline.data import loaders
from pipeline.fusion import gating
from pipeline.fusion.lora_state import FuseError, cat_lora, load_lora_state, save_lora
from pipeline.models import forwards, lean_ops, loading, stacking
from pipeline.models.reward_model import load_reward_scorer
from pipeline.rl import rollout

# Max |logit| difference allowed between the zero gate and the stacked adapters. The gated layer adds
# the adapters in peft's order and dtype (gating.mix_deltas), so the two agree to float round-off of
# the base layer's own call (0 measured on the tiny model and the embedded one in bf16).
INIT_TOLERANCE = 1e-3
PLOT_FILE = "gate_weights.png"


# ---------------------------------------------------------------------------------------------
# Training rows


def sft_row(tok, messages: list[dict], max_length: int) -> Optional[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` of an SFT conversation: the prompt is every turn before the last
    assistant turn (with the generation prompt), the response the rest of the templated conversation,
    cut to ``max_length`` tokens in all. None when the template does not extend the prompt."""
    prompt = rollout.prompt_ids(tok, messages[:-1])
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    if hasattr(full, "input_ids"):
        full = full["input_ids"]
    full = list(full)
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        return None
    response = full[len(prompt):]
    return prompt, response[:max(1, max_length - len(prompt))]


def best_per_prompt(scores: list[float], k: int) -> list[int]:
    """Index of the highest score in each consecutive group of ``k`` (first of equals)."""
    return [g * k + max(range(k), key=lambda j: scores[g * k + j]) for g in range(len(scores) // k)]


def _policy_rows(peft_model, tok, fusion_, slots, cfg, reward_fn, stop_ids) -> tuple[list, dict]:
    """Reward-ranked samples of the stacked model (the fusion at its zero start)."""
    from tqdm.auto import tqdm

    fc, pc = cfg.fuse, cfg.ppo
    prompts, report = loaders.load_prompts(cfg.data.prompts_train, **loaders.loader_options(cfg.data))
    prompts, encoded, _ = rollout.fit_prompts(tok, prompts, report, pc.max_prompt_length, cfg.data.long_rows,
                                              "fuse prompts")
    order = list(range(len(encoded)))
    random.Random(fc.seed).shuffle(order)
    order = order[:fc.prompts]
    k = fc.samples_per_prompt
    rows = [(i, j) for i in order for j in range(k)]
    texts, responses, queries = [], [], []
    batch = max(fc.batch_size, 32)  # sampling amortises the 4-bit dequantisation over more rows
    # At the zero gate the fusion is the stacked adapters exactly, so its samples come from merged dense
    # weights (2x faster on CPU, ppo.rollout_weights) with every source adapter active.
    merged = stacking.sample_from_merged(peft_model, pc.rollout_weights, pc.rollout_merge_max_gb,
                                       loading.compute_dtype(cfg.model, next(peft_model.parameters()).device))
    with stacking.active_adapters(peft_model, list(slots)), \
            (stacking.merged_linear_weights(peft_model) if merged else gating.gated(peft_model, fusion_, slots)):
        for b, s in enumerate(tqdm(range(0, len(rows), batch), desc="fuse: sample", leave=False)):
            chunk = rows[s:s + batch]
            q, qm = forwards.left_pad([encoded[i] for i, _ in chunk], tok.pad_token_id)
            r, m, _ = rollout.generate(peft_model, tok, q, qm, pc.max_new_tokens, pc.temperature, stop_ids,
                                       generator_seed=fc.seed * 1000 + b)
            for row in range(len(chunk)):
                ids = r[row][m[row].bool()].tolist()
                responses.append(ids)
                queries.append(encoded[chunk[row][0]])
            texts += rollout.decode_responses(tok, r, m)
    scores: list[float] = []
    for s in range(0, len(texts), 16):
        msgs = [prompts[i]["prompt"] for i, _ in rows[s:s + 16]]
        scores += list(reward_fn([mm[-1]["content"] for mm in msgs], texts[s:s + 16], prompt_messages=msgs,
                                 response_ids=responses[s:s + 16], tokenizer=tok).total)
    best = [b for b in best_per_prompt(scores, k) if responses[b]]
    mean_all = sum(scores) / max(1, len(scores))
    mean_best = sum(scores[b] for b in best) / max(1, len(best))
    stats = {"prompts": len(order), "samples": len(rows), "kept": len(best), "proxy_mean_all": mean_all,
             "proxy_mean_kept": mean_best}
    return [("policy", queries[b], responses[b]) for b in best], stats


def _sft_rows(tok, cfg) -> tuple[list, dict]:
    fc = cfg.fuse
    if fc.sft_rows == 0:
        return [], {"rows": 0}
    rows, _ = loaders.load_sft(cfg.data.sft_train, **loaders.loader_options(cfg.data))
    order = list(range(len(rows)))
    random.Random(fc.seed + 1).shuffle(order)
    out, skipped = [], 0
    for i in order:
        if len(out) == fc.sft_rows:
            break
        pair = sft_row(tok, rows[i]["messages"], cfg.sft.max_length)
        if pair is None:
            skipped += 1
            continue
        out.append(("sft", pair[0], pair[1]))
    return out, {"rows": len(out), "skipped_template": skipped, "source": cfg.data.sft_train}


def _batches(rows: list, size: int, seed: int, epoch: int) -> list[list]:
    order = list(range(len(rows)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return [[rows[i] for i in order[s:s + size]] for s in range(0, len(order), size)]


def _pad(batch: list, pad_id: int):
    q, qm = forwards.left_pad([b[1] for b in batch], pad_id)
    width = max(len(b[2]) for b in batch)
    r = torch.full((len(batch), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(batch), width))
    for i, b in enumerate(batch):
        r[i, :len(b[2])] = torch.tensor(b[2])
        m[i, :len(b[2])] = 1
    return q, qm, r, m


# ---------------------------------------------------------------------------------------------
# Measurements


def _logits(peft_model, batch: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits at the response positions of ``batch`` (N real tokens, V) and the targets (N,)."""
    q, qm, r, m = (t.to(device) for t in _pad(batch, pad_id))
    out = forwards.forward_response(peft_model, q, qm, r, m, 1.0, with_hidden=True)
    head = forwards.output_head(peft_model)
    with loading.compute_context(peft_model):
        logits = head(out.hidden)
    keep = m.bool()
    return logits[keep].float(), r[keep]


def per_token_kl(peft_model, rows: list, pad_id: int, device, first, second, batch_size: int) -> float:
    """Mean over response tokens of KL(first || second) over the vocabulary; ``first``/``second`` are
    zero-argument context-manager factories that put the model in each state."""
    from pipeline.evaluation.forgetting import token_nll_and_kl

    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            with first():
                p, targets = _logits(peft_model, batch, pad_id, device)
            with second():
                q, _ = _logits(peft_model, batch, pad_id, device)
            _, kl = token_nll_and_kl(p, q, targets)
            total += float(kl.double().sum())
            n += kl.numel()
    return total / max(1, n)


def frozen_digest(peft_model, slots: list[str]) -> str:
    """sha256 over every tensor that must not change while the gates train: the LoRA weights of the
    adapters in ``slots`` and the base's weights (packed NF4 bytes and quantization state), in name
    order. Other adapters (a reward model attached meanwhile) and the gates are left out."""
    h = hashlib.sha256()
    for name, t in sorted(peft_model.state_dict().items()):
        if name.startswith("fusion.") or ("lora_" in name and not any(f".{s}." in name for s in slots)):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_means(mean_gates: dict[str, list[float]], modules: dict[str, list[str]], adapters: list[str]) -> dict:
    """``{adapter: [mean gate weight per decoder layer]}``: each layer's modules averaged (modules
    without that adapter skipped); layers found from ``layers.<i>.`` in the module path."""
    per: dict[int, dict[str, list[float]]] = {}
    for path, weights in mean_gates.items():
        m = re.search(r"layers\.(\d+)\.", path)
        layer = int(m.group(1)) if m else -1
        for name, w in zip(modules[path], weights):
            per.setdefault(layer, {}).setdefault(name, []).append(w)
    layers = sorted(per)
    return {"layers": layers,
            **{a: [sum(per[lyr][a]) / len(per[lyr][a]) if a in per[lyr] else None for lyr in layers]
               for a in adapters}}


def plot_gates(means: dict, adapters: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    for a in adapters:
        ax.plot(means["layers"], [math.nan if v is None else v for v in means[a]], "-o", ms=3, label=a)
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":", label="start (stacked)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean gate weight (tokens of the training rows)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The method's steps


@dataclass
class TrainingRows:
    """The gate's training rows, each ``(kind, prompt ids, response ids)``: the reward-ranked ``policy``
    samples and the ``sft`` conversations, what each source gave (``*_stats``, for the manifest), and
    the seconds it took to make them."""
    policy: list
    policy_stats: dict
    sft: list
    sft_stats: dict
    seconds: float


def attach_gates(peft_model, slots: list[str], device, dtype) -> gating.Fusion:
    """A gate over the adapters ``slots`` on every module they share, at zero (the stacked adapters),
    registered on ``peft_model`` as ``fusion`` and the only thing with gradients."""
    fuse_ = gating.for_model(peft_model, slots).to(device)
    peft_model.fusion = fuse_  # registered, so frozen_digest can tell its tensors apart
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for p in fuse_.parameters():
        p.requires_grad_(True)
    print(f"[fuse] learned gate over {slots}: {len(fuse_.paths)} modules, {gate_parameters(fuse_):,} trainable "
          f"parameters, compute {str(dtype).removeprefix('torch.')}", flush=True)
    return fuse_


def gate_parameters(fuse_) -> int:
    """How many numbers the gates hold."""
    return sum(p.numel() for p in fuse_.parameters())


def check_zero_gate(peft_model, fuse_, slots: list[str], probe_ids: torch.Tensor, stacked_logits: torch.Tensor,
                    dtype) -> float:
    """Max |logit| difference on ``probe_ids`` between the gated model at its start and ``stacked_logits``;
    raises FuseError over INIT_TOLERANCE."""
    with torch.no_grad(), gating.gated(peft_model, fuse_, slots):
        init_logits = peft_model(input_ids=probe_ids).logits.float().cpu()
    init_diff = float((init_logits - stacked_logits).abs().max())
    if init_diff > INIT_TOLERANCE:
        raise FuseError(f"the zero gate differs from the stacked adapters by {init_diff:.3g} logits "
                        f"(> {INIT_TOLERANCE} in {dtype}): the gated layers do not compute what peft does")
    return init_diff


def training_rows(cfg, run_dir: Path, peft_model, tok, base, fuse_, slots: list[str]) -> TrainingRows:
    """Reward-ranked samples of the stacked model (fuse.prompts, scored by ppo.rewards with a learned
    reward model attached to this base) and fuse.sft_rows SFT conversations; raises FuseError if none."""
    from reward.registry import build_reward

    fc = cfg.fuse
    t0 = time.time()
    context = {"load_reward_model": lambda path, **kw: load_reward_scorer(path, host=(peft_model, tok, base), **kw)}
    policy_rows, policy_stats = [], {"prompts": 0}
    if fc.prompts:
        reward_fn = build_reward(substitute_run_dir(cfg.ppo.rewards, run_dir), context=context)
        policy_rows, policy_stats = _policy_rows(peft_model, tok, fuse_, slots, cfg, reward_fn,
                                                 rollout.stop_token_ids(tok, peft_model))
    sft_rows, sft_stats = _sft_rows(tok, cfg)
    if not policy_rows + sft_rows:
        raise FuseError("no training rows: fuse.prompts and fuse.sft_rows gave nothing usable")
    seconds = time.time() - t0
    print(f"[fuse] training rows: {len(policy_rows)} reward-ranked policy samples (best of "
          f"{fc.samples_per_prompt}; proxy {policy_stats.get('proxy_mean_kept', float('nan')):.3f} kept vs "
          f"{policy_stats.get('proxy_mean_all', float('nan')):.3f} all) + {len(sft_rows)} SFT conversations "
          f"({seconds:.0f} s)", flush=True)
    return TrainingRows(policy_rows, policy_stats, sft_rows, sft_stats, seconds)


def gate_optimizer(fuse_, fc, n_rows: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """``(AdamW over the gates at fuse.learning_rate, its linear decay to 0 at the last step, total steps)`` for
    fuse.epochs over ``n_rows`` rows in batches of fuse.batch_size."""
    optimizer = torch.optim.AdamW(fuse_.parameters(), lr=fc.learning_rate, weight_decay=0.0)
    total = fc.epochs * math.ceil(n_rows / fc.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total)))
    return optimizer, scheduler, total


def gate_step(peft_model, fuse_, optimizer, scheduler, batch: list, micro_batch_size: int, pad_id: int,
              device) -> tuple[float, torch.Tensor, dict]:
    """One optimizer step of the gates on ``batch`` (run inside ``gating.gated``): token cross-entropy on
    the responses. Returns ``(mean loss per token, gradient norm, {kind: [loss sum, tokens]})``."""
    optimizer.zero_grad(set_to_none=True)
    # token-mean over the whole batch, accumulated over micro-batches: the same gradient with
    # a fraction of the activations kept for backward
    tokens = float(sum(len(b[2]) for b in batch))
    sums = {"policy": [0.0, 0], "sft": [0.0, 0]}
    micro = micro_batch_size or len(batch)
    for s in range(0, len(batch), micro):
        part = batch[s:s + micro]
        q, qm, r, m = (t.to(device) for t in _pad(part, pad_id))
        logp = forwards.forward_response(peft_model, q, qm, r, m, 1.0).logprobs
        nll = -(logp.float() * m)
        (nll.sum() / tokens).backward()
        per_row = nll.detach().sum(1)
        for i, b in enumerate(part):
            sums[b[0]][0] += float(per_row[i])
            sums[b[0]][1] += len(b[2])
    loss = sum(v[0] for v in sums.values()) / tokens
    grad_norm = torch.nn.utils.clip_grad_norm_(fuse_.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    loading.release_free_memory()  # glibc keeps a forward/backward's freed pages (as in PPO's loop)
    return loss, grad_norm, sums


def step_metrics(step: int, epoch: int, loss: float, grad_norm: torch.Tensor, lr: float, sums: dict,
                 t_step: float) -> dict:
    """The metrics row of one gate step (``sums`` from :func:`gate_step`, ``t_step`` its start time)."""
    row = {"fuse/step": step, "fuse/epoch": epoch, "fuse/loss": loss, "fuse/grad_norm": float(grad_norm),
           "fuse/lr": lr, "time/step_seconds": time.time() - t_step}
    row.update({f"fuse/loss_{kind}": v[0] / v[1] for kind, v in sums.items() if v[1]})
    return row


def check_after_training(peft_model, fuse_, slots: list[str], frozen_before: str) -> str:
    """Freeze the trained gates and return the digest of the frozen tensors; raises FuseError when a gate
    parameter is not finite or the digest differs from ``frozen_before``."""
    if not all(torch.isfinite(p).all() for p in fuse_.parameters()):
        raise FuseError("the gate parameters are not finite after training: lower fuse.learning_rate")
    fuse_.requires_grad_(False)
    frozen_after = frozen_digest(peft_model, slots)
    if frozen_after != frozen_before:
        raise FuseError("an adapter or base tensor changed while the gates trained (it must not)")
    return frozen_after


def measure_mean_gates(peft_model, fuse_, slots: list[str], rows: list, batch_size: int, pad_id: int,
                       device) -> dict[str, list[float]]:
    """``{module path: [mean gate weight per adapter]}`` over the response tokens of ``rows``."""
    with torch.no_grad(), gating.gated(peft_model, fuse_, slots), fuse_.recording():
        for s in range(0, len(rows), batch_size):
            q, qm, r, m = (t.to(device) for t in _pad(rows[s:s + batch_size], pad_id))
            fuse_.token_mask(torch.cat([torch.zeros_like(qm, dtype=m.dtype), m], 1))
            forwards.forward_response(peft_model, q, qm, r, m, 1.0)
        return fuse_.mean_gates()


def write_mean_gate_adapter(sources: list, fuse_, mean_gates: dict[str, list[float]], base_path: str,
                            out_dir: Path) -> None:
    """The sources concatenated into one LoRA adapter with each module weighted by its mean gate (0 where
    a module has no gate for an adapter), saved to ``out_dir``: the fusion as a plain adapter, approximately."""
    names = [s.name for s in sources]
    full_weights = {path: [mean_gates[path][g.adapters.index(a)] if a in g.adapters else 0.0 for a in names]
                    for path, g in fuse_.items()}
    config, state = cat_lora([s.config for s in sources], [load_lora_state(s.path) for s in sources],
                             [1.0] * len(sources), base_path, module_weights=full_weights)
    save_lora(out_dir, config, state)


def mean_gate_kl(peft_model, fuse_, slots: list[str], adapter_dir: Path, rows: list, pad_id: int, device,
                 batch_size: int) -> tuple[float, float]:
    """KL per response token on ``rows`` from the learned fusion to the mean-gate adapter in
    ``adapter_dir`` (loaded for the measurement, then removed) and to the stacked adapters."""
    peft_model.load_adapter(str(adapter_dir), adapter_name="mean_gate", is_trainable=False)
    peft_model.eval()
    learned = functools.partial(gating.gated, peft_model, fuse_, slots)
    folded = functools.partial(stacking.active_adapters, peft_model, ["mean_gate"])
    stacked = functools.partial(stacking.active_adapters, peft_model, slots)
    kl_mean_gate = per_token_kl(peft_model, rows, pad_id, device, learned, folded, batch_size)
    kl_stacked = per_token_kl(peft_model, rows, pad_id, device, learned, stacked, batch_size)
    peft_model.delete_adapter("mean_gate")
    return kl_mean_gate, kl_stacked


def mean_per_adapter(means: dict, adapters: list[str]) -> dict[str, float]:
    """``{adapter: mean over layers}`` of :func:`layer_means`' output (layers without it left out)."""
    return {a: sum(v for v in means[a] if v is not None) / max(1, sum(v is not None for v in means[a]))
            for a in adapters}


def check_reload(peft_model, fuse_, slots: list[str], folder: Path, probe_ids: torch.Tensor) -> float:
    """Max |logit| difference on ``probe_ids`` between the trained fusion and the one saved in ``folder``
    reloaded into fresh slots (removed after); raises FuseError unless it is exactly 0."""
    with torch.no_grad(), gating.gated(peft_model, fuse_, slots):
        trained_logits = peft_model(input_ids=probe_ids).logits.float().cpu()
    reloaded, reloaded_slots = gating.attach(peft_model, folder, prefix="reload_")
    with torch.no_grad(), gating.gated(peft_model, reloaded, reloaded_slots):
        reload_logits = peft_model(input_ids=probe_ids).logits.float().cpu()
    for s in reloaded_slots:
        peft_model.delete_adapter(s)
    reload_diff = float((reload_logits - trained_logits).abs().max())
    if reload_diff != 0.0:
        raise FuseError(f"the saved fusion reloads with logits {reload_diff:.3g} away from the trained one")
    return reload_diff


# ---------------------------------------------------------------------------------------------
# The method (called by pipeline.stages.fuse.run_fuse inside its atomic output folder)


def train_learned(cfg, run_dir: Path, sources: list, peft_model, tok, base, tmp: Path, probe_ids: torch.Tensor,
                  stacked_logits: torch.Tensor) -> dict:
    """Train the gates over ``sources`` (loaded in ``peft_model`` under their names) and write the fusion
    into ``tmp``; returns the metrics. ``stacked_logits``: the stacked adapters on ``probe_ids``."""
    from tqdm.auto import tqdm

    fc = cfg.fuse
    device = next(peft_model.parameters()).device
    dtype = peft_model.get_input_embeddings().weight.dtype
    pad_id = tok.pad_token_id
    slots = [s.name for s in sources]
    torch.manual_seed(fc.seed)

    # 1. gates at zero: the fusion starts as the stacked adapters
    fuse_ = attach_gates(peft_model, slots, device, dtype)
    frozen_before = frozen_digest(peft_model, slots)

    # 2. check: the zero gate reproduces the stacked adapters
    init_diff = check_zero_gate(peft_model, fuse_, slots, probe_ids, stacked_logits, dtype)
    if cfg.ppo.lean_ops:  # bit-identical forwards that keep less for backward (RMSNorm, SwiGLU), as in PPO
        lean_ops.install(peft_model, lora=False)

    # 3. training rows: reward-ranked policy samples + SFT conversations
    data = training_rows(cfg, run_dir, peft_model, tok, base, fuse_, slots)
    rows = data.policy + data.sft

    # 4. train the gates: token cross-entropy on the rows, reshuffled each epoch by fuse.seed
    optimizer, scheduler, total = gate_optimizer(fuse_, fc, len(rows))
    logger = MetricsLogger(tmp / "metrics.jsonl", None)
    step = 0
    bar = tqdm(total=total, desc="fuse: gate")
    t_train = time.time()
    with gating.gated(peft_model, fuse_, slots):
        for epoch in range(fc.epochs):
            for batch in _batches(rows, fc.batch_size, fc.seed, epoch):
                t_step = time.time()
                loss, grad_norm, sums = gate_step(peft_model, fuse_, optimizer, scheduler, batch,
                                                  fc.micro_batch_size, pad_id, device)
                step += 1
                logger.log(step_metrics(step, epoch, loss, grad_norm, scheduler.get_last_lr()[0], sums, t_step),
                           step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    logger.close()
    train_seconds = time.time() - t_train

    # 5. check: finite gates; the adapters and the base untouched
    frozen_after = check_after_training(peft_model, fuse_, slots, frozen_before)

    # 6. mean gate -> a weighted LoRA adapter (approximation); how far it and the stacked model are from the fusion
    mean_gates = measure_mean_gates(peft_model, fuse_, slots, rows, fc.batch_size, pad_id, device)
    write_mean_gate_adapter(sources, fuse_, mean_gates, base.path, tmp / "adapter")
    kl_mean_gate, kl_stacked = mean_gate_kl(peft_model, fuse_, slots, tmp / "adapter", data.policy or rows, pad_id,
                                            device, fc.batch_size)

    # 7. save; reload into fresh slots and compare logits
    means = layer_means(mean_gates, {p: g.adapters for p, g in fuse_.items()}, slots)
    overall = mean_per_adapter(means, slots)
    gating.save(fuse_, tmp, [s.path for s in sources],
                extra={"mean_gate": mean_gates, "mean_gate_by_layer": means,
                       "approximation": "adapter/ = the mean gate per module folded into one LoRA adapter"})
    reload_diff = check_reload(peft_model, fuse_, slots, tmp, probe_ids)

    # 8. plot; metrics
    plot_gates(means, slots, tmp / PLOT_FILE,
               f"learned fusion: mean gate per adapter by layer ({len(rows)} training rows)")
    del peft_model.fusion
    return {"gate_parameters": gate_parameters(fuse_), "gated_modules": len(fuse_.paths), "train_steps": step,
            "final_loss": loss, "sample_seconds": round(data.seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "max_abs_logit_diff_init_vs_stacked": init_diff, "max_abs_logit_diff_reload": reload_diff,
            "frozen_tensors_unchanged": frozen_after == frozen_before,
            "kl_per_token_mean_gate_vs_learned": kl_mean_gate, "kl_per_token_stacked_vs_learned": kl_stacked,
            **{f"mean_gate_{a}": overall[a] for a in slots},
            "policy_rows": data.policy_stats, "sft_rows": data.sft_stats}
