"""`rlhf eval`: KL-versus-reward curves for the base, the SFT model, every PPO checkpoint and best-of-n.

Everything runs on one NF4 base in memory, as in PPO (DESIGN.md section 3):

- "base"       all adapters off
- "sft"        the SFT adapter only
- step-NNNNNN  the PPO policy adapter of a checkpoint, stacked on the adapters PPO stacked it on (SFT)
- the learned proxy reward, when trained on the same base, is one more adapter on it

Several PPO-family runs (``ppo.algorithm`` ppo, rloo or grpo) go on one plot: RUN/ppo and every run in
``eval.runs`` is a series of its own, labelled by its algorithm (``rloo``; ``rloo:<run folder>`` when two
share one), its checkpoints named ``<series>/step-NNNNNN`` when there is more than one series. Every
series must have started from this eval's SFT adapter (same content hash) on the same base: then all
of them share the reference, the proxy, the gold and the best-of-n baseline, and compare at equal KL.

For each model, ``eval.samples_per_prompt`` responses per eval prompt are sampled at the PPO training
temperature (through :func:`pipeline.rl.rollout.sample`, top_k=0, top_p=1) and each sequence gets:

- its KL to the PPO reference (``ppo.reference``: "sft" = SFT adapter only, "base" = no adapters):
  the sum over response tokens of k1 = logp - logp_ref, and of k3, both from logits / temperature
  exactly as PPO computes them (in float32 the model's own from the sampler, and the reference's over
  the layers the sampler computed for both below a top-layers policy, see :func:`_sample`);
  reported as the mean over sequences (and k1's standard error);
- the proxy reward (``ppo.rewards``, what PPO optimised) and the gold reward (``eval.gold``);
- a gold win against the SFT model's response to the same prompt (sample j vs sample j; ties count
  half), summarised as a win rate with a 95% Wilson interval.

Best-of-n baseline: ``max(eval.best_of_n)`` responses per prompt are sampled once from the SFT model;
for each n they are split into disjoint groups of n, the proxy picks the best of each group, and
the pick is scored by proxy and gold. Its KL to the SFT model is the analytic ``log n - (n-1)/n``.
The picking and its points are :mod:`pipeline.evaluation.bestofn`.

Forgetting check (``eval.forgetting``, :mod:`pipeline.evaluation.forgetting`): every model's token loss, perplexity
and per-token KL(model || base) over the full vocabulary on general text no stage trained on, one
batched forward per model (no sampling), as columns of curves.csv and a table in summary.txt.

Outputs in ``RUN/eval/`` (written atomically): ``curves.csv``, ``curves.png``, ``summary.txt``,
``samples.jsonl`` and ``manifest.json`` (stage "eval", the table in ``metrics.points``); the points,
fits, table and plot are made in :mod:`pipeline.evaluation.curves`.

Running reward normalisation (``normalize: {kind: running}``) is a training-time shaping: here a
normalised component uses the statistics saved in the final checkpoint of the first series, frozen, so
every model is scored on the same scale; without saved statistics the raw score is used.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.artifacts import hashing, readers
from pipeline.artifacts.checkpoints import Checkpoints, load_state
from pipeline.artifacts.outputs import (
    ArtifactError,
    atomic_output,
    check_same_base,
    is_complete,
    write_manifest,
)
from pipeline.config import ConfigError, PipelineConfig, substitute_run_dir
from pipeline.data import loaders
from pipeline.evaluation import bestofn, forgetting
from pipeline.evaluation.curves import (
    best_gold,
    curve_fits,
    gold_at_kl,
    json_safe,
    make_point,
    plot_curves,
    proxy_per_nat,
    rl_family,
    series_title,
    summary_text,
    write_csv,
)
from pipeline.evaluation.runs import (
    Series,
    check_same_start,
    collect_fused,
    collect_series,
    exact_copy_of,
)
from pipeline.evaluation.stats import mean_se, prompt_means, sequence_kl, win_rate
from pipeline.fusion import gating
from pipeline.models import forwards, loading, stacking, trunk
from pipeline.rl import rollout
from pipeline.rl.policy_value import POLICY, SFT

__all__ = ["run_eval"]

_SAMPLES_TO_SAVE = 4  # responses per model in samples.jsonl (sample 0 of the first prompts)
# Rows per log-prob forward, whatever eval.batch_size samples at once: its (rows, T, vocab) float32
# logits are 200 MB at 32 rows x 32 tokens on a 49k vocabulary, 0.8 GB at 128.
_LOGPROB_ROWS = 32


# ---------------------------------------------------------------------------------------------
# Models, rewards and sampling


@dataclass
class ModelSpec:
    kind: str  # base | sft | ppo
    name: str
    adapters: Optional[list[str]]  # None: every adapter off
    step: Optional[int] = None
    policy_dir: Optional[Path] = None  # PPO checkpoint's policy adapter
    slot: str = POLICY  # the adapter its weights are loaded into
    series: Optional[str] = None
    # a learned fusion: a factory of the context that runs the model with its gates (no merged sampling)
    gated: Optional[Callable] = None
    seed_name: Optional[str] = None  # sample with another model's seed (default: its own name's)


@dataclass
class Samples:
    """Samples of one model, prompt-major: sample j of prompt i is at ``i * k + j``."""

    prompt_index: list[int] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    kl_k1: list[float] = field(default_factory=list)
    kl_k3: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    proxy_components: dict[str, list[float]] = field(default_factory=dict)
    gold: list[float] = field(default_factory=list)
    # wall seconds of this model's phases: "generate" (sampling), "kl" (policy and reference logprobs, and
    # decoding the texts, done in the same pass), "score" (proxy, gold and monitors); the eval manifest sums
    # them, with the forgetting check's
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Stack:
    """The one NF4 base in memory with every adapter this eval reads (step 3)."""

    base_model: object  # the quantised base model under peft_model
    peft_model: object
    tok: object
    base: loading.BaseInfo  # checked against every artifact's manifest
    adapters: dict[str, Path]  # the stacked adapters by slot: SFT when there is one
    consumed: dict[str, dict]  # the adapters read so far, {"path", "sha256"} each, for the manifest
    reference: Optional[list[str]]  # the KL reference's adapters (ppo.reference; None: the base)
    start: Optional[list[str]]  # the model PPO started from: win rates and best-of-n

    @property
    def has_sft(self) -> bool:
        return SFT in self.adapters


@dataclass
class Rewards:
    """The proxy (``ppo.rewards``, what PPO optimised) and the gold (``eval.gold``), normalisers frozen."""

    proxy: Callable
    gold: Callable
    watch: Optional[Callable] = None  # ppo.monitor: what PPO watched (e.g. a held-out ensemble member)


@dataclass
class SamplingPlan:
    """What every model is sampled on and how: the same prompts, temperature and budget for all."""

    encoded: list[list[int]]  # the fitted eval prompts' token ids
    k: int  # eval.samples_per_prompt
    temperature: float
    max_new_tokens: int
    stop_ids: list[int]
    batch_size: int
    merged: bool  # sample from dense merged weights (ppo.rollout_weights)
    float32: bool = False  # the model computes in float32: the sampler's logprobs serve the KL


@dataclass
class ForgettingRun:
    """The forgetting check (``eval.forgetting``): its probe (None: not asked for), each model's result by
    name and the seconds spent on it, probe set-up included."""

    probe: Optional[forgetting.ForgettingProbe] = None
    models: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    # The KL reference's adapters: a policy with LoRA on its top layers over them runs only those layers
    # (ForgettingProbe.measure's trunk_of).
    trunk_of: Optional[list[str]] = None

    def measure(self, spec: ModelSpec) -> None:
        """Record ``spec``'s loss, perplexity and KL to the base on the general text (no-op without a probe)."""
        if self.probe is None:
            return
        t0 = time.time()
        with (spec.gated or contextlib.nullcontext)():
            self.models[spec.name] = self.probe.measure(adapters=spec.adapters,
                                                        trunk_of=self.trunk_of if spec.gated is None else None)
        self.seconds += time.time() - t0


