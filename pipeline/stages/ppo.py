"""Stage 3: PPO on a LoRA policy. One NF4 base in memory carries every role:

- policy    = base + sft adapter (frozen) + policy adapter (trained)
- reference = base + sft adapter ("reference: sft") or the bare base ("reference: base"): the same
              weights with adapters switched off, never a second model
- value     = a scalar head on the policy's hidden states ("head") or a value adapter + head ("adapter");
              none for the critic-free estimators (ppo.algorithm: rloo | grpo)
- reward    = any reward plugin; a learned reward model on the same base is one more adapter

ppo.algorithm changes only the advantage estimator (GAE over the value model, or a group baseline over
ppo.samples_per_prompt responses per prompt) and where the KL goes; the rest is one loop.
The math lives in pipeline/rl/ppo_math.py; every `generate` call in pipeline/rl/rollout.py.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.artifacts import guard, hashing
from pipeline.artifacts.checkpoints import (
    Checkpoints,
    StageWork,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
    step_name,
)
from pipeline.artifacts.outputs import (
    ArtifactError,
    MetricsLogger,
    check_same_base,
    read_manifest,
    truncate_jsonl,
    write_manifest,
)
from pipeline.config import PipelineConfig, resolve_auto, substitute_run_dir, to_dict
from pipeline.data import loaders
from pipeline.models import forwards, lean_ops, loading, stacking
from pipeline.rl import ppo_math, rollout

POLICY, VALUE, SFT = "policy", "value", "sft"
VALUE_HEAD_FILE = "value_head.safetensors"


class PPOError(RuntimeError):
    """The run stopped; the message says why and where the resumable checkpoint is."""


class PolicyValue(nn.Module):
    """The trained parts behind one ``forward`` (what DDP wraps): logprobs, entropy and values
    (None without a value model: ``with_value=False``, the critic-free estimators)."""

    def __init__(self, peft_model, hidden_size: int, policy_adapters: list[str],
                 value_adapters: Optional[list[str]], with_value: bool = True):
        super().__init__()
        self.peft_model = peft_model
        self.value_head = nn.Linear(hidden_size, 1) if with_value else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.policy_adapters = policy_adapters
        self.value_adapters = value_adapters  # None: the head reads the policy's hidden states

    def forward(self, query, query_mask, response, response_mask, temperature: float, with_entropy: bool = False):
        head_on_policy = self.value_head is not None and self.value_adapters is None
        out = forwards.forward_response(self.peft_model, query, query_mask, response, response_mask, temperature,
                                       with_entropy=with_entropy, with_hidden=head_on_policy)
        if self.value_head is None:
            return out.logprobs, out.entropy, None
        if head_on_policy:
            hidden = out.hidden
        else:
            with stacking.active_adapters(self.peft_model, self.value_adapters):
                hidden = forwards.forward_response(self.peft_model, query, query_mask, response, response_mask,
                                                  temperature, with_hidden=True).hidden
        values = self.value_head(hidden.float()).squeeze(-1)
        return out.logprobs, out.entropy, values


def _prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on any process (a signal may reach the processes at different steps)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _reduce_mean(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean").item())


def save_checkpoint(checkpoints: Checkpoints, step: int, pv: PolicyValue, optimizer, scheduler, kl_ctl, reward_fn,
                    state: dict) -> Path:
    """Everything needed to continue exactly: adapter, value parameters, optimizer, scheduler, KL
    controller, reward normalisers, RNG states and data position, as safetensors + JSON (no pickles)
    in a folder written whole, then renamed."""
    def write(folder: Path) -> None:
        stacking.save_adapter(pv.peft_model, POLICY, folder / "policy")
        if pv.value_adapters is not None:
            stacking.save_adapter(pv.peft_model, VALUE, folder / "value_adapter")
        value = {} if pv.value_head is None else {"value_head": pv.value_head.state_dict()}
        save_state(folder, {**value, "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "kl_controller": kl_ctl.state_dict(),
                            "reward": reward_fn.state_dict(), "rng": rng_state(), **state})

    return checkpoints.save(step, write)


def _advantages(old_logprobs, ref_logprobs, old_values, scores, maskf, kl_coef: float, pc):
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
    advantages, returns = ppo_math.gae_advantages(rewards, old_values * maskf, maskf, pc.gamma, pc.lam)
    return kl, ppo_math.masked_whiten(advantages, maskf), returns


def _print_samples(rows: list[dict], step: int) -> None:
    print(f"\n[ppo] samples at step {step}:", flush=True)
    print(f"  {'score':>7} {'kl':>6}  prompt -> response", flush=True)
    for r in rows:
        print(f"  {r['score']:7.3f} {r['kl']:6.2f}  {r['prompt'][:50]!r} -> {r['response'][:90]!r}", flush=True)


def run_ppo(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from pipeline.models.reward_model import load_reward_scorer
    from reward.registry import build_reward

    pc = resolve_auto(cfg).ppo
    critic, group = pc.algorithm == "ppo", pc.samples_per_prompt
    run_dir = Path(run_dir)
    device = loading.resolve_device(cfg.model.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    main_proc = accelerator.is_main_process

    # 0. where we write: RUN/ppo.work holds checkpoints; it becomes RUN/ppo when the run completes
    stage = StageWork(run_dir, "ppo")
    out, work = stage.out, stage.work
    ckpt = stage.start(overwrite, resume, main_process=main_proc, config=to_dict(cfg))
    accelerator.wait_for_everyone()
    if stage.finished:
        if main_proc:
            stage.publish(keep_checkpoints=True)
        accelerator.wait_for_everyone()
        return out
    state = load_state(ckpt) if ckpt is not None else None  # read (or refused) before any model loads
    if state is not None:
        # Checkpoints from before ppo.algorithm existed are PPO with one sample per prompt.
        written = (state.get("algorithm", "ppo"), state.get("samples_per_prompt", 1))
        if written != (pc.algorithm, group):
            raise ArtifactError(f"--resume: {ckpt} was written with ppo.algorithm={written[0]}, "
                                f"ppo.samples_per_prompt={written[1]}; this config has {pc.algorithm} and {group}. "
                                "Resume with the same settings, or pass --overwrite to start over")

    # 1. prompts
    prompts, report = loaders.load_prompts(cfg.data.prompts_train, **loaders.loader_options(cfg.data))
    if main_proc:
        print(f"[ppo] {report.summary()}", flush=True)

    # 2. one base, many adapters
    base_model, tok, base = loading.load_base(cfg.model, device=accelerator.device)
    prompts, encoded, prompt_lengths = rollout.fit_prompts(tok, prompts, report, pc.max_prompt_length,
                                                           cfg.data.long_rows, "PPO prompts")
    if main_proc:
        print(f"[ppo] {prompt_lengths.summary()}", flush=True)
    sft_dir = substitute_run_dir(pc.sft_adapter, run_dir)
    adapters: dict[str, Path] = {}
    consumed: dict = {}
    if sft_dir:
        sft_manifest = read_manifest(sft_dir)
        check_same_base(sft_manifest, base, f"SFT adapter {sft_dir}")
        adapters[SFT] = Path(sft_dir)
        consumed[SFT] = {"path": str(sft_dir), "sha256": hashing.sha256_file(Path(sft_dir) / "adapter_model.safetensors")}
    elif pc.reference == "sft":
        raise ArtifactError("ppo.reference=sft needs ppo.sft_adapter; set ppo.reference=base to anchor to the base")
    # The fresh policy (and value) adapter's init draws from the global RNG: seed it, so that the same
    # ppo.seed gives the same run however much RNG was consumed before (in-process callers, tests).
    torch.manual_seed(pc.seed)
    peft_model = stacking.stack_adapters(base_model, adapters, trainable=POLICY,
                                       new_adapter=(POLICY, loading.lora_config(pc.lora, model=base_model)))
    policy_adapters = list(adapters) + [POLICY]
    value_adapters = None
    if critic and pc.value_model == "adapter":
        peft_model.add_adapter(VALUE, loading.lora_config(pc.lora, model=base_model))
        value_adapters = list(adapters) + [VALUE]
    stacking.set_active_adapters(peft_model, policy_adapters)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(f".{POLICY}." in n or f".{VALUE}." in n)
    reference_adapters = [SFT] if pc.reference == "sft" else None
    pv = PolicyValue(peft_model, base_model.config.hidden_size, policy_adapters, value_adapters, with_value=critic)
    if pv.value_head is not None:
        pv.value_head.to(accelerator.device)
    peft_model.eval()  # no dropout anywhere, rollouts and PPO epochs alike (DESIGN.md 4.5)

    # 3. rewards: plugins by name; a learned reward model on this base attaches as one more adapter
    reward_specs = [spec if isinstance(spec, dict) else {"name": spec}
                    for spec in substitute_run_dir(pc.rewards, run_dir)]
    # A reward that hangs must stop the run like one that fails (ppo.reward_timeout, unless the spec sets its own).
    # Not for the learned reward model: it is this process's own torch forward, and under a timeout it
    # runs in a worker thread whose OpenMP team competes with the main thread's for the cores (0.72 s
    # vs 0.47 s per batch on the embedded model, measured).
    reward_specs = [{"timeout": pc.reward_timeout, **spec}
                    if pc.reward_timeout and spec.get("name") not in ("composite", "reward_model")
                    else spec for spec in reward_specs]
    reward_fn = build_reward(reward_specs, context={
        "load_reward_model": lambda path, **kw: load_reward_scorer(path, host=(peft_model, tok, base), **kw)})
    for spec in reward_specs:
        path = spec.get("args", {}).get("path")
        if path:
            consumed[f"reward:{spec.get('id', spec.get('name'))}"] = {"path": str(path)}
    # Monitors: scored and logged every step, never optimised (a gold signal to watch the proxy against).
    monitor_fn = None
    if pc.monitor:
        monitor_specs = [spec if isinstance(spec, dict) else {"name": spec}
                         for spec in substitute_run_dir(pc.monitor, run_dir)]
        monitor_fn = build_reward(monitor_specs, context={
            "load_reward_model": lambda path, **kw: load_reward_scorer(path, host=(peft_model, tok, base), **kw)})

    # 4. optimizer, schedule, KL controller
    trainable = [p for p in pv.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=pc.learning_rate, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, pc.steps)))
    kl_ctl = ppo_math.make_kl_controller(pc.kl_controller, pc.kl_coef, pc.kl_target, pc.kl_horizon)
    merge_rollout = stacking.sample_from_merged(peft_model, pc.rollout_weights, pc.rollout_merge_max_gb,
                                              loading.compute_dtype(cfg.model, accelerator.device))
    rollout_ctx = stacking.merged_linear_weights if merge_rollout else lambda model: contextlib.nullcontext()
    if pc.lean_ops:
        lean_ops.install(peft_model)  # less kept for backward (RMSNorm, SwiGLU), one addmm per LoRA linear
    t_params, t_total = loading.count_parameters(pv)
    if main_proc:
        print(f"[ppo] trainable parameters: {t_params:,} of {t_total:,}; policy adapters {policy_adapters}, "
              f"reference {reference_adapters or 'base (all adapters off)'}, "
              f"{f'value {pc.value_model}' if critic else f'{pc.algorithm}, no value model'}, "
              f"{group} samples per prompt, KL ({pc.kl_estimator}) in the {pc.kl_in}, "
              f"rollout weights {'merged' if merge_rollout else 'adapters'}", flush=True)
    pv_ddp, optimizer = accelerator.prepare(pv, optimizer)

    start_step, epoch, cursor = 0, 0, 0
    random.seed(pc.seed)
    torch.manual_seed(pc.seed + accelerator.process_index)
    if state is not None:
        stacking.load_adapter_weights(peft_model, POLICY, ckpt / "policy")
        if value_adapters is not None:
            stacking.load_adapter_weights(peft_model, VALUE, ckpt / "value_adapter")
        if pv.value_head is not None:
            pv.value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        reward_fn.load_state_dict(state["reward"])
        rng = state["rng_per_process"][accelerator.process_index] if "rng_per_process" in state else state["rng"]
        set_rng_state(rng)
        start_step, epoch, cursor = state["step"], state["epoch"], state["cursor"]
        state = None  # the optimizer's copy is all that is needed now
        if main_proc:
            print(f"[ppo] resumed from {ckpt} at step {start_step}", flush=True)

    logger = MetricsLogger(work / "metrics.jsonl", work / "tensorboard" if pc.tensorboard else None,
                           resume_step=start_step if ckpt is not None else None) if main_proc else None
    samples_path = work / "samples.jsonl"
    if main_proc and ckpt is not None:
        truncate_jsonl(samples_path, start_step)
    stop_ids = rollout.stop_token_ids(tok, base_model)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_proc = pc.batch_size
    prompts_per_proc = per_proc // group
    mb_size = per_proc // pc.minibatches

    def checkpoint(step: int, ep: int, cur: int, rng: Optional[dict] = None,
                   reward_state: Optional[dict] = None) -> Path:
        """Save the state after ``step`` completed steps. A failed step passes the RNG and reward
        state captured at its start (``rng``, ``reward_state``): resuming then redoes it exactly."""
        own_rng = rng if rng is not None else rng_state()
        rngs = [None] * world
        if world > 1:
            import torch.distributed as dist

            dist.all_gather_object(rngs, own_rng)
        else:
            rngs = [own_rng]
        path = stage.checkpoints.root / step_name(step)
        if main_proc:
            if reward_state is not None:
                current = reward_fn.state_dict()
                reward_fn.load_state_dict(reward_state)
            try:
                save_checkpoint(stage.checkpoints, step, pv, optimizer, scheduler, kl_ctl, reward_fn,
                                {"step": step, "epoch": ep, "cursor": cur, "rng_per_process": rngs,
                                 "algorithm": pc.algorithm, "samples_per_prompt": group})
            finally:
                if reward_state is not None:
                    reward_fn.load_state_dict(current)
        accelerator.wait_for_everyone()
        return path

    def restore_and_stop(why: str) -> None:
        """A non-finite loss: put the trained parameters and the optimizer back to the start of the
        current step, save that as a resumable checkpoint, and stop."""
        with torch.no_grad():
            for n, p in pv.named_parameters():
                if n in step_start_state[0]:
                    p.copy_(step_start_state[0][n])
        optimizer.load_state_dict(step_start_state[1])
        optimizer.zero_grad(set_to_none=True)
        path = checkpoint(step, step_epoch, step_cursor, rng=step_rng, reward_state=step_reward_state)
        raise PPOError(f"{why}; parameters restored to the start of the step and saved in {path}. Lower "
                       "ppo.learning_rate or check the rewards, then run with --resume.")

    order = _prompt_order(len(encoded), pc.seed, epoch)
    bar = tqdm(range(start_step, pc.steps), desc="ppo", disable=not main_proc, initial=start_step, total=pc.steps)
    step_start_state = None
    guard.graceful_stop(True)  # SIGINT/SIGTERM from here on: finish the step, save it, stop
    for step in bar:
        t_step = time.time()
        step_epoch, step_cursor = epoch, cursor
        step_rng, step_reward_state = rng_state(), copy.deepcopy(reward_fn.state_dict())
        # 1. rollout: this process's share of the global batch's prompts, in a seeded shuffled order, each
        # repeated ppo.samples_per_prompt times in one generate (prompt-major: row g*k + j is sample j of
        # prompt g, the layout ppo_math's group estimators read)
        idx = []
        while len(idx) < prompts_per_proc * world:
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
                order = _prompt_order(len(encoded), pc.seed, epoch)
            idx.append(order[cursor])
            cursor += 1
        idx = [i for i in idx[rank * prompts_per_proc:(rank + 1) * prompts_per_proc] for _ in range(group)]
        query, query_mask = forwards.left_pad([encoded[i] for i in idx], tok.pad_token_id)
        t0 = time.time()
        with stacking.active_adapters(peft_model, policy_adapters), rollout_ctx(peft_model):
            response, mask, ended = rollout.generate(peft_model, tok, query, query_mask, pc.max_new_tokens,
                                                     pc.temperature, stop_ids)
        dev = accelerator.device
        query, query_mask, response, mask, ended = (t.to(dev) for t in (query, query_mask, response, mask, ended))
        maskf = mask.float()
        t_generate = time.time() - t0

        # 2. score
        t0 = time.time()
        texts = rollout.decode_responses(tok, response.cpu(), mask.cpu())
        prompt_msgs = [prompts[i]["prompt"] for i in idx]
        try:
            result = reward_fn([m[-1]["content"] for m in prompt_msgs], texts, prompt_messages=prompt_msgs,
                               response_ids=[r[m.bool()].tolist() for r, m in zip(response.cpu(), mask.cpu())],
                               tokenizer=tok)
        except Exception as e:
            path = checkpoint(step, step_epoch, step_cursor, rng=step_rng, reward_state=step_reward_state)
            raise PPOError(f"step {step + 1}: {e}\nA resumable checkpoint of the last completed step is in {path}; "
                           f"fix the reward and run again with --resume.") from e
        scores = torch.tensor(result.total, dtype=torch.float32, device=dev)
        if pc.missing_eos_penalty is not None:
            scores = ppo_math.apply_missing_eos_penalty(scores, ended, pc.missing_eos_penalty)
        monitored: dict[str, float] = {}
        if monitor_fn is not None:
            try:
                mon = monitor_fn([m[-1]["content"] for m in prompt_msgs], texts, prompt_messages=prompt_msgs)
            except Exception as e:
                path = checkpoint(step, step_epoch, step_cursor, rng=step_rng, reward_state=step_reward_state)
                raise PPOError(f"step {step + 1}: monitor: {e}\nA resumable checkpoint of the last completed step "
                               f"is in {path}; fix ppo.monitor and run again with --resume.") from e
            monitored = {name: _reduce_mean(accelerator, sum(v) / len(v)) for name, v in mon.components.items()}
        t_score = time.time() - t0

        # 3. reference logprobs; old logprobs and values (frozen for the whole PPO update). Every forward of
        # the step runs on `micro` rows: in bf16 the same weights' logprobs moved by 0.063 per token between
        # one 32-row batch and 8-row chunks (embedded model, measured), which put 0.14 nats of k3 KL between
        # the policy and its own reference before any update.
        t0 = time.time()
        micro = min(pc.micro_batch_size or mb_size, mb_size)
        row_chunks = torch.arange(per_proc, device=dev).split(micro)
        with torch.no_grad(), stacking.active_adapters(peft_model, reference_adapters):
            ref_logprobs = torch.cat([forwards.forward_response(peft_model, query[c], query_mask[c], response[c],
                                                               mask[c], pc.temperature).logprobs for c in row_chunks])
        kl_coef = kl_ctl.value
        in_reward = pc.kl_in == "reward"
        old_logprobs = old_values = kl = advantages = returns = None
        if pc.minibatches > 1 or micro < mb_size:
            with torch.no_grad():
                outs = [pv(query[c], query_mask[c], response[c], mask[c], pc.temperature) for c in row_chunks]
            old_logprobs = torch.cat([o[0] for o in outs])
            old_values = torch.cat([o[2] for o in outs]) if critic else None
            kl, advantages, returns = _advantages(old_logprobs, ref_logprobs, old_values, scores, maskf,
                                                  kl_coef if in_reward else 0.0, pc)
        # With one minibatch in one piece, the first PPO forward below sees the whole batch with the
        # rollout's parameters: its detached outputs are the old logprobs and values (one forward saved).

        # 4. PPO epochs over shuffled minibatches; each minibatch in micro-batches of `micro` rows whose
        # losses are weighted by their share of the minibatch's tokens, so the accumulated gradient is
        # that of the minibatch's masked mean (every loss term and statistic is a masked mean).
        step_start_state = ({n: p.detach().clone() for n, p in pv.named_parameters() if p.requires_grad},
                            copy.deepcopy(optimizer.state_dict()))
        stats: dict[str, list[float]] = {}
        first: dict = {}
        for ppo_epoch in range(pc.ppo_epochs):
            perm = torch.randperm(per_proc)
            for mb in range(pc.minibatches):
                sel = perm[mb * mb_size:(mb + 1) * mb_size].to(dev)
                mb_tokens = maskf[sel].sum().clamp(min=1.0)
                chunks = sel.split(micro)
                row: dict[str, float] = {}
                for ci, c in enumerate(chunks):
                    m = maskf[c]
                    weight = m.sum() / mb_tokens
                    sync = accelerator.no_sync(pv_ddp) if ci < len(chunks) - 1 else contextlib.nullcontext()
                    with sync:
                        logprobs, entropy, values = pv_ddp(query[c], query_mask[c], response[c], mask[c],
                                                           pc.temperature, with_entropy=True)
                        if old_logprobs is None:
                            old_logprobs = torch.empty_like(logprobs)
                            old_logprobs[c] = logprobs.detach()
                            if critic:
                                old_values = torch.empty_like(values)
                                old_values[c] = values.detach()
                            kl, advantages, returns = _advantages(old_logprobs, ref_logprobs, old_values, scores,
                                                                  maskf, kl_coef if in_reward else 0.0, pc)
                        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, old_logprobs[c], advantages[c], m,
                                                                 pc.cliprange)
                        loss, vf_loss, vf_stats = pg_loss, None, {}
                        if critic:
                            vf_loss, vf_stats = ppo_math.value_loss(values, old_values[c], returns[c], m,
                                                                    pc.cliprange_value)
                            loss = pg_loss + pc.vf_coef * vf_loss
                        if not in_reward:
                            kl_term = ppo_math.masked_mean(
                                ppo_math.kl_per_token(logprobs, ref_logprobs[c], pc.kl_estimator), m)
                            loss = loss + kl_coef * kl_term
                        if not torch.isfinite(loss):
                            restore_and_stop(f"step {step + 1}, PPO epoch {ppo_epoch + 1}: loss is {loss.item()} "
                                             f"(policy {pg_loss.item()}"
                                             f"{'' if vf_loss is None else f', value {vf_loss.item()}'})")
                        accelerator.backward(loss * weight)
                    w = float(weight)
                    parts = {"policy_loss": pg_loss.item(),
                             **({} if vf_loss is None else {"value_loss": vf_loss.item()}),
                             "entropy": ppo_math.masked_mean(entropy.detach(), m).item(),
                             **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}}
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
        scheduler.step()
        t_train = time.time() - t0

        # 5. KL control and logging
        seq_kl = kl.sum(1)
        mean_kl = _reduce_mean(accelerator, seq_kl.mean().item())
        kl_ctl.update(mean_kl, per_proc * world)
        lengths = maskf.sum(1)
        metrics = {
            "step": step + 1,
            "ppo/kl": mean_kl,
            "ppo/kl_coef": kl_coef,
            "ppo/score": _reduce_mean(accelerator, scores.mean().item()),
            "ppo/rlhf_reward": _reduce_mean(accelerator, (scores - kl_coef * seq_kl).mean().item()),
            "ppo/non_score_reward": _reduce_mean(accelerator, (-kl_coef * seq_kl).mean().item()),
            "ppo/response_length": _reduce_mean(accelerator, lengths.mean().item()),
            "ppo/eos_fraction": _reduce_mean(accelerator, ended.float().mean().item()),
            "ppo/advantage_mean": ppo_math.masked_mean(advantages, maskf).item(),
            **({"ppo/explained_variance": float(ppo_math.explained_variance(old_values, returns, maskf))}
               if critic else {}),
            **({f"ppo/group/{k}": _reduce_mean(accelerator, v.item()) for k, v in
                ppo_math.group_stats(scores - (kl_coef if in_reward else 0.0) * seq_kl, group).items()}
               if group > 1 else {}),
            "ppo/lr": scheduler.get_last_lr()[0],
            **{f"ppo/{k}": _reduce_mean(accelerator, sum(v) / len(v)) for k, v in stats.items()},
            **{f"ppo/{k}": v for k, v in first.items()},
            **{f"ppo/score/{name}": _reduce_mean(accelerator, sum(v) / len(v))
               for name, v in result.components.items()},
            **{f"ppo/monitor/{name}": v for name, v in monitored.items()},
            "time/generate": t_generate, "time/score": t_score, "time/train": t_train,
            "time/step": time.time() - t_step,
        }
        if main_proc:
            logger.log(metrics, step=step + 1)
            bar.set_postfix(kl=f"{mean_kl:.3f}", score=f"{metrics['ppo/score']:.3f}",
                            **{name: f"{v:.3f}" for name, v in monitored.items()})
            if pc.sample_every and (step + 1) % pc.sample_every == 0:
                rows = [{"step": step + 1, "prompt": prompt_msgs[i][-1]["content"], "response": texts[i],
                         "score": float(scores[i]), "kl": float(seq_kl[i]),
                         **{f"score/{k}": v[i] for k, v in result.components.items()}}
                        for i in range(min(pc.samples_to_show, len(texts)))]
                with open(samples_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                _print_samples(rows, step + 1)
        loading.release_free_memory()
        guard.end_of_step("ppo", step + 1, pc.steps, pc.save_every, lambda: checkpoint(step + 1, epoch, cursor),
                          any_process=lambda flag: _any_process(accelerator, flag))
    guard.graceful_stop(False)

    # 6. final output: policy adapter (stacked on the SFT adapter), value head (ppo), checkpoints, logs, manifest
    final = checkpoint(pc.steps, epoch, cursor)
    if main_proc:
        logger.close()
        stacking.save_adapter(peft_model, POLICY, work)
        tok.save_pretrained(work)
        if pv.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in pv.value_head.state_dict().items()},
                      str(work / VALUE_HEAD_FILE))
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = rows[-1] if rows else {}
        headline = {k: last[k] for k in ("ppo/kl", "ppo/score", "ppo/rlhf_reward", "ppo/kl_coef") if k in last}
        headline["steps"] = pc.steps
        headline["algorithm"] = pc.algorithm
        headline["mean_step_seconds"] = sum(r["time/step"] for r in rows) / max(1, len(rows))
        headline.update(prompt_lengths.metrics("prompts"))
        write_manifest(work, "ppo", cfg, base, headline, adapters=consumed,
                       data={"prompts": loaders.manifest_entry(cfg.data.prompts_train, report, cfg.data.split,
                                                            prompt_lengths)},
                       extra={"stacked_on": list(adapters), "reference": pc.reference, "algorithm": pc.algorithm,
                              "samples_per_prompt": group, "value_model": pc.value_model if critic else None,
                              "final_checkpoint": str(final.name)})
        stage.publish(keep_checkpoints=True)  # eval reads the checkpoints along the KL curve
        print(f"[ppo] done -> {out}", flush=True)
    accelerator.wait_for_everyone()
    return out
