"""Stage 3: PPO on a LoRA policy. One NF4 base in memory carries every role:

- policy    = base + sft adapter (frozen) + policy adapter (trained)
- reference = base + sft adapter ("reference: sft") or the bare base ("reference: base"): the same
              weights with adapters switched off, never a second model
- value     = a scalar head on the policy's hidden states ("head") or a value adapter + head ("adapter");
              none for the critic-free estimators (ppo.algorithm: rloo | grpo)
- reward    = any reward plugin; a learned reward model on the same base is one more adapter

ppo.algorithm changes only the advantage estimator (GAE over the value model, or a group baseline over
ppo.samples_per_prompt responses per prompt) and where the KL goes; the rest is one loop.
One step is four phases in pipeline/rl/ppo_step.py (rollout -> score -> advantages -> update); the run's
state (data position, checkpoints, resume, RNG streams, failure restore) is pipeline/rl/ppo_state.py; the
math is pipeline/rl/ppo_math.py. ppo.early_stop watches one monitor's smoothed peak
(pipeline/rl/early_stop.py) and may end the run there.
"""
from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.artifacts import guard, hashing, readers
from pipeline.artifacts.checkpoints import StageWork, load_state, step_name
from pipeline.artifacts.outputs import (
    ArtifactError,
    MetricsLogger,
    check_same_base,
    truncate_jsonl,
    write_manifest,
)
from pipeline.config import PipelineConfig, resolve_auto, substitute_run_dir, to_dict
from pipeline.data import loaders
from pipeline.models import forwards, lean_ops, loading, stacking, throughput
from pipeline.models.reward_model import load_reward_scorer
from pipeline.rl import early_stop, ppo_math, ppo_step, rollout
from pipeline.rl.policy_value import POLICY, SFT, VALUE, PolicyValue
from pipeline.rl.ppo_state import (
    Position,
    PPOError,
    RunState,
    StepFailed,
    check_resumable,
    next_prompts,
)

__all__ = ["run_ppo", "PPOError", "PolicyValue", "POLICY", "SFT", "VALUE", "VALUE_HEAD_FILE"]

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class Policy:
    """The roles on the one base: the stacked (frozen) adapters with their folders, the trained
    policy (and value) behind ``pv``, and which adapters are active for the policy, the value model
    and the reference (None: all off)."""

    peft_model: object
    pv: PolicyValue
    stacked: dict[str, Path]
    consumed: dict
    policy_adapters: list[str]
    value_adapters: Optional[list[str]]
    reference_adapters: Optional[list[str]]


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


def _print_samples(rows: list[dict], step: int) -> None:
    print(f"\n[ppo] samples at step {step}:", flush=True)
    print(f"  {'score':>7} {'kl':>6}  prompt -> response", flush=True)
    for r in rows:
        print(f"  {r['score']:7.3f} {r['kl']:6.2f}  {r['prompt'][:50]!r} -> {r['response'][:90]!r}", flush=True)