@dataclass
class Evaluation:
    """Everything steps 1-7 measured that the outputs (step 8) are made of."""

    run_dir: Path
    prompts: list[dict]  # the eval prompts kept after fitting
    report: loaders.LoadReport
    prompt_lengths: object  # pipeline.data.lengths.LengthReport of the kept prompts
    series: list[Series]
    specs: list[ModelSpec]  # every sampled model, in evaluation order
    results: dict[str, Samples]  # by model name
    points: list[dict]  # the curves' rows: one per model, then best-of-n
    bon_rows: list[dict]  # best-of-n's rows of samples.jsonl
    duplicates: dict[str, str]  # fuse output folder -> the checkpoint it reproduces exactly (not sampled)
    forgetting: ForgettingRun
    consumed: dict[str, dict]  # every adapter read, for the manifest
    comparator: str  # the model win rates are taken against: "SFT" or "base"
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (:func:`phase_seconds`)


class _FrozenNormalizer:
    """Normalise with fixed statistics (no update), so scores do not depend on evaluation order."""

    def __init__(self, normalizer):
        self.normalizer = normalizer

    def __call__(self, scores):
        return self.normalizer.normalize(scores)


def _freeze_normalizers(reward_fn, state: Optional[dict], what: str) -> None:
    if not any(c.normalizer is not None for c in reward_fn.components):
        return
    if state:
        try:
            reward_fn.load_state_dict(state)
        except KeyError as e:
            print(f"[eval] {what}: saved normaliser statistics do not fit ({e}); using raw scores", flush=True)
    for c in reward_fn.components:
        if c.normalizer is None:
            continue
        if getattr(c.normalizer, "count", 0) > 0:
            c.normalizer = _FrozenNormalizer(c.normalizer)
        else:
            print(f"[eval] {what}: component '{c.id}' has running normalisation but no saved statistics; "
                  "scoring it raw", flush=True)
            c.normalizer = None


def _seed(base_seed: int, name: str) -> int:
    """A seed per model name: each model samples independently of the SFT model it is compared with (win
    rates assume independent pairs)."""
    return (base_seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31 - 1_000_000)


