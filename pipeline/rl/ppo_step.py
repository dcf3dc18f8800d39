"""One step of a PPO-family run as four phases with explicit inputs and outputs:

1. :func:`sample_rollout`: sample responses to a batch of prompts from the policy (adapters active, merged
   sampling weights where they pay off);
2. :func:`score`: the rewards (what is optimised) and the monitors (what is only watched);
3. :func:`prepare`: reference logprobs, old logprobs and values (frozen for the update), per-token KL,
   advantages and returns;
4. :func:`update`: PPO epochs over shuffled minibatches, each in micro-batches.

Then :func:`step_metrics` makes the step's flat log row. The math itself is in
:mod:`pipeline.rl.ppo_math`; every ``generate`` is :func:`pipeline.rl.rollout.generate`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pipeline.models import forwards, stacking, throughput, trunk
from pipeline.rl import ppo_math, rollout
from pipeline.rl.ppo_state import StepFailed


@dataclass
class Batch:
    """One rollout on this process: ``B`` rows (``group`` samples of each prompt, prompt-major: row
    g*k + j is sample j of prompt g), query ``(B, P)`` left-padded, response ``(B, T)`` padded after the
    first stop token. ``old_logprobs`` .. ``returns`` are filled by :func:`prepare` (or by the first
    forward of :func:`update` when it sees the whole batch with the rollout's parameters)."""

    idx: list[int]  # the prompt of each row
    prompt_msgs: list[list[dict]]
    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor  # (B, T) bool, 1 on real response tokens
    ended: torch.Tensor  # (B,) bool, the response ended with a stop token
    texts: list[str]
    scores: Optional[torch.Tensor] = None  # (B,) total reward per response
    ref_logprobs: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    old_values: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None  # (B, T) per-token KL estimate on real tokens
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    shared: Optional[trunk.SharedRows] = None  # the rows' trunk below the lowest trained layer, when any
    sampled: Optional[trunk.SampledTrunk] = None  # what the sampler computed below that layer, when kept
    trunk_from_sampler: bool = False  # prepare replayed the sampler's trunk: its FLOPs are generate's, not train's

    @property
    def maskf(self) -> torch.Tensor:
        return self.mask.float()


@dataclass
class Scored:
    """The reward plugins' result (``result.total`` per row, ``result.components`` per reward) and the
    monitors' mean per component on this process."""

    result: object  # reward.registry.RewardResult
    monitored: dict[str, float]


def sample_rollout(peft_model, tok, encoded: list[list[int]], prompts: list[dict], idx: list[int],
                   policy_adapters: list[str], merged: bool, pc, stop_ids: list[int], device,
                   trunk_split: int = 0) -> Batch:
    """Sample one response per row (row i answers prompt ``idx[i]``) from the policy adapters, at
    ``pc.temperature``, top_k 0, top_p 1 (DESIGN.md 4.4). ``trunk_split`` > 0 keeps what the layers
    below it computed while sampling (:func:`rollout.sample`), for :func:`prepare` to replay."""
    query, query_mask = forwards.left_pad([encoded[i] for i in idx], tok.pad_token_id)
    weights = stacking.merged_linear_weights if merged else lambda model: contextlib.nullcontext()
    with stacking.active_adapters(peft_model, policy_adapters), weights(peft_model):
        drawn = rollout.sample(peft_model, tok, query, query_mask, pc.max_new_tokens, pc.temperature, stop_ids,
                               trunk_split=trunk_split)
    response, mask, ended = drawn.response, drawn.mask, drawn.ended
    texts = rollout.decode_responses(tok, response.cpu(), mask.cpu())
    query, query_mask, response, mask, ended = (t.to(device) for t in (query, query_mask, response, mask, ended))
    return Batch(idx, [prompts[i]["prompt"] for i in idx], query, query_mask, response, mask, ended, texts,
                 sampled=drawn.trunk)


def score(step: int, batch: Batch, reward_fn, monitor_fn, tok, pc, reduce_mean: Callable[[float], float]) -> Scored:
    """Score the rollout: ``batch.scores`` = the rewards' total (with the missing-EOS penalty), and the
    monitors' means (reduced over processes). A reward or monitor that raises is a :class:`StepFailed`."""
    last_turns = [m[-1]["content"] for m in batch.prompt_msgs]
    response, mask = batch.response.cpu(), batch.mask.cpu()
    try:
        result = reward_fn(last_turns, batch.texts, prompt_messages=batch.prompt_msgs,
                           response_ids=[r[m.bool()].tolist() for r, m in zip(response, mask)], tokenizer=tok)
    except Exception as e:
        raise StepFailed(f"step {step + 1}: {e}", "fix the reward and run again with --resume.") from e
    scores = torch.tensor(result.total, dtype=torch.float32, device=batch.query.device)
    if pc.missing_eos_penalty is not None:
        scores = ppo_math.apply_missing_eos_penalty(scores, batch.ended, pc.missing_eos_penalty)
    batch.scores = scores
    monitored: dict[str, float] = {}
    if monitor_fn is not None:
        try:
            mon = monitor_fn(last_turns, batch.texts, prompt_messages=batch.prompt_msgs)
        except Exception as e:
            raise StepFailed(f"step {step + 1}: monitor: {e}", "fix ppo.monitor and run again with --resume.") from e
        monitored = {name: reduce_mean(sum(v) / len(v)) for name, v in mon.components.items()}
        if len(mon.components) > 1:  # a gold made of weighted parts (configs/overopt.yaml) is watched whole
            monitored["total"] = reduce_mean(sum(mon.total) / len(mon.total))
    return Scored(result, monitored)


def advantages(old_logprobs, ref_logprobs, old_values, scores, maskf, kl_coef: float, pc):
    """Per-token KL, advantages and returns for one rollout: whitened GAE advantages and their returns
    for ppo (DESIGN.md 4.1, 4.8); for rloo/grpo the group estimator's advantage on every token of a
    response, and no returns (there is no value to fit). ``kl_coef`` is 0 when the KL is a loss term."""
    kl = ppo_math.kl_per_token(old_logprobs, ref_logprobs, pc.kl_estimator) * maskf
    if pc.algorithm != "ppo":
        return kl, ppo_math.critic_free_advantages(scores, kl, maskf, kl_coef, pc.samples_per_prompt,
                                                   pc.algorithm, scale_std=pc.grpo_scale_std), None
    rewards = ppo_math.per_token_rewards(scores, kl, maskf, kl_coef)
    if pc.whiten_rewards:
        rewards = ppo_math.masked_whiten(rewards, maskf, shift_mean=False)
    advantages_, returns = ppo_math.gae_advantages(rewards, old_values * maskf, maskf, pc.gamma, pc.lam)
    return kl, ppo_math.masked_whiten(advantages_, maskf), returns


def micro_size(pc) -> int:
    """Rows per forward. Every forward of a step runs on this many rows: in bf16 the same weights'
    logprobs moved by 0.063 per token between one 32-row batch and 8-row chunks (embedded model,
    measured), which put 0.14 nats of k3 KL between the policy and its own reference before any update."""
    mb_size = pc.batch_size // pc.minibatches
    return min(pc.micro_batch_size or mb_size, mb_size)


def prepare(batch: Batch, pv, peft_model, reference_adapters: Optional[list[str]], kl_coef: float, pc,
            split: int) -> None:
    """Fill the batch's reference logprobs and, unless :func:`update`'s first forward can give them (one
    minibatch in one piece), its old logprobs and values, KL, advantages and returns (all no-grad).
    First the ``split`` layers below the lowest trained one (:func:`shared_split`, 0: none) run once over
    the rows (``batch.shared``); this step's reference, old and training passes replay them."""
    micro = micro_size(pc)
    row_chunks = torch.arange(pc.batch_size, device=batch.query.device).split(micro)
    q, qm, r, m = batch.query, batch.query_mask, batch.response, batch.mask
    # The sampler computed the trunk already where it kept it (float32: its weights agree with the
    # reference's there to round-off); else it runs here, once.
    batch.shared = None
    if split > 0 and batch.sampled is not None and batch.sampled.split == split:
        batch.shared = trunk.sampled_shared_rows(peft_model, batch.sampled, q, qm, r, m)
    batch.sampled = None  # its states are in batch.shared now, or not needed
    batch.trunk_from_sampler = batch.shared is not None
    if batch.shared is None:
        batch.shared = trunk.response_trunk(peft_model, q, qm, r, m, split, reference_adapters)
    views = [_view(batch, c) for c in row_chunks]

    def reference(c, view):
        if view is not None:
            return trunk.response_forward(peft_model, view, reference_adapters, r[c], pc.temperature).logprobs
        with stacking.active_adapters(peft_model, reference_adapters):
            return forwards.forward_response(peft_model, q[c], qm[c], r[c], m[c], pc.temperature).logprobs

    with torch.no_grad():
        batch.ref_logprobs = torch.cat([reference(c, v) for c, v in zip(row_chunks, views)])
    if pc.minibatches > 1 or micro < pc.batch_size // pc.minibatches:
        with torch.no_grad():
            outs = [pv(q[c], qm[c], r[c], m[c], pc.temperature, shared=v) for c, v in zip(row_chunks, views)]
        batch.old_logprobs = torch.cat([o[0] for o in outs])
        batch.old_values = torch.cat([o[2] for o in outs]) if pc.algorithm == "ppo" else None
        batch.kl, batch.advantages, batch.returns = advantages(
            batch.old_logprobs, batch.ref_logprobs, batch.old_values, batch.scores, batch.maskf,
            kl_coef if pc.kl_in == "reward" else 0.0, pc)


def shared_split(peft_model, pv, reference_adapters: Optional[list[str]]) -> int:
    """The decoder layers below the lowest one holding a weight of the trained adapters, or of any adapter
    the reference and the policy (and value model) do not share: there the reference, the policy and
    the value model compute the same, and it does not change during the step's updates, so it runs once
    per step (:mod:`pipeline.models.trunk`). 0 (nothing shared) with LoRA in every layer, the default
    before ``ppo.lora.top_layers``, or with :data:`pipeline.models.trunk.SHARE_TRUNK` off."""
    if not trunk.SHARE_TRUNK:
        return 0
    sets = [pv.policy_adapters] + ([pv.value_adapters] if pv.value_adapters else [])
    differing = trunk.differing_adapters(reference_adapters, *sets)
    return trunk.trunk_split(peft_model, differing) if differing else 0


def _view(batch: Batch, rows: torch.Tensor) -> Optional[trunk.SharedRows]:
    """The batch's shared trunk cut to ``rows``; None where there is none (then the plain forward)."""
    return batch.shared.take(rows) if batch.shared is not None else None


def _fill_from_first_forward(batch: Batch, c, logprobs, values, kl_coef: float, pc) -> None:
    """With one minibatch in one piece the first PPO forward sees the whole batch with the rollout's
    parameters: its detached outputs are the old logprobs and values (one forward saved)."""
    batch.old_logprobs = torch.empty_like(logprobs)
    batch.old_logprobs[c] = logprobs.detach()
    if pc.algorithm == "ppo":
        batch.old_values = torch.empty_like(values)
        batch.old_values[c] = values.detach()
    batch.kl, batch.advantages, batch.returns = advantages(
        batch.old_logprobs, batch.ref_logprobs, batch.old_values, batch.scores, batch.maskf,
        kl_coef if pc.kl_in == "reward" else 0.0, pc)


def _micro_loss(batch: Batch, c, m, logprobs, values, kl_coef: float, pc):
    """The loss of micro-batch ``c`` (rows) with mask ``m``: clipped policy loss, plus the clipped value
    loss (ppo), plus the KL term when the KL is a loss term. Returns (loss, policy loss, value loss or
    None, their statistics)."""
    pg_loss, pg_stats = ppo_math.policy_loss(logprobs, batch.old_logprobs[c], batch.advantages[c], m, pc.cliprange)
    loss, vf_loss, vf_stats = pg_loss, None, {}
    if pc.algorithm == "ppo":
        vf_loss, vf_stats = ppo_math.value_loss(values, batch.old_values[c], batch.returns[c], m, pc.cliprange_value)
        loss = pg_loss + pc.vf_coef * vf_loss
    if pc.kl_in != "reward":
        kl_term = ppo_math.masked_mean(ppo_math.kl_per_token(logprobs, batch.ref_logprobs[c], pc.kl_estimator), m)
        loss = loss + kl_coef * kl_term
    return loss, pg_loss, vf_loss, {**pg_stats, **vf_stats}


def update(batch: Batch, pv_ddp, optimizer, trainable: list, accelerator, kl_coef: float, pc,
           step: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``pc.ppo_epochs`` epochs over shuffled minibatches; each minibatch in micro-batches whose losses
    are weighted by their share of the minibatch's tokens, so the accumulated gradient is that of the
    minibatch's masked mean (every loss term and statistic is a masked mean). Returns the per-minibatch
    statistics and the first minibatch's ratio, clip fraction and approx KL (DESIGN.md 4.10). A
    non-finite loss is a :class:`StepFailed` that restores the parameters."""
    micro = micro_size(pc)
    mb_size = pc.batch_size // pc.minibatches
    maskf = batch.maskf
    q, qm, r, mk = batch.query, batch.query_mask, batch.response, batch.mask
    stats: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for ppo_epoch in range(pc.ppo_epochs):
        perm = torch.randperm(pc.batch_size)
        for mb in range(pc.minibatches):
            sel = perm[mb * mb_size:(mb + 1) * mb_size].to(q.device)
            mb_tokens = maskf[sel].sum().clamp(min=1.0)
            chunks = sel.split(micro)
            row: dict[str, float] = {}
            for ci, c in enumerate(chunks):
                m = maskf[c]
                weight = m.sum() / mb_tokens
                sync = accelerator.no_sync(pv_ddp) if ci < len(chunks) - 1 else contextlib.nullcontext()
                with sync:
                    logprobs, entropy, values = pv_ddp(q[c], qm[c], r[c], mk[c], pc.temperature, with_entropy=True,
                                                       shared=_view(batch, c))
                    if batch.old_logprobs is None:
                        _fill_from_first_forward(batch, c, logprobs, values, kl_coef, pc)
                    loss, pg_loss, vf_loss, loss_stats = _micro_loss(batch, c, m, logprobs, values, kl_coef, pc)
                    if not torch.isfinite(loss):
                        raise StepFailed(f"step {step + 1}, PPO epoch {ppo_epoch + 1}: loss is {loss.item()} "
                                         f"(policy {pg_loss.item()}"
                                         f"{'' if vf_loss is None else f', value {vf_loss.item()}'})",
                                         "Lower ppo.learning_rate or check the rewards, then run with --resume.",
                                         restore=True)
                    accelerator.backward(loss * weight)
                w = float(weight)
                parts = {"policy_loss": pg_loss.item(),
                         **({} if vf_loss is None else {"value_loss": vf_loss.item()}),
                         "entropy": ppo_math.masked_mean(entropy.detach(), m).item(),
                         **{k: float(v) for k, v in loss_stats.items()}}
                for k, v in parts.items():
                    row[k] = row.get(k, 0.0) + w * v
            if pc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, pc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not first:
                first = {"first_ratio": row["ratio_mean"], "first_clipfrac": row["clipfrac"],
                         "first_approx_kl": row["approx_kl"]}
            for k, v in row.items():
                stats.setdefault(k, []).append(v)
    return stats, first


def step_metrics(step: int, batch: Batch, scored: Scored, stats: dict, first: dict, mean_kl: float, kl_coef: float,
                 lr: float, times: dict[str, float], pc, reduce_mean: Callable[[float], float]) -> dict:
    """The step's flat log row (DESIGN.md 4.11): ``ppo/*`` means over the global batch, ``time/*`` seconds."""
    maskf, scores, group = batch.maskf, batch.scores, pc.samples_per_prompt
    seq_kl = batch.kl.sum(1)
    in_reward = pc.kl_in == "reward"
    return {
        "step": step + 1,
        "ppo/kl": mean_kl,
        "ppo/kl_coef": kl_coef,
        "ppo/score": reduce_mean(scores.mean().item()),
        "ppo/rlhf_reward": reduce_mean((scores - kl_coef * seq_kl).mean().item()),
        "ppo/non_score_reward": reduce_mean((-kl_coef * seq_kl).mean().item()),
        "ppo/response_length": reduce_mean(maskf.sum(1).mean().item()),
        "ppo/eos_fraction": reduce_mean(batch.ended.float().mean().item()),
        "ppo/advantage_mean": ppo_math.masked_mean(batch.advantages, maskf).item(),
        **({"ppo/explained_variance": float(ppo_math.explained_variance(batch.old_values, batch.returns, maskf))}
           if pc.algorithm == "ppo" else {}),
        **({f"ppo/group/{k}": reduce_mean(v.item()) for k, v in
            ppo_math.group_stats(scores - (kl_coef if in_reward else 0.0) * seq_kl, group).items()}
           if group > 1 else {}),
        "ppo/lr": lr,
        **{f"ppo/{k}": reduce_mean(sum(v) / len(v)) for k, v in stats.items()},
        **{f"ppo/{k}": v for k, v in first.items()},
        **{f"ppo/score/{name}": reduce_mean(sum(v) / len(v))
           for name, v in {**scored.result.components, **scored.result.details}.items()},
        **{f"ppo/monitor/{name}": v for name, v in scored.monitored.items()},
        **{f"time/{k}": v for k, v in times.items()},
    }


def sample_rows(step: int, batch: Batch, scored: Scored, n: int) -> list[dict]:
    """The first ``n`` rows of the step as ``samples.jsonl`` records (prompt, response, score, KL, components)."""
    seq_kl = batch.kl.sum(1)
    return [{"step": step + 1, "prompt": batch.prompt_msgs[i][-1]["content"], "response": batch.texts[i],
             "score": float(batch.scores[i]), "kl": float(seq_kl[i]),
             **{f"score/{k}": v[i] for k, v in scored.result.components.items()}}
            for i in range(min(n, len(batch.texts)))]


def step_flops(prompt: list[int], response: list[int], shared: int, pc, shape, trained_layers: int,
               lora_params: int, value_adapter: bool, split: int = 0, trunk_ran: bool = True) -> tuple[float, float]:
    """``(generate, train)`` model FLOPs of one step on rows of ``prompt`` + ``response`` tokens
    (:mod:`pipeline.models.throughput`): generate is the prefill and decode of the real tokens; train is the
    reference pass, the old-logprob pass when it is separate, and ``ppo_epochs`` forward + LoRA backward
    passes (twice where a value adapter runs its own pass). The ``shared`` tokens every prompt starts with
    run once per micro-batch of each pass (prefix sharing), not once per row. With a shared trunk
    (:func:`shared_split`: ``split`` of the layers) the trunk's part of the forward, logits aside, runs
    once per step and every pass only the rest (the trunk's own prefix counted per micro-batch too: an
    upper bound by a few tokens); not at all with ``trunk_ran`` False, where the sampler's trunk served
    (:func:`prepare`; generate counts it).

    E.g. 2 of 4 layers shared, a forward of F of which G are logits: the trunk (F - G) / 2 once, and
    each of the passes F - (F - G) / 2."""
    passes = 2 if value_adapter else 1
    separate_old = pc.minibatches > 1 or micro_size(pc) < pc.batch_size // pc.minibatches
    chunks = -(-len(prompt) // micro_size(pc))
    own = [p - shared for p in prompt]
    flops_generate = throughput.generate_flops(shape, prompt, response)
    forward = throughput.sequence_flops(shape, own, response) + chunks * throughput.forward_flops(shape, shared, shared)
    train = (throughput.lora_train_flops(shape, own, response, trained_layers, lora_params)
             + chunks * (throughput.forward_flops(shape, shared, shared)
                         + throughput.lora_backward_flops(shape, shared, shared, trained_layers, lora_params)))
    trunk_part = (forward - sum(response) * 2.0 * shape.width * shape.vocab) * split / shape.layers
    return flops_generate, (trunk_part * trunk_ran + (forward - trunk_part) * (1 + passes * separate_old)
                            + pc.ppo_epochs * passes * (train - trunk_part))


def perf_metrics(batch: Batch, pc, shape, trained_layers: int, lora_params: int, times: dict[str, float],
                 peak_flops_per_s: float, value_adapter: bool, split: int = 0) -> dict:
    """The step's model FLOPs (:func:`step_flops`), tokens/s and MFU per phase. The shared prompt start is
    counted over the whole batch (micro-batches may share more: the count is a lower bound). The score
    phase's FLOPs depend on the reward plugins and are not counted."""
    prompt = [int(x) for x in batch.query_mask.sum(1).tolist()]
    response = [int(x) for x in batch.mask.sum(1).tolist()]
    lengths = batch.query_mask.sum(1)
    shared = forwards.common_prefix_length(batch.query, lengths, int(lengths.min()) - 1) if forwards.SHARE_PREFIXES else 0
    flops_generate, flops_train = step_flops(prompt, response, shared, pc, shape, trained_layers, lora_params,
                                             value_adapter, split, trunk_ran=not batch.trunk_from_sampler)
    return {"perf/flops_generate": flops_generate, "perf/flops_train": flops_train,
            "perf/tokens_per_s_generate": sum(response) / max(times["generate"], 1e-9),
            "perf/tokens_per_s_train": pc.ppo_epochs * (sum(prompt) + sum(response)) / max(times["train"], 1e-9),
            "perf/mfu_generate": throughput.mfu(flops_generate, times["generate"], peak_flops_per_s),
            "perf/mfu_train": throughput.mfu(flops_train, times["train"], peak_flops_per_s),
            "perf/mfu_step": throughput.mfu(flops_generate + flops_train, times["step"], peak_flops_per_s)}