def build_policy(cfg: PipelineConfig, run_dir: Path, base_model, base, device) -> Policy:
    """Stack the SFT adapter (frozen) and a fresh policy adapter (and value adapter or head) on the
    base. The fresh adapters' init draws from the global RNG: it is seeded with ``ppo.seed`` first, so
    the same seed gives the same run however much RNG was consumed before (in-process callers, tests)."""
    pc = cfg.ppo
    critic = pc.algorithm == "ppo"
    sft_dir = substitute_run_dir(pc.sft_adapter, run_dir)
    stacked: dict[str, Path] = {}
    consumed: dict = {}
    if sft_dir:
        check_same_base(readers.read_output(sft_dir, "sft", "ppo.sft_adapter"), base, f"SFT adapter {sft_dir}")
        stacked[SFT] = Path(sft_dir)
        consumed[SFT] = {"path": str(sft_dir),
                         "sha256": hashing.sha256_file(Path(sft_dir) / "adapter_model.safetensors")}
    elif pc.reference == "sft":
        raise ArtifactError("ppo.reference=sft needs ppo.sft_adapter; set ppo.reference=base to anchor to the base")
    torch.manual_seed(pc.seed)
    peft_model = stacking.stack_adapters(base_model, stacked, trainable=POLICY,
                                         new_adapter=(POLICY, loading.lora_config(pc.lora, model=base_model)))
    policy_adapters = list(stacked) + [POLICY]
    value_adapters = None
    if critic and pc.value_model == "adapter":
        peft_model.add_adapter(VALUE, loading.lora_config(pc.lora, model=base_model))
        value_adapters = list(stacked) + [VALUE]
    stacking.set_active_adapters(peft_model, policy_adapters)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(f".{POLICY}." in n or f".{VALUE}." in n)
    pv = PolicyValue(peft_model, loading.hidden_size(base_model), policy_adapters, value_adapters, with_value=critic)
    if pv.value_head is not None:
        pv.value_head.to(device)
    peft_model.eval()  # no dropout anywhere, rollouts and PPO epochs alike (DESIGN.md 4.5)
    return Policy(peft_model, pv, stacked, consumed, policy_adapters, value_adapters,
                  [SFT] if pc.reference == "sft" else None)


def build_rewards(pc, run_dir: Path, peft_model, tok, base, consumed: dict):
    """The optimised reward (plugins by name; a learned reward model on this base attaches as one more
    adapter) and the monitors (scored and logged every step, never optimised: a gold signal to watch
    the proxy against; None when there are none). Records reward model paths in ``consumed``."""
    from reward.registry import build_reward

    context = {"load_reward_model": lambda path, **kw: load_reward_scorer(path, host=(peft_model, tok, base), **kw)}
    specs = [spec if isinstance(spec, dict) else {"name": spec} for spec in substitute_run_dir(pc.rewards, run_dir)]
    # A reward that hangs must stop the run like one that fails (ppo.reward_timeout, unless the spec sets its own).
    # Not for the learned reward model: it is this process's own torch forward, and under a timeout it
    # runs in a worker thread whose OpenMP team competes with the main thread's for the cores (0.72 s
    # vs 0.47 s per batch on the embedded model, measured).
    specs = [{"timeout": pc.reward_timeout, **spec}
             if pc.reward_timeout and spec.get("name") not in ("composite", "reward_model") else spec
             for spec in specs]
    reward_fn = build_reward(specs, context=context)
    for spec in specs:
        path = spec.get("args", {}).get("path")
        if path:
            consumed[f"reward:{spec.get('id', spec.get('name'))}"] = {"path": str(path)}
    monitor_fn = None
    if pc.monitor:
        monitor_fn = build_reward([spec if isinstance(spec, dict) else {"name": spec}
                                   for spec in substitute_run_dir(pc.monitor, run_dir)], context=context)
    return reward_fn, monitor_fn


def check_watched(pc, monitor_fn) -> None:
    """Refuse, before the first step, a ppo.early_stop_monitor that the built monitors do not log
    (ppo_step.score logs each component by id, and ``total`` for several)."""
    if pc.early_stop == "off":
        return
    names = [] if monitor_fn is None else list(monitor_fn.names)
    logged = names + (["total"] if len(names) > 1 else [])
    if pc.early_stop_monitor not in logged:
        raise PPOError(f"ppo.early_stop_monitor '{pc.early_stop_monitor}' is not logged by ppo.monitor "
                       f"(it logs: {', '.join(logged) or 'nothing'})")


def _watch(pc, history: list[float]) -> early_stop.Watch:
    """The watch over ``history`` with the ppo.early_stop_* settings."""
    return early_stop.peak_watch(history, pc.early_stop_window, pc.early_stop_patience, pc.early_stop_min_delta)