def _sample(stack: Stack, plan: SamplingPlan, adapters: Optional[list[str]], k: int, seed: int, desc: str,
            with_kl: bool = True, gated: Optional[Callable] = None) -> Samples:
    """``k`` responses per prompt of ``plan.encoded`` under ``adapters``, batch b drawn with seed ``seed + b``,
    with per-sequence KL to ``stack.reference`` unless ``with_kl`` is False.

    With ``plan.merged`` the responses are sampled from dense weights with the adapters merged in (as PPO's
    rollouts are, ``ppo.rollout_weights``; 2x faster on CPU). The model's side of the KL is the sampler's own
    logprobs when the model computes in float32 (equal to a forward through the adapters to round-off,
    ~1e-5 per token; tested), and the reference's a forward from its merged weights then; otherwise
    both are forwards through the adapters: in bf16 merged weights round differently from them. ``gated`` (a learned fusion's
    context factory, pipeline/fusion/gating.py) wraps the model's sampling and logprobs, never the reference's;
    its weights depend on the input, so it samples through the adapters.
    """
    from tqdm.auto import tqdm

    peft_model, tok, reference = stack.peft_model, stack.tok, stack.reference
    encoded, batch_size, temperature = plan.encoded, plan.batch_size, plan.temperature
    device = next(peft_model.parameters()).device
    rows = [(i, j) for i in range(len(encoded)) for j in range(k)]
    out = Samples()
    batches = []
    merged = plan.merged and gated is None
    # The model that is its own reference (the SFT model, with reference sft) has KL 0 by definition:
    # both forwards would be the same computation.
    same_as_reference = gated is None and list(adapters or []) == list(reference or [])
    weights = stacking.merged_linear_weights if merged else lambda model: contextlib.nullcontext()
    gated = gated or contextlib.nullcontext
    # In float32 the sampler's own logprobs are the model's to round-off (merged or not), so the model's
    # side of the KL costs no forward; in bf16/fp16, merged weights round differently from the adapters
    # by more than that, and the model is run again through its adapters.
    keep_logprobs = with_kl and not same_as_reference and plan.float32
    # Where the model and the reference agree below some layer (a policy with LoRA on the top layers over
    # the SFT reference), the sampler keeps what it computed there and the reference runs only the layers
    # above (float32, where the sampler's side is the model's to round-off).
    split = 0
    if keep_logprobs and gated is contextlib.nullcontext and trunk.SHARE_TRUNK:
        differing = trunk.differing_adapters(reference, adapters)
        split = trunk.trunk_split(peft_model, differing) if differing else 0
    t0 = time.time()
    with stacking.active_adapters(peft_model, adapters), gated(), weights(peft_model):
        for b, s in enumerate(tqdm(range(0, len(rows), batch_size), desc=desc, leave=False)):
            chunk = rows[s:s + batch_size]
            query, query_mask = forwards.left_pad([encoded[i] for i, _ in chunk], tok.pad_token_id)
            drawn = rollout.sample(peft_model, tok, query, query_mask, plan.max_new_tokens, temperature,
                                   plan.stop_ids, generator_seed=seed + b, with_logprobs=keep_logprobs,
                                   trunk_split=split)
            batches.append((chunk, query, query_mask, drawn))
    out.seconds["generate"] = time.time() - t0
    t0 = time.time()
    reference_weights = contextlib.ExitStack()
    if keep_logprobs and plan.merged:
        # Where the model's side is the sampler's (float32), the reference runs from merged weights too: the
        # same to round-off (1.8e-4 per token at most, 30 layers with all-linear adapters), 9.56 +- 0.08 s for
        # 128 rows against 10.45 +- 0.07 s through the adapters, the merge included (0.16 s; AMD EPYC under
        # the AVX2 caps).
        reference_weights.enter_context(stacking.active_adapters(peft_model, reference))
        reference_weights.enter_context(stacking.merged_linear_weights(peft_model))
    with reference_weights:
        for chunk, query, query_mask, drawn in batches:
            response, mask, ended = drawn.response, drawn.mask, drawn.ended
            if with_kl and same_as_reference:
                out.kl_k1.extend([0.0] * len(chunk))
                out.kl_k3.extend([0.0] * len(chunk))
            elif with_kl and drawn.trunk is not None and (hidden := _sampled_reference_hidden(
                    peft_model, reference, drawn, query, query_mask)) is not None:
                for c in range(0, len(chunk), _LOGPROB_ROWS):
                    r, m = (t[c:c + _LOGPROB_ROWS].to(device) for t in (response, mask))
                    with torch.no_grad():
                        h = hidden[c:c + _LOGPROB_ROWS]
                        ref = forwards.response_outputs(peft_model, h, r, temperature).logprobs
                    logp = drawn.logprobs[c:c + _LOGPROB_ROWS].to(device)
                    out.kl_k1.extend(sequence_kl(logp, ref, m, "k1").tolist())
                    out.kl_k3.extend(sequence_kl(logp, ref, m, "k3").tolist())
            elif with_kl:
                for c in range(0, len(chunk), _LOGPROB_ROWS):
                    q, qm, r, m = (t[c:c + _LOGPROB_ROWS].to(device) for t in (query, query_mask, response, mask))
                    with torch.no_grad():
                        if drawn.logprobs is not None:
                            logp = drawn.logprobs[c:c + _LOGPROB_ROWS].to(device)
                        else:
                            with stacking.active_adapters(peft_model, adapters), gated():
                                logp = forwards.forward_response(peft_model, q, qm, r, m, temperature).logprobs
                        with stacking.active_adapters(peft_model, reference):
                            ref = forwards.forward_response(peft_model, q, qm, r, m, temperature).logprobs
                    out.kl_k1.extend(sequence_kl(logp, ref, m, "k1").tolist())
                    out.kl_k3.extend(sequence_kl(logp, ref, m, "k3").tolist())
            out.prompt_index.extend(i for i, _ in chunk)
            out.sample_index.extend(j for _, j in chunk)
            out.texts.extend(rollout.decode_responses(tok, response, mask))
            out.response_ids.extend(row[msk.bool()].tolist() for row, msk in zip(response, mask))
            out.ended.extend(bool(e) for e in ended)
    out.seconds["kl"] = time.time() - t0 if with_kl else 0.0
    return out