def monitor_history(pc, metrics_path: Path, start_step: int) -> list[float]:
    """The watched monitor's means of steps 1..``start_step`` from the run's metrics log, so that a
    resumed run decides as an uninterrupted one (the logged floats are the ones the live run saw).
    Empty for a fresh start or with early stopping off."""
    if pc.early_stop == "off" or start_step == 0:
        return []
    rows = ([json.loads(line) for line in metrics_path.read_text().split("\n") if line.strip()]
            if metrics_path.is_file() else [])
    try:
        return early_stop.history_from_rows(rows, f"ppo/monitor/{pc.early_stop_monitor}", start_step)
    except ValueError as e:
        raise ArtifactError(f"--resume with ppo.early_stop={pc.early_stop}: {metrics_path}: {e}; without it the "
                            "resumed run cannot decide as an uninterrupted one. Resume with ppo.early_stop=off, "
                            "or start over with --overwrite") from None


def watch_monitor(pc, history: list[float], monitored: dict[str, float]) -> tuple[dict[str, float], bool]:
    """Append this step's mean of the watched monitor to ``history``. Returns the step's
    ``ppo/early_stop/*`` log entries and whether the run ends here (ppo.early_stop=stop and the
    smoothed peak is ppo.early_stop_patience steps old); nothing with early stopping off."""
    if pc.early_stop == "off":
        return {}, False
    history.append(monitored[pc.early_stop_monitor])
    watch = _watch(pc, history)
    return ({"ppo/early_stop/smoothed": watch.smoothed[-1], "ppo/early_stop/best_step": watch.best_step},
            pc.early_stop == "stop" and watch.stop)


def early_stop_record(pc, history: list[float], stopped_at: int, checkpoints: list[tuple[int, Path]]) -> Optional[dict]:
    """The manifest's ``early_stop`` entry (None when off): the settings, the smoothed peak, the saved
    checkpoint nearest to it (the earlier of two as near) and the step the run ended at."""
    if pc.early_stop == "off":
        return None
    watch = _watch(pc, history)
    nearest = early_stop.nearest_step([s for s, _ in checkpoints], watch.best_step)
    return {"mode": pc.early_stop, "monitor": pc.early_stop_monitor, "window": pc.early_stop_window,
            "patience": pc.early_stop_patience, "min_delta": pc.early_stop_min_delta,
            "best_step": watch.best_step, "best_value": watch.best_value,
            "best_checkpoint": None if nearest is None else step_name(nearest), "stopped_at": stopped_at}


def early_stop_line(record: dict, steps: int) -> str:
    """One line on the watched monitor's peak: why the run stopped, or where it peaked in a full run."""
    peak = (f"ppo/monitor/{record['monitor']} (trailing mean over {record['window']} steps) peaked at step "
            f"{record['best_step']} ({record['best_value']:.4g})")
    if record["stopped_at"] < steps:
        return (f"[ppo] early stop after step {record['stopped_at']} of {steps}: {peak} and no later step beat it "
                f"by more than {record['min_delta']:g} in {record['stopped_at'] - record['best_step']} steps "
                f"(ppo.early_stop_patience={record['patience']}); nearest checkpoint {record['best_checkpoint']}")
    return f"[ppo] early_stop={record['mode']}: {peak}; nearest checkpoint {record['best_checkpoint']}"


def write_outputs(cfg: PipelineConfig, stage: StageWork, policy: Policy, tok, base, report, prompt_lengths,
                  final: Path, peak: float, steps_run: int, early: Optional[dict]) -> None:
    """The policy adapter (stacked on the SFT adapter), the value head (ppo), the tokenizer and the
    manifest with the headline metrics of the last step (``steps_run`` of them; fewer than ppo.steps
    when early stopping ended the run, ``early``: its record), in the work folder; then publish it."""
    pc, work = cfg.ppo, stage.work
    stacking.save_adapter(policy.peft_model, POLICY, work)
    tok.save_pretrained(work)
    if policy.pv.value_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in policy.pv.value_head.state_dict().items()},
                  str(work / VALUE_HEAD_FILE))
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().split("\n") if line.strip()]
    last = rows[-1] if rows else {}
    headline = {k: last[k] for k in ("ppo/kl", "ppo/score", "ppo/rlhf_reward", "ppo/kl_coef") if k in last}
    headline["steps"] = steps_run
    headline["algorithm"] = pc.algorithm
    headline["mean_step_seconds"] = sum(r["time/step"] for r in rows) / max(1, len(rows))
    for key in ("perf/mfu_generate", "perf/mfu_train", "perf/mfu_step", "perf/tokens_per_s_generate"):
        values = [r[key] for r in rows if key in r]
        if values:
            headline[f"mean_{key.split('/')[1]}"] = sum(values) / len(values)
    headline["peak_flops_per_s"] = peak
    headline.update(prompt_lengths.metrics("prompts"))
    critic = pc.algorithm == "ppo"
    write_manifest(work, "ppo", cfg, base, headline, adapters=policy.consumed,
                   data={"prompts": loaders.manifest_entry(cfg.data.prompts_train, report, cfg.data.split,
                                                           prompt_lengths)},
                   extra={"stacked_on": list(policy.stacked), "reference": pc.reference, "algorithm": pc.algorithm,
                          "samples_per_prompt": pc.samples_per_prompt,
                          "value_model": pc.value_model if critic else None, "final_checkpoint": str(final.name),
                          **({"early_stop": early} if early is not None else {})},
                   with_checkpoints=True)
    stage.publish(keep_checkpoints=True)  # eval reads the checkpoints along the KL curve