def _sampled_reference_hidden(peft_model, reference: Optional[list[str]], drawn: rollout.Sampled,
                              query: torch.Tensor, query_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The reference's final hidden states over ``drawn``'s rows (B, T, H), its layers below the split
    replayed from the sampler's (:func:`pipeline.models.trunk.sampled_response_hidden`); None where they
    cannot be (then the plain forward)."""
    device = next(peft_model.parameters()).device
    with stacking.active_adapters(peft_model, reference):
        return trunk.sampled_response_hidden(peft_model, drawn.trunk, query.to(device), query_mask.to(device),
                                             drawn.response.to(device), drawn.mask.to(device))


def _score(samples: Samples, prompts: list[dict], tok, rewards: Rewards, batch_size: int) -> None:
    """Fill ``samples.proxy`` (and its components) and ``samples.gold``, ``batch_size`` responses a call."""
    t0 = time.time()
    for s in range(0, len(samples.texts), batch_size):
        idx = samples.prompt_index[s:s + batch_size]
        msgs = [prompts[i]["prompt"] for i in idx]
        texts = samples.texts[s:s + batch_size]
        info = dict(prompt_messages=msgs, response_ids=samples.response_ids[s:s + batch_size], tokenizer=tok)
        last_user = [m[-1]["content"] for m in msgs]
        proxy = rewards.proxy(last_user, texts, **info)
        samples.proxy.extend(proxy.total)
        for name, values in {**proxy.components, **proxy.details}.items():
            samples.proxy_components.setdefault(name, []).extend(values)
        samples.gold.extend(rewards.gold(last_user, texts, **info).total)
        if rewards.watch is not None:
            watched = rewards.watch(last_user, texts, **info)
            parts = {**watched.components, **({"total": watched.total} if len(watched.components) > 1 else {})}
            for name, values in parts.items():
                samples.proxy_components.setdefault(f"monitor/{name}", []).extend(values)
    samples.seconds["score"] = time.time() - t0


def _check_adapter_loaded(peft_model, name: str, adapter_dir: Path) -> None:
    """``load_adapter_weights`` ignores missing keys; make sure every saved tensor really landed."""
    from peft import get_peft_model_state_dict

    saved = readers.load_tensors(adapter_dir / "adapter_model.safetensors")
    live = get_peft_model_state_dict(peft_model, adapter_name=name)
    bad = [k for k, v in saved.items() if k not in live or not torch.equal(live[k].detach().cpu(), v)]
    if bad or not saved:
        raise ArtifactError(f"{adapter_dir}: adapter weights did not load into '{name}' "
                            f"({len(bad)} of {len(saved)} tensors differ, e.g. {bad[:2]})")


def _fused_specs(peft_model, fused: list[tuple[Path, dict]], base, sft: Optional[dict]) -> tuple[list, dict]:
    """Load each fuse output into ``peft_model`` (fresh adapter slots) and describe its model(s): a learned
    fusion gives two, the gated model and its mean-gate approximation (adapter/); any other method one."""
    specs, consumed = [], {}
    # one fuse output: "fused:<method>"; several: "<run folder>:<method>" (numbered where two share a name)
    owners = [folder.parent.name if folder.name == "fused" else folder.name for folder, _ in fused]
    if len(set(owners)) < len(owners):
        owners = [f"{o}-{j + 1}" for j, o in enumerate(owners)]
    for j, (folder, manifest) in enumerate(fused):
        check_same_base(manifest, base, f"fuse output {folder}")
        theirs = manifest.get("adapters", {}).get(SFT, {}).get("sha256")
        if sft is not None and theirs and theirs != sft.get("sha256"):
            print(f"[eval] note: {folder} fused another SFT adapter (sha256 {theirs[:12]}) than this eval's",
                  flush=True)
        method = manifest.get("method", "fused")
        owner = "fused" if len(fused) == 1 else owners[j]
        if method == "learned":
            gates, slots = gating.attach(peft_model, folder, prefix=f"fused{j}_")
            specs.append(ModelSpec("fused", f"{owner}:learned", slots, series="fused",
                                   gated=functools.partial(gating.gated, peft_model, gates, slots)))
            consumed[f"{owner}:learned"] = {"path": str(folder),
                                            "sha256": hashing.sha256_file(folder / gating.GATE_FILE)}
        slot = f"fused{j}"
        stacking.load_frozen_adapter(peft_model, folder / "adapter", slot)
        name = f"{owner}:{'mean-gate' if method == 'learned' else method}"
        specs.append(ModelSpec("fused", name, [slot], series="fused"))
        consumed[name] = {"path": str(folder / "adapter"),
                          "sha256": hashing.sha256_file(folder / "adapter" / "adapter_model.safetensors")}
    peft_model.eval()  # layers injected by load_adapter start in train mode
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return specs, consumed


# ---------------------------------------------------------------------------------------------
# The stage's steps


def _check_request(ec, out: Path, overwrite: bool) -> None:
    """Refuse to replace a complete output without ``overwrite``, and eval settings that cannot run."""
    if is_complete(out) and not overwrite:
        raise ArtifactError(f"{out} already holds a complete eval output; pass --overwrite to replace it")
    if ec.prompts < 1 or ec.samples_per_prompt < 1:
        raise ConfigError(f"eval.prompts ({ec.prompts}) and eval.samples_per_prompt "
                            f"({ec.samples_per_prompt}) must be >= 1")
    bad_n = [n for n in ec.best_of_n if n < 1]
    if bad_n:
        raise ConfigError(f"eval.best_of_n: every n must be >= 1, got {bad_n}")


def _load_eval_prompts(cfg: PipelineConfig) -> tuple[list[dict], loaders.LoadReport]:
    """The first ``eval.prompts`` rows of ``data.prompts_eval``, with the loader's report."""
    ec = cfg.eval
    prompts, report = loaders.load_prompts(cfg.data.prompts_eval, **loaders.loader_options(cfg.data))
    if len(prompts) < ec.prompts:
        print(f"[eval] only {len(prompts)} eval prompts available (eval.prompts={ec.prompts})", flush=True)
    prompts = prompts[:ec.prompts]
    print(f"[eval] {report.summary()}; using {len(prompts)}", flush=True)
    return prompts, report


def _find_series(cfg: PipelineConfig, run_dir: Path) -> list[Series]:
    """The PPO-family runs to plot (:func:`collect_series`), noting where one trained with another
    temperature or reference than this eval samples and measures with."""
    pc = cfg.ppo
    series = collect_series(run_dir, substitute_run_dir(cfg.eval.runs, run_dir), pc.steps)
    if not is_complete(run_dir / "ppo"):
        print(f"[eval] no complete PPO output in {run_dir / 'ppo'}: evaluating base, SFT and best-of-n"
              f"{' and the runs in eval.runs' if series else ' only'}", flush=True)
    for s in series:
        trained = s.manifest.get("config", {}).get("ppo", {})
        for key in ("temperature", "reference"):
            if key in trained and trained[key] != getattr(pc, key):
                print(f"[eval] note: {s.ppo_dir} trained with ppo.{key}={trained[key]!r}, this eval uses "
                      f"{getattr(pc, key)!r}", flush=True)
    return series


def _load_stack(cfg: PipelineConfig, sft_dir: Optional[Path], series: list[Series]) -> Stack:
    """Load the base and stack on it the SFT adapter (``sft_dir``, None: none) and one empty policy slot
    per distinct LoRA config among ``series``, frozen, in eval mode. Sets each series' ``slot``: the
    adapter its checkpoints are loaded into."""
    from peft import LoraConfig

    pc = cfg.ppo
    base_model, tok, base = loading.load_base(cfg.model)
    consumed: dict = {}
    adapters: dict[str, Path] = {}
    if sft_dir is not None:
        check_same_base(readers.read_output(sft_dir, "sft", "ppo.sft_adapter"), base, f"SFT adapter {sft_dir}")
        adapters[SFT] = sft_dir
        consumed[SFT] = {"path": str(sft_dir),
                         "sha256": hashing.sha256_file(sft_dir / "adapter_model.safetensors")}
    if pc.reference == "sft" and sft_dir is None:
        raise ArtifactError("ppo.reference=sft needs ppo.sft_adapter; set ppo.reference=base to anchor to the base")
    slots: dict[str, tuple[str, LoraConfig]] = {}  # one policy adapter per distinct LoRA config
    for s in series:
        check_same_start(s, base, consumed.get(SFT), adapters)
        policy_cfg = stacking.lora_config_of(s.ppo_dir if (s.ppo_dir / "adapter_config.json").is_file()
                                             else s.checkpoints[0][1])
        policy_cfg.inference_mode = True
        signature = json.dumps(policy_cfg.to_dict(), sort_keys=True, default=str)
        if signature not in slots:
            slots[signature] = (POLICY if not slots else f"{POLICY}{len(slots) + 1}", policy_cfg)
        s.slot = slots[signature][0]
    # without a run, a placeholder policy adapter: the model must be a PeftModel for the reward loader
    policy_slots = list(slots.values()) or [(POLICY, loading.lora_config(pc.lora))]
    peft_model = stacking.stack_adapters(base_model, adapters, trainable=None, new_adapter=policy_slots[0])
    for name, policy_cfg in policy_slots[1:]:
        peft_model.add_adapter(name, policy_cfg)
    peft_model.eval()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return Stack(base_model, peft_model, tok, base, adapters, consumed,
                 reference=[SFT] if pc.reference == "sft" else None,
                 start=[SFT] if sft_dir is not None else None)


def _start_forgetting(stack: Stack, passages: Optional[list[str]], ec) -> ForgettingRun:
    """The forgetting check's probe over ``passages`` (None: no check), which keeps the base's hidden
    states on them, so it must be made while every adapter is still the base's own (before any model)."""
    if passages is None:
        return ForgettingRun()
    t0 = time.time()
    probe = forgetting.ForgettingProbe(stack.peft_model, forgetting.encode_passages(
        stack.tok, passages, ec.forgetting, ec.forgetting_max_tokens, min(ec.batch_size, forgetting.BATCH)))
    print(f"[eval] forgetting check on {ec.forgetting}: {probe.text.passages} passages, {probe.text.tokens} "
          f"scored tokens ({probe.text.truncated} cut to eval.forgetting_max_tokens)", flush=True)
    return ForgettingRun(probe, seconds=time.time() - t0, trunk_of=stack.reference)


def _build_rewards(cfg: PipelineConfig, run_dir: Path, stack: Stack, series: list[Series]) -> Rewards:
    """The proxy and gold rewards, a learned reward model attached to ``stack``'s base as one more adapter;
    running normalisers frozen at the statistics of the first series' final checkpoint (proxy) or off."""
    from pipeline.models.reward_model import load_reward_scorer
    from reward.registry import build_reward

    host = (stack.peft_model, stack.tok, stack.base)
    context = {"load_reward_model": lambda path, **kw: load_reward_scorer(path, host=host, **kw)}
    proxy_fn = build_reward(substitute_run_dir(cfg.ppo.rewards, run_dir), context=context)
    gold_fn = build_reward(substitute_run_dir(cfg.eval.gold, run_dir), context=context)
    reward_state = None
    if series and series[0].checkpoints and any(c.normalizer is not None for c in proxy_fn.components):
        final_ckpt = series[0].checkpoints[-1][1].parent
        if Checkpoints(final_ckpt.parent, "ppo").is_checkpoint(final_ckpt):
            reward_state = load_state(final_ckpt).get("reward")
    _freeze_normalizers(proxy_fn, reward_state, "proxy")
    _freeze_normalizers(gold_fn, None, "gold")
    # A monitor that is the gold itself (the default config watches VADER live) is not scored twice; the
    # parts of a gold made of several are (the demo of configs/overopt.yaml reads them along KL).
    watched = [spec if isinstance(spec, dict) else {"name": spec}
               for spec in substitute_run_dir(cfg.ppo.monitor, run_dir)]
    if len(watched) == 1 and [_same_reward(watched[0])] == [_same_reward(g) for g in cfg.eval.gold]:
        watched = []
    watch_fn = build_reward(watched, context=context) if watched else None
    return Rewards(proxy_fn, gold_fn, watch_fn)


def _same_reward(spec) -> tuple:
    """What makes two reward specs score alike: name and args (not id, weight or normalisation)."""
    spec = spec if isinstance(spec, dict) else {"name": spec}
    return str(spec.get("name")), repr(sorted((spec.get("args") or {}).items()))


def _sampling_plan(cfg: PipelineConfig, stack: Stack, encoded: list[list[int]]) -> SamplingPlan:
    """How every model is sampled: PPO's temperature, eval's budget, merged weights where PPO would."""
    pc, ec = cfg.ppo, cfg.eval
    stop_ids = rollout.stop_token_ids(stack.tok, stack.base_model)
    device = next(stack.peft_model.parameters()).device
    dtype = loading.compute_dtype(cfg.model, device)
    merged = stacking.sample_from_merged(stack.peft_model, pc.rollout_weights, pc.rollout_merge_max_gb, dtype)
    return SamplingPlan(encoded, ec.samples_per_prompt, pc.temperature, ec.max_new_tokens, stop_ids,
                        ec.batch_size, merged, float32=dtype == torch.float32)


def _checkpoint_specs(stack: Stack, series: list[Series]) -> tuple[list[ModelSpec], dict[str, dict]]:
    """The base, SFT (when there is one) and every checkpoint of every series, in that order; with the
    checkpoints' manifest entries, ``"ppo:<name>" -> {"path", "sha256"}``."""
    specs = [ModelSpec("base", "base", None)]
    if stack.has_sft:
        specs.append(ModelSpec("sft", "sft", [SFT]))
    checkpoints = {}
    for s in series:
        stacked_on = list(s.manifest.get("stacked_on", list(stack.adapters)))
        for step, policy_dir in s.checkpoints:
            name = f"step-{step:06d}" if policy_dir.name == "policy" else "final"
            name = f"{s.key}/{name}" if len(series) > 1 else name
            specs.append(ModelSpec("ppo", name, stacked_on + [s.slot], step=step, policy_dir=policy_dir,
                                   slot=s.slot, series=s.key))
            checkpoints[f"ppo:{name}"] = {"path": str(policy_dir),
                                          "sha256": hashing.sha256_file(policy_dir / "adapter_model.safetensors")}
    return specs, checkpoints


def _fused_models(stack: Stack, fused: list[tuple[Path, dict]], checkpoints: dict[str, dict],
                  last_ppo: Optional[str]) -> tuple[list[ModelSpec], dict[str, dict], dict[str, str]]:
    """The fuse outputs' models loaded into ``stack``: ``(specs, manifest entries, duplicates)``.

    A fuse output that is exactly the cat of SFT and one of ``checkpoints`` is that checkpoint's model and
    is not loaded (``duplicates``: folder -> checkpoint name). The others sample with the seed of
    ``last_ppo``, the last checkpoint: a fusion of SFT + PPO is compared with the policy it fuses under
    common random numbers.
    """
    sft = stack.consumed.get(SFT)
    checkpoint_shas = {v["sha256"]: k.removeprefix("ppo:") for k, v in checkpoints.items()}
    duplicates = {}
    for folder, manifest in fused:
        same = exact_copy_of(manifest, (sft or {}).get("sha256"), checkpoint_shas)
        if same is not None:
            duplicates[str(folder)] = same
            print(f"[eval] {folder} is the exact cat fusion of SFT and {same}: the same model, not sampled again",
                  flush=True)
    fused = [(f, m) for f, m in fused if str(f) not in duplicates]
    specs, consumed = _fused_specs(stack.peft_model, fused, stack.base, sft)
    for sp in specs:
        sp.seed_name = last_ppo
    return specs, consumed, duplicates


def _load_policy(peft_model, spec: ModelSpec) -> None:
    """Load ``spec``'s checkpoint (if it has one) into its policy slot, checking every tensor landed."""
    if spec.policy_dir is not None:
        stacking.load_adapter_weights(peft_model, spec.slot, spec.policy_dir)
        _check_adapter_loaded(peft_model, spec.slot, spec.policy_dir)


def _sample_and_score(stack: Stack, plan: SamplingPlan, rewards: Rewards, prompts: list[dict], spec: ModelSpec,
                      base_seed: int) -> Samples:
    """``plan.k`` samples per prompt of ``spec``'s model, with KL to the reference, proxy and gold."""
    # Seeded by the name within its series: a checkpoint samples the same responses whichever other
    # series share the plot, and the same step of two series shares its sampling noise (common random
    # numbers: their difference is measured with less variance).
    seed = _seed(base_seed, (spec.seed_name or spec.name).rsplit("/", 1)[-1])
    samples = _sample(stack, plan, spec.adapters, plan.k, seed, desc=f"sample {spec.name}", gated=spec.gated)
    _score(samples, prompts, stack.tok, rewards, batch_size=max(16, plan.batch_size))
    return samples


def _model_points(specs: list[ModelSpec], results: dict[str, Samples], forgotten: dict[str, dict],
                  comparator: Samples) -> list[dict]:
    """One curve point per model, its gold win rate against ``comparator`` and its forgetting columns."""
    points = []
    for spec in specs:
        s = results[spec.name]
        win = win_rate(s.gold, comparator.gold)  # same (prompt, sample) order: sample j of prompt i vs j of i
        k = len(s.gold) // len(set(s.prompt_index)) if s.prompt_index else None  # samples per prompt
        points.append(make_point(spec.kind, spec.name, spec.step, s.kl_k1, s.kl_k3, s.proxy, s.gold, win,
                                 series=spec.series, per_prompt=k) | forgetting.columns(forgotten.get(spec.name))
                      | watched_columns(s.proxy_components, k))
    return points


def watched_columns(components: dict[str, list[float]], per_prompt: Optional[int] = None) -> dict:
    """``<key>_mean`` and ``<key>_se`` of what is drawn along KL besides proxy and gold: the monitors
    (``monitor/<id>``) and a reward ensemble's disagreement (``<component>/disagreement``); with
    ``per_prompt`` (samples per prompt) also ``<key>_by_prompt``, as :func:`make_point` keeps gold's."""
    out = {}
    for key, values in components.items():
        if key.startswith("monitor/") or key.endswith("/disagreement"):
            out[f"{key}_mean"], out[f"{key}_se"] = mean_se(values)
            if per_prompt is not None:
                out[f"{key}_by_prompt"] = prompt_means(values, per_prompt)
    return out


def _best_of_n(stack: Stack, plan: SamplingPlan, rewards: Rewards, prompts: list[dict], ec,
               comparator: Samples) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Best-of-n for every n in ``eval.best_of_n`` from one pool of ``max(n)`` samples per prompt of the
    starting model: ``(points, samples.jsonl rows, the pool's phase seconds)``; nothing when
    ``eval.best_of_n`` is empty."""
    if not ec.best_of_n:
        return [], [], {}
    m = max(ec.best_of_n)
    pool = _sample(stack, plan, stack.start, m, _seed(ec.seed, "best-of-n pool"), desc="sample best-of-n",
                   with_kl=False)
    _score(pool, prompts, stack.tok, rewards, batch_size=max(16, plan.batch_size))
    points, rows = [], []
    for b in bestofn.best_of_n(pool.proxy, pool.gold, comparator.gold, len(prompts), m, plan.k, ec.best_of_n):
        points.append(b.point | forgetting.columns(None))  # the start model's samples: no model of its own
        rows += [{"kind": "bon", "name": f"n={b.n}", "step": None, "prompt_index": i, "group": g,
                  "prompt": prompts[i]["prompt"][-1]["content"], "response": pool.texts[r],
                  "proxy": pool.proxy[r], "gold": pool.gold[r], "kl": b.kl}
                 for i, g, r in b.picks if g == 0][:_SAMPLES_TO_SAVE]
    return points, rows, pool.seconds


def phase_seconds(per_model: list[dict[str, float]], best_of_n: dict[str, float], forgetting_s: float,
                  total: float) -> dict[str, float]:
    """Where an eval's wall time went, in seconds: each phase summed over the models (``per_model``,
    :attr:`Samples.seconds`), best-of-n's pool on its own, the forgetting check, and the rest of
    ``total`` (loading, fitting, writing). E.g. two models with generate 3 and 5, kl 1 and 1, score 2 and 2,
    a pool of generate 4 + score 1, forgetting 2, total 25: generate 8, kl 2, score 4, best_of_n 5,
    forgetting 2, other 25 - 21 = 4."""
    phases = {k: round(sum(m.get(k, 0.0) for m in per_model), 1) for k in ("generate", "kl", "score")}
    phases["best_of_n"] = round(sum(best_of_n.values()), 1)
    phases["forgetting"] = round(forgetting_s, 1)
    phases["other"] = round(total - sum(phases.values()), 1)
    phases["total"] = round(total, 1)
    return phases


def _sample_rows(ev: Evaluation) -> list[dict]:
    """samples.jsonl: sample 0 of the first prompts of every model, then best-of-n's picks."""
    rows = []
    for spec in ev.specs:
        s = ev.results[spec.name]
        for r in range(len(s.texts)):
            if s.sample_index[r] != 0 or s.prompt_index[r] >= _SAMPLES_TO_SAVE:
                continue
            rows.append({"kind": spec.kind, "name": spec.name, "step": spec.step,
                         "prompt_index": s.prompt_index[r],
                         "prompt": ev.prompts[s.prompt_index[r]]["prompt"][-1]["content"],
                         "response": s.texts[r], "ended": s.ended[r], "proxy": s.proxy[r],
                         "proxy_components": {c: v[r] for c, v in s.proxy_components.items()},
                         "gold": s.gold[r], "kl_k1": s.kl_k1[r], "kl_k3": s.kl_k3[r]})
    return rows + ev.bon_rows


def _summary(cfg: PipelineConfig, ev: Evaluation, fits: dict) -> str:
    """summary.txt: what was measured, the table and fits, fusions not sampled, the forgetting table."""
    pc = cfg.ppo
    header = (f"eval of {ev.run_dir}: {len(ev.prompts)} prompts x {cfg.eval.samples_per_prompt} samples, "
              f"temperature {pc.temperature}, KL to the {pc.reference} reference (per sequence, nats); "
              f"win = gold win rate vs {ev.comparator} (ties half)")
    if len(ev.series) > 1:
        header += "\nseries: " + "; ".join(f"{series_title(s.key)} = {s.ppo_dir} ({s.source})" for s in ev.series)
    summary = summary_text(ev.points, header, fits)
    for folder, same in ev.duplicates.items():
        summary += f"{folder}: the exact cat fusion of SFT and {same}, the same model (its point is {same}'s)\n"
    if ev.forgetting.probe is not None:
        summary += "\n" + forgetting.table([(spec.name, ev.forgetting.models[spec.name]) for spec in ev.specs],
                                           ev.forgetting.probe.text)
    return summary


def _metrics(cfg: PipelineConfig, ev: Evaluation, fits: dict) -> dict:
    """The manifest's metrics: every point, the best gold overall and per series, gold at equal KL, each
    model's response statistics, the fits, and the forgetting check's results."""
    pc, ec = cfg.ppo, cfg.eval
    headline = ("name", "step", "gold_mean", "gold_se", "proxy_mean", "kl_k1_mean")
    best = best_gold(ev.points)
    best_per_series = {s.key: max(rl_family(ev.points, s.key), key=lambda p: p["gold_mean"], default=None)
                       for s in ev.series}
    per_model = {spec.name: {"eos_fraction": sum(ev.results[spec.name].ended) / len(ev.results[spec.name].ended),
                             "mean_response_tokens": sum(map(len, ev.results[spec.name].response_ids))
                             / len(ev.results[spec.name].response_ids),
                             "proxy_components": {c: mean_se(v)[0]
                                                  for c, v in ev.results[spec.name].proxy_components.items()}}
                 for spec in ev.specs}
    metrics = {"points": [json_safe(p) for p in ev.points], "best_gold": None if best is None else
               {k_: best[k_] for k_ in headline},
               "series": [{"key": s.key, "title": series_title(s.key), "algorithm": s.algorithm,
                           "source": s.source, "path": str(s.ppo_dir),
                           "samples_per_prompt": s.manifest.get("samples_per_prompt", 1),
                           "best_gold": None if best_per_series[s.key] is None else
                           {k_: best_per_series[s.key][k_] for k_ in headline}}
                          for s in ev.series],
               "gold_at_kl": gold_at_kl(ev.points, fits),
               "per_model": per_model, "fits": fits, "fused_not_sampled": ev.duplicates,
               "proxy_per_nat": proxy_per_nat(ev.points),
               "prompts": len(ev.prompts), "samples_per_prompt": ec.samples_per_prompt,
               **ev.prompt_lengths.metrics("prompts"),
               "temperature": pc.temperature, "reference": pc.reference}
    probe = ev.forgetting.probe
    metrics["seconds"] = ev.seconds
    if probe is not None:
        metrics["forgetting"] = {"source": ec.forgetting, "passages": probe.text.passages,
                                 "tokens": probe.text.tokens, "truncated": probe.text.truncated,
                                 "seconds": round(ev.forgetting.seconds, 1), "models": ev.forgetting.models}
    return metrics


def _data_entries(cfg: PipelineConfig, ev: Evaluation) -> dict:
    """The manifest's data: the eval prompts used and, with the forgetting check, its general text."""
    data = {"prompts": {**loaders.manifest_entry(cfg.data.prompts_eval, ev.report, cfg.data.split,
                                                 ev.prompt_lengths), "rows": len(ev.prompts)}}
    if ev.forgetting.probe is not None:
        data["forgetting"] = {"source": cfg.eval.forgetting, "sha256": loaders.data_hash(cfg.eval.forgetting),
                              "rows": ev.forgetting.probe.text.passages}
    return data


def _write_outputs(out: Path, overwrite: bool, cfg: PipelineConfig, ev: Evaluation, base: loading.BaseInfo,
                   rewards: Rewards) -> str:
    """Write curves.csv, curves.png, summary.txt, samples.jsonl and manifest.json into ``out`` atomically;
    returns the summary text."""
    pc = cfg.ppo
    fits = curve_fits(ev.points)
    summary = _summary(cfg, ev, fits)
    title = (f"Reward vs KL to the {pc.reference.upper()} reference: {ev.run_dir.name} "
             f"({len(ev.prompts)} prompts x {cfg.eval.samples_per_prompt} samples, T={pc.temperature}, "
             "error bars = 1 s.e.)")
    with atomic_output(out, overwrite=overwrite) as tmp:
        write_csv(ev.points, tmp / "curves.csv")
        plot_curves(ev.points, tmp / "curves.png", title, fits)
        (tmp / "summary.txt").write_text(summary)
        with open(tmp / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _sample_rows(ev))
        write_manifest(tmp, "eval", cfg, base, _metrics(cfg, ev, fits), adapters=ev.consumed,
                       data=_data_entries(cfg, ev), extra={"proxy": repr(rewards.proxy), "gold": repr(rewards.gold)})
    return summary


# ---------------------------------------------------------------------------------------------
# The stage


def run_eval(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Evaluate the models of ``run_dir`` (base, SFT, every PPO-family checkpoint, the fuse outputs) and
    best-of-n as described in the module docstring; write them to ``run_dir/eval`` and return that path."""
    from tqdm.auto import tqdm

    ec, pc = cfg.eval, cfg.ppo
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    _check_request(ec, out, overwrite)
    t_start = time.time()

    # 1. inputs, each read before any model loads so a bad path fails fast
    prompts, report = _load_eval_prompts(cfg)
    passages = forgetting.read_passages(ec.forgetting) if ec.forgetting else None
    fused = collect_fused(substitute_run_dir(ec.fused, run_dir))

    # 2. artifacts: SFT adapter; the PPO-family runs (RUN/ppo, eval.runs) and their checkpoints
    sft_dir = substitute_run_dir(pc.sft_adapter, run_dir)
    sft_dir = Path(sft_dir) if sft_dir else None
    series = _find_series(cfg, run_dir)

    # 3. one base, many adapters: sft + policy (+ the learned reward, attached by its loader)
    stack = _load_stack(cfg, sft_dir, series)
    forgetting_run = _start_forgetting(stack, passages, ec)

    # 4. rewards: the proxy (what PPO optimised) and the gold, both on the same in-memory base
    rewards = _build_rewards(cfg, run_dir, stack, series)

    # 5. the models to evaluate, all sampled on the same fitted prompts
    prompts, encoded, prompt_lengths = rollout.fit_prompts(stack.tok, prompts, report, pc.max_prompt_length,
                                                           cfg.data.long_rows, "eval prompts")
    print(f"[eval] {prompt_lengths.summary()}", flush=True)
    plan = _sampling_plan(cfg, stack, encoded)
    specs, checkpoints = _checkpoint_specs(stack, series)
    last_ppo = next((sp.name for sp in reversed(specs) if sp.kind == "ppo"), None)
    fused_specs, fused_consumed, duplicates = _fused_models(stack, fused, checkpoints, last_ppo)
    specs += fused_specs
    consumed = {**stack.consumed, **checkpoints, **fused_consumed}

    # 6. sample, score, KL (and forgetting), model by model
    print(f"[eval] {len(specs)} models x {len(prompts)} prompts x {plan.k} samples at temperature "
          f"{pc.temperature}, reference {pc.reference}; best-of-n {list(ec.best_of_n)}", flush=True)
    results: dict[str, Samples] = {}
    for spec in tqdm(specs, desc="eval models"):
        _load_policy(stack.peft_model, spec)
        forgetting_run.measure(spec)
        results[spec.name] = _sample_and_score(stack, plan, rewards, prompts, spec, ec.seed)
    comparator = results["sft" if stack.has_sft else "base"]
    points = _model_points(specs, results, forgetting_run.models, comparator)

    # 7. best-of-n from the starting (SFT) model: one pool, disjoint groups of n per prompt
    bon_points, bon_rows, bon_seconds = _best_of_n(stack, plan, rewards, prompts, ec, comparator)
    seconds = phase_seconds([r.seconds for r in results.values()], bon_seconds, forgetting_run.seconds,
                            time.time() - t_start)
    print("[eval] time: " + ", ".join(f"{k} {v:,.0f} s" for k, v in seconds.items()), flush=True)

    # 8. outputs in RUN/eval, written atomically
    ev = Evaluation(run_dir, prompts, report, prompt_lengths, series, specs, results, points + bon_points,
                    bon_rows, duplicates, forgetting_run, consumed, comparator="SFT" if stack.has_sft else "base",
                    seconds=seconds)
    summary = _write_outputs(out, overwrite, cfg, ev, stack.base, rewards)
    sys.stdout.write("\n" + summary)
    print(f"[eval] done -> {out}", flush=True)
    return out