def estimate_ppo(encoded: list[list[int]], pc, shape, trained_layers: int, lora_params: int, value_adapter: bool,
                 peak: float, split: int = 0, sampled_trunk: bool = False) -> str:
    """The a-priori duration of the run (:func:`pipeline.models.throughput.estimate_line`): ``ppo.steps``
    steps of ``ppo.batch_size`` rows of the mean prompt length and ``ppo.max_new_tokens`` response tokens
    (``sampled_trunk``: the sampler's trunk replayed, not run again)."""
    mean_prompt = round(sum(len(e) for e in encoded) / max(len(encoded), 1))
    sample = encoded[:256]
    shared = forwards.common_prefix(sample, min(len(e) for e in sample) - 1)
    rows = pc.batch_size
    gen, train = ppo_step.step_flops([mean_prompt] * rows, [pc.max_new_tokens] * rows, shared, pc, shape,
                                     trained_layers, lora_params, value_adapter, split, trunk_ran=not sampled_trunk)
    return throughput.estimate_line("ppo", f"{pc.steps} steps of {rows} rollouts", pc.steps * (gen + train), peak)


def run_ppo(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    pc = resolve_auto(cfg).ppo
    run_dir = Path(run_dir)
    accelerator = Accelerator(cpu=loading.resolve_device(cfg.model.device).type == "cpu")
    main_proc, world, rank, dev = (accelerator.is_main_process, accelerator.num_processes,
                                   accelerator.process_index, accelerator.device)
    reduce = functools.partial(_reduce_mean, accelerator)  # a collective: every process calls it

    # 0. where we write: RUN/ppo.work holds checkpoints; it becomes RUN/ppo when the run completes
    stage = StageWork(run_dir, "ppo")
    ckpt = stage.start(overwrite, resume, main_process=main_proc, config=to_dict(cfg))
    accelerator.wait_for_everyone()
    if stage.finished:
        if main_proc:
            stage.publish(keep_checkpoints=True)
        accelerator.wait_for_everyone()
        return stage.out
    saved = load_state(ckpt) if ckpt is not None else None  # read (or refused) before any model loads
    if saved is not None:
        check_resumable(saved, ckpt, pc.algorithm, pc.samples_per_prompt)

    # 1. prompts
    prompts, report = loaders.load_prompts(cfg.data.prompts_train, **loaders.loader_options(cfg.data))
    if main_proc:
        print(f"[ppo] {report.summary()}", flush=True)

    # 2. one base, many adapters: policy = base + sft + policy, reference = the same with adapters off
    base_model, tok, base = loading.load_base(cfg.model, device=dev)
    shape = throughput.decoder_shape(base_model)  # before any adapter: LoRA matrices are not the model's
    prompts, encoded, prompt_lengths = rollout.fit_prompts(tok, prompts, report, pc.max_prompt_length,
                                                           cfg.data.long_rows, "PPO prompts")
    if main_proc:
        print(f"[ppo] {prompt_lengths.summary()}", flush=True)
    policy = build_policy(cfg, run_dir, base_model, base, dev)
    pv, peft_model = policy.pv, policy.peft_model

    # 3. rewards and monitors
    reward_fn, monitor_fn = build_rewards(pc, run_dir, peft_model, tok, base, policy.consumed)
    check_watched(pc, monitor_fn)

    # 4. optimizer, schedule, KL controller, sampling weights, the lean kernels; resume
    trainable = [p for p in pv.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=pc.learning_rate, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: ppo_math.lr_factor(pc.lr_scheduler, s, pc.steps))
    kl_ctl = ppo_math.make_kl_controller(pc.kl_controller, pc.kl_coef, pc.kl_target, pc.kl_horizon)
    merged = stacking.sample_from_merged(peft_model, pc.rollout_weights, pc.rollout_merge_max_gb,
                                         loading.compute_dtype(cfg.model, dev))
    if pc.lean_ops:
        lean_ops.install(peft_model)  # less kept for backward (RMSNorm, SwiGLU), one addmm per LoRA linear
        if main_proc:
            print(f"[ppo] {lean_ops.coverage(peft_model)}", flush=True)
    lora_params, trained_layers = throughput.trained_extent(peft_model, shape.layers)
    split = ppo_step.shared_split(peft_model, pv, policy.reference_adapters)  # the trunk run once per step
    # In float32 the sampler's trunk is the reference's to round-off, and prepare replays it instead of running
    # the trunk again; in bf16 merged sampling weights round differently from the adapters.
    sampled_split = split if loading.compute_dtype(cfg.model, dev) == torch.float32 else 0
    peak = throughput.measured_peak(loading.compute_dtype(cfg.model, dev), dev)  # MFU's denominator: this machine, this dtype
    if main_proc:
        print(estimate_ppo(encoded, pc, shape, trained_layers, lora_params, policy.value_adapters is not None, peak,
                           split, sampled_split > 0), flush=True)
        t_params, t_total = loading.count_parameters(pv)
        print(f"[ppo] trainable parameters: {t_params:,} of {t_total:,}; policy adapters {policy.policy_adapters}, "
              f"reference {policy.reference_adapters or 'base (all adapters off)'}, "
              f"{f'value {pc.value_model}' if pc.algorithm == 'ppo' else f'{pc.algorithm}, no value model'}, "
              f"{pc.samples_per_prompt} samples per prompt, KL ({pc.kl_estimator}) in the {pc.kl_in}, "
              f"rollout weights {'merged' if merged else 'adapters'}", flush=True)
        if split:
            print(f"[ppo] decoder layers 0-{split - 1} of {shape.layers} hold no trained weight: they run once per step "
                  f"({'kept from the sampler' if sampled_split else 'after sampling'}) for the reference, old and "
                  "training passes alike (the shared trunk)", flush=True)
    pv_ddp, optimizer = accelerator.prepare(pv, optimizer)
    run = RunState(stage.checkpoints, pv, optimizer, scheduler, kl_ctl, reward_fn, accelerator, pc.algorithm,
                   pc.samples_per_prompt)
    random.seed(pc.seed)
    torch.manual_seed(pc.seed + rank)
    start_step, position = 0, Position()
    if saved is not None:
        start_step, position = run.resume(ckpt, saved)
        saved = None  # the optimizer's copy is all that is needed now
        if main_proc:
            print(f"[ppo] resumed from {ckpt} at step {start_step}", flush=True)
    logger = MetricsLogger(stage.work / "metrics.jsonl", stage.work / "tensorboard" if pc.tensorboard else None,
                           resume_step=start_step if ckpt is not None else None) if main_proc else None
    samples_path = stage.work / "samples.jsonl"
    if main_proc and ckpt is not None:
        truncate_jsonl(samples_path, start_step)
    stop_ids = rollout.stop_token_ids(tok, base_model)
    prompts_per_proc = pc.batch_size // pc.samples_per_prompt
    history = monitor_history(pc, stage.work / "metrics.jsonl", start_step)  # the watched monitor, per step
    # A run killed after early stopping decided (before its outputs were written) ends where it stopped.
    stopped_at = start_step if pc.early_stop == "stop" and history and _watch(pc, history).stop else pc.steps

    # 5. the loop: rollout -> score -> advantages -> update, then KL control, log, checkpoint, early stop
    bar = tqdm(range(start_step, stopped_at), desc="ppo", disable=not main_proc, initial=start_step, total=pc.steps)
    guard.graceful_stop(True)  # SIGINT/SIGTERM from here on: finish the step, save it, stop
    for step in bar:
        t_step = time.time()
        start = run.begin_step(step, position)
        # this process's share of the global batch's prompts, each repeated ppo.samples_per_prompt times
        idx, position = next_prompts(position, len(encoded), prompts_per_proc * world, pc.seed)
        idx = [i for i in idx[rank * prompts_per_proc:(rank + 1) * prompts_per_proc]
               for _ in range(pc.samples_per_prompt)]
        try:
            t0 = time.time()
            batch = ppo_step.sample_rollout(peft_model, tok, encoded, prompts, idx, policy.policy_adapters, merged,
                                            pc, stop_ids, dev, sampled_split)
            t_generate, t0 = time.time() - t0, time.time()
            scored = ppo_step.score(step, batch, reward_fn, monitor_fn, tok, pc, reduce)
            t_score, t0 = time.time() - t0, time.time()
            kl_coef = kl_ctl.value
            ppo_step.prepare(batch, pv, peft_model, policy.reference_adapters, kl_coef, pc, split)
            run.begin_update(start)
            stats, first = ppo_step.update(batch, pv_ddp, optimizer, trainable, accelerator, kl_coef, pc, step)
        except StepFailed as failure:
            run.stop(start, failure)
        scheduler.step()
        t_train = time.time() - t0
        mean_kl = reduce(batch.kl.sum(1).mean().item())
        kl_ctl.update(mean_kl, pc.batch_size * world)
        times = {"generate": t_generate, "score": t_score, "train": t_train, "step": time.time() - t_step}
        watched, stop_here = watch_monitor(pc, history, scored.monitored)
        metrics = {**ppo_step.step_metrics(step, batch, scored, stats, first, mean_kl, kl_coef,
                                           scheduler.get_last_lr()[0], times, pc, reduce),
                   **ppo_step.perf_metrics(batch, pc, shape, trained_layers, lora_params, times, peak,
                                           policy.value_adapters is not None, split),
                   **watched}
        if main_proc:
            logger.log(metrics, step=step + 1)
            bar.set_postfix(kl=f"{mean_kl:.3f}", score=f"{metrics['ppo/score']:.3f}",
                            **{name: f"{v:.3f}" for name, v in scored.monitored.items()})
            if pc.sample_every and (step + 1) % pc.sample_every == 0:
                rows = ppo_step.sample_rows(step, batch, scored, pc.samples_to_show)
                with open(samples_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                _print_samples(rows, step + 1)
        loading.release_free_memory()
        # the step early stopping ends at is the last one: its checkpoint is the final one below
        guard.end_of_step("ppo", step + 1, step + 1 if stop_here else pc.steps, pc.save_every,
                          functools.partial(run.checkpoint, step + 1, position),
                          any_process=functools.partial(_any_process, accelerator))
        if stop_here:
            stopped_at = step + 1
            break
    bar.close()
    guard.graceful_stop(False)

    # 6. final output: policy adapter (stacked on the SFT adapter), value head (ppo), checkpoints, logs, manifest
    final = run.checkpoint(stopped_at, position)
    if main_proc:
        logger.close()
        early = early_stop_record(pc, history, stopped_at, stage.checkpoints.all())
        if early is not None:
            print(early_stop_line(early, pc.steps), flush=True)
        write_outputs(cfg, stage, policy, tok, base, report, prompt_lengths, final, peak, stopped_at, early)
        print(f"[ppo] done -> {stage.out}", flush=True)
    accelerator.wait_for_everyone()
    return stage.out
