"""`rlhf eval`: KL-versus-reward curves for the base, the SFT model, every PPO checkpoint and best-of-n.

Everything runs on one NF4 base in memory, as in PPO (DESIGN.md section 3):

- "base"       all adapters off
- "sft"        the SFT adapter only
- step-NNNNNN  the PPO policy adapter of a checkpoint, stacked on the adapters PPO stacked it on (SFT)
- the learned proxy reward, when trained on the same base, is one more adapter on it

For each model, ``eval.samples_per_prompt`` responses per eval prompt are sampled at the PPO training
temperature (through :func:`pipeline.rollout.generate`, top_k=0, top_p=1) and each sequence gets:

- its KL to the PPO reference (``ppo.reference``: "sft" = SFT adapter only, "base" = no adapters):
  the sum over response tokens of k1 = logp - logp_ref, and of k3, both from logits / temperature
  exactly as PPO computes them; reported as the mean over sequences (and k1's standard error);
- the proxy reward (``ppo.rewards``, what PPO optimised) and the gold reward (``eval.gold``);
- a gold win against the SFT model's response to the same prompt (sample j vs sample j; ties count
  half), summarised as a win rate with a 95% Wilson interval.

Best-of-n baseline: ``max(eval.best_of_n)`` responses per prompt are sampled once from the SFT model;
for each n they are split into disjoint groups of n, the proxy picks the best of each group, and
the pick is scored by proxy and gold. Its KL to the SFT model is the analytic ``log n - (n-1)/n``.

Outputs in ``RUN/eval/`` (written atomically): ``curves.csv``, ``curves.png``, ``summary.txt``,
``samples.jsonl`` and ``manifest.json`` (stage "eval", the table in ``metrics.points``).

Running reward normalisation (``normalize: {kind: running}``) is a training-time shaping: here a
normalised component uses the statistics saved in the final PPO checkpoint, frozen, so every model
is scored on the same scale; without saved statistics the raw score is used.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline import data, models, ppo_math, rollout
from pipeline.artifacts import (ArtifactError, atomic_output, check_same_base, is_complete, read_manifest,
                                write_manifest)
from pipeline.checkpoints import Checkpoints, load_state
from pipeline.config import ConfigError, PipelineConfig, substitute_run_dir

__all__ = ["CSV_COLUMNS", "mean_se", "win_rate", "wilson_interval", "bon_kl", "exact_kl", "sequence_kl",
           "run_eval"]

SFT, POLICY = "sft", "policy"
CSV_COLUMNS = ("kind", "name", "step", "kl_k1_mean", "kl_k1_se", "kl_k3_mean", "sqrt_kl", "proxy_mean",
               "proxy_se", "gold_mean", "gold_se", "win_rate", "win_lo", "win_hi", "n_samples")
X_LABEL = "sqrt(KL to reference) [nats^0.5]"
Z95 = 1.959963984540054
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SAMPLES_TO_SAVE = 4  # responses per model in samples.jsonl (sample 0 of the first prompts)


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)``.

    Returns ``(nan, nan)`` for no values and ``(x, nan)`` for one value (no spread to estimate).
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``rate`` observed over ``n`` trials (default 95%)."""
    if n <= 0:
        return math.nan, math.nan
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (rate + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(rate * (1.0 - rate), 0.0) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Paired win rate of ``a`` over ``b``: ``(wins + ties / 2) / n``, with a Wilson interval.

    ``a[k]`` and ``b[k]`` are the scores of the two responses of pair ``k``. Returns
    ``(rate, lo, hi)``; all NaN for no pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    rate = wins / n
    lo, hi = wilson_interval(rate, n, z)
    return rate, lo, hi


def bon_kl(n: int) -> float:
    """Analytic KL(best-of-n || base policy) = ``log n - (n - 1) / n`` nats (Stiennon et al. 2020)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def exact_kl(p, q) -> float:
    """``KL(p || q) = sum_v p_v log(p_v / q_v)`` for two categorical distributions (probabilities, (V,)).

    Terms with ``p_v == 0`` are 0; ``q_v == 0`` where ``p_v > 0`` gives ``inf``.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    support = p > 0
    if bool((q[support] <= 0).any()):
        return math.inf
    return float((p[support] * (p[support].log() - q[support].log())).sum())


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """Per-sequence KL estimate: the sum over real response tokens of the per-token estimator.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the sampling model.
        ref_logprobs: ``(B, T)`` log-probabilities of the same tokens under the reference.
        mask: ``(B, T)`` bool or float, 1 on real response tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (:func:`pipeline.ppo_math.kl_per_token`).

    Returns:
        ``(B,)`` float64. Padding contributes exactly 0 whatever its logprobs are.
    """
    per_token = ppo_math.kl_per_token(logprobs.double(), ref_logprobs.double(), estimator)
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(dim=-1)


def fit_gao(d: Sequence[float], r: Sequence[float], form: str) -> Optional[tuple[float, float]]:
    """Least-squares fit of Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model
    Overoptimization", arXiv 2210.10760, eqs. 1-2) to gold gains ``r`` at ``d = sqrt(KL)``:

    - ``form="bon"``: R(d) = d (alpha - beta d)       (best-of-n)
    - ``form="rl"``:  R(d) = d (alpha - beta log d)   (RL)

    Both are linear in (alpha, beta) with no intercept (R(0) = 0: gains are relative to the starting
    model), so ordinary least squares on the features ``[d, -d^2]`` or ``[d, -d log d]`` solves them.
    Points with ``d <= 0`` are skipped (they carry no information and log 0 is undefined). Returns
    ``(alpha, beta)``, or None with fewer than 2 usable points or a singular system.
    """
    pts = [(float(x), float(y)) for x, y in zip(d, r) if x > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 2 or form not in ("bon", "rl"):
        return None
    feats = [(x, -(x * x if form == "bon" else x * math.log(x))) for x, _ in pts]
    # Normal equations of the 2-parameter fit.
    a11 = math.fsum(f[0] * f[0] for f in feats)
    a12 = math.fsum(f[0] * f[1] for f in feats)
    a22 = math.fsum(f[1] * f[1] for f in feats)
    b1 = math.fsum(f[0] * y for f, (_, y) in zip(feats, pts))
    b2 = math.fsum(f[1] * y for f, (_, y) in zip(feats, pts))
    det = a11 * a22 - a12 * a12
    if abs(det) <= 1e-12 * max(a11 * a22, 1e-300):
        return None
    return (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det


def gao_curve(d: float, alpha: float, beta: float, form: str) -> float:
    """R(d) of :func:`fit_gao`'s functional forms (R(0) = 0)."""
    if d <= 0:
        return 0.0
    return d * (alpha - beta * (d if form == "bon" else math.log(d)))


def gao_peak(alpha: float, beta: float, form: str) -> Optional[tuple[float, float]]:
    """``(d*, R*)`` where the fitted curve peaks, or None when it has no maximum (beta <= 0).

    bon: dR/dd = alpha - 2 beta d = 0  ->  d* = alpha / (2 beta),  R* = alpha^2 / (4 beta).
    rl:  dR/dd = alpha - beta (log d + 1) = 0  ->  d* = exp(alpha / beta - 1),  R* = beta d*.
    """
    if beta <= 0:
        return None
    if form == "bon":
        return alpha / (2 * beta), alpha * alpha / (4 * beta)
    x = alpha / beta - 1
    if x > 50:  # exp overflow: the peak is far beyond any KL a run reaches
        return None
    d = math.exp(x)
    return d, beta * d


def curve_fits(points: list[dict]) -> dict:
    """Gao fits of gold gain over the starting (SFT, else base) point for PPO and best-of-n.

    Returns ``{"ppo": {...}, "bon": {...}}`` with alpha, beta, the predicted peak (``peak_kl`` in nats,
    ``peak_gold`` absolute) and the points used; a family without a fit is left out.
    """
    start = next((p for p in points if p["kind"] == "sft"), None) or next(
        (p for p in points if p["kind"] == "base"), None)
    if start is None:
        return {}
    g0 = start["gold_mean"]
    out = {}
    for kind, form in (("ppo", "rl"), ("bon", "bon")):
        fam = [p for p in points if p["kind"] == kind]
        fit = fit_gao([p["sqrt_kl"] for p in fam], [p["gold_mean"] - g0 for p in fam], form)
        if fit is None:
            continue
        alpha, beta = fit
        peak = gao_peak(alpha, beta, form)
        out[kind] = {"form": form, "alpha": alpha, "beta": beta, "gold_start": g0, "n_points": len(fam),
                     "peak_kl": None if peak is None else peak[0] ** 2,
                     "peak_gold": None if peak is None else g0 + peak[1]}
    return out


# ---------------------------------------------------------------------------------------------
# Models, rewards and sampling


@dataclass
class ModelSpec:
    kind: str  # base | sft | ppo
    name: str
    adapters: Optional[list[str]]  # None: every adapter off
    step: Optional[int] = None
    policy_dir: Optional[Path] = None  # PPO checkpoint's policy adapter


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
    """A per-model seed: models sample independently (win rates assume independent pairs)."""
    return (base_seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31 - 1_000_000)


def _sample(peft_model, tok, encoded: list[list[int]], k: int, adapters: Optional[list[str]],
            reference: Optional[list[str]], temperature: float, max_new_tokens: int, stop_ids: list[int],
            batch_size: int, seed: int, desc: str, with_kl: bool = True, merged: bool = False) -> Samples:
    """``k`` responses per prompt under ``adapters``, with per-sequence KL to ``reference``.

    With ``merged`` the responses are sampled from dense weights with the adapters merged in (as PPO's
    rollouts are, ``ppo.rollout_weights``; 2x faster on CPU); the KL is always computed through the
    adapters themselves, so it is the KL of the model as trained.
    """
    from tqdm.auto import tqdm

    device = next(peft_model.parameters()).device
    rows = [(i, j) for i in range(len(encoded)) for j in range(k)]
    out = Samples()
    batches = []
    weights = models.merged_linear_weights if merged else lambda model: contextlib.nullcontext()
    with models.active_adapters(peft_model, adapters), weights(peft_model):
        for b, s in enumerate(tqdm(range(0, len(rows), batch_size), desc=desc, leave=False)):
            chunk = rows[s:s + batch_size]
            query, query_mask = rollout.left_pad([encoded[i] for i, _ in chunk], tok.pad_token_id)
            response, mask, ended = rollout.generate(peft_model, tok, query, query_mask, max_new_tokens,
                                                     temperature, stop_ids, generator_seed=seed + b)
            batches.append((chunk, query, query_mask, response, mask, ended))
    for chunk, query, query_mask, response, mask, ended in batches:
        if with_kl:
            q, qm, r, m = (t.to(device) for t in (query, query_mask, response, mask))
            with torch.no_grad():
                with models.active_adapters(peft_model, adapters):
                    logp = rollout.forward_response(peft_model, q, qm, r, m, temperature).logprobs
                with models.active_adapters(peft_model, reference):
                    ref = rollout.forward_response(peft_model, q, qm, r, m, temperature).logprobs
            out.kl_k1.extend(sequence_kl(logp, ref, m, "k1").tolist())
            out.kl_k3.extend(sequence_kl(logp, ref, m, "k3").tolist())
        out.prompt_index.extend(i for i, _ in chunk)
        out.sample_index.extend(j for _, j in chunk)
        out.texts.extend(rollout.decode_responses(tok, response, mask))
        out.response_ids.extend(row[msk.bool()].tolist() for row, msk in zip(response, mask))
        out.ended.extend(bool(e) for e in ended)
    return out


def _score(samples: Samples, prompts: list[dict], tok, proxy_fn, gold_fn, batch_size: int) -> None:
    for s in range(0, len(samples.texts), batch_size):
        idx = samples.prompt_index[s:s + batch_size]
        msgs = [prompts[i]["prompt"] for i in idx]
        texts = samples.texts[s:s + batch_size]
        info = dict(prompt_messages=msgs, response_ids=samples.response_ids[s:s + batch_size], tokenizer=tok)
        last_user = [m[-1]["content"] for m in msgs]
        proxy = proxy_fn(last_user, texts, **info)
        samples.proxy.extend(proxy.total)
        for name, values in proxy.components.items():
            samples.proxy_components.setdefault(name, []).extend(values)
        samples.gold.extend(gold_fn(last_user, texts, **info).total)


def _check_adapter_loaded(peft_model, name: str, adapter_dir: Path) -> None:
    """``load_adapter_weights`` ignores missing keys; make sure every saved tensor really landed."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(peft_model, adapter_name=name)
    bad = [k for k, v in saved.items() if k not in live or not torch.equal(live[k].detach().cpu(), v)]
    if bad or not saved:
        raise ArtifactError(f"{adapter_dir}: adapter weights did not load into '{name}' "
                            f"({len(bad)} of {len(saved)} tensors differ, e.g. {bad[:2]})")


def _ppo_checkpoints(ppo_dir: Path) -> list[tuple[int, Path]]:
    ckpt_root = ppo_dir / "checkpoints"
    found = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "policy" / "adapter_model.safetensors").is_file():
                found.append((int(m.group(1)), d / "policy"))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Points, table, plot


def _point(kind: str, name: str, step: Optional[int], k1: Sequence[float], k3: Sequence[float],
           proxy: Sequence[float], gold: Sequence[float], win: tuple[float, float, float]) -> dict:
    k1_mean, k1_se = mean_se(k1)
    k3_mean, _ = mean_se(k3)
    proxy_mean, proxy_se = mean_se(proxy)
    gold_mean, gold_se = mean_se(gold)
    return {"kind": kind, "name": name, "step": step, "kl_k1_mean": k1_mean, "kl_k1_se": k1_se,
            "kl_k3_mean": k3_mean, "sqrt_kl": math.sqrt(max(k1_mean, 0.0)), "proxy_mean": proxy_mean,
            "proxy_se": proxy_se, "gold_mean": gold_mean, "gold_se": gold_se, "win_rate": win[0],
            "win_lo": win[1], "win_hi": win[2], "n_samples": len(gold)}


def _best_gold(points: list[dict]) -> Optional[dict]:
    ppo = [p for p in points if p["kind"] == "ppo"]
    pool = ppo or [p for p in points if p["kind"] in ("base", "sft")]
    return max(pool, key=lambda p: p["gold_mean"]) if pool else None


def _fmt(v: float, width: int, prec: int = 3) -> str:
    return f"{'nan':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{width}.{prec}f}"


def _pm(mean: float, se: float) -> str:
    if math.isnan(se):
        return f"{mean:8.3f}        "
    return f"{mean:8.3f} ± {se:5.3f}"


def summary_text(points: list[dict], header: str, fits: Optional[dict] = None) -> str:
    """An aligned table of the points, where gold peaks, PPO against best-of-n, and the curve fits."""
    lines = [header, ""]
    cols = (f"{'model':<13} {'KL k1 (nats)':>16} {'KL k3':>7} {'sqrtKL':>6}  {'proxy':>16}  {'gold':>16}  "
            f"{'win vs SFT [95% CI]':>21} {'n':>5}")
    lines += [cols, "-" * len(cols)]
    for p in points:
        win = "" if math.isnan(p["win_rate"]) else f"{p['win_rate']:.3f} [{p['win_lo']:.3f}, {p['win_hi']:.3f}]"
        lines.append(f"{p['name']:<13} {_pm(p['kl_k1_mean'], p['kl_k1_se'])} {_fmt(p['kl_k3_mean'], 7)} "
                     f"{_fmt(p['sqrt_kl'], 6)}  {_pm(p['proxy_mean'], p['proxy_se'])}  "
                     f"{_pm(p['gold_mean'], p['gold_se'])}  {win:>21} {p['n_samples']:>5}")
    lines.append("")
    best = _best_gold(points)
    if best is not None:
        where = "among PPO checkpoints" if best["kind"] == "ppo" else "(no PPO checkpoints)"
        lines.append(f"gold peaks at {best['name']} {where}: gold {best['gold_mean']:.3f} ± {best['gold_se']:.3f}, "
                     f"proxy {best['proxy_mean']:.3f}, KL {best['kl_k1_mean']:.3f} nats "
                     f"(sqrt {best['sqrt_kl']:.3f})")
        ppo = [p for p in points if p["kind"] == "ppo"]
        if ppo and ppo[-1] is not best:
            last = ppo[-1]
            lines.append(f"the last checkpoint {last['name']} has gold {last['gold_mean']:.3f} and proxy "
                         f"{last['proxy_mean']:.3f} at KL {last['kl_k1_mean']:.3f}")
    bon = [p for p in points if p["kind"] == "bon"]
    if bon:
        b = max(bon, key=lambda p: p["gold_mean"])
        lines.append(f"best-of-n's gold peaks at {b['name']}: gold {b['gold_mean']:.3f} ± {b['gold_se']:.3f} at "
                     f"KL {b['kl_k1_mean']:.3f} nats (analytic)")
        ppo = [p for p in points if p["kind"] == "ppo"]
        if ppo and best is not None and best["kind"] == "ppo":
            higher = best["gold_mean"] > b["gold_mean"]
            lines.append(f"PPO {'reached a higher' if higher else 'did not reach a higher'} gold than best-of-n: "
                         f"PPO {best['gold_mean']:.3f} at KL {best['kl_k1_mean']:.2f} nats, best-of-n "
                         f"{b['gold_mean']:.3f} at KL {b['kl_k1_mean']:.2f} nats (difference "
                         f"{best['gold_mean'] - b['gold_mean']:+.3f} ± {math.hypot(best['gold_se'], b['gold_se']):.3f})")
        efficiency = proxy_per_nat(points)
        if efficiency:
            lines.append("proxy gain per nat of KL (over the start), PPO vs best-of-n at the same KL "
                         "(interpolated):")
            for e in efficiency:
                bon_txt = "beyond best-of-n's KL range" if e["bon_per_nat"] is None else f"{e['bon_per_nat']:.3f}"
                lines.append(f"  {e['name']:<13} KL {e['kl']:.2f}: PPO {e['ppo_per_nat']:.3f}, best-of-n {bon_txt}")
    if fits:
        names = {"ppo": "PPO, R = d(alpha - beta log d)", "bon": "best-of-n, R = d(alpha - beta d)"}
        lines.append("Gao et al. 2022 fits of gold gain over the start against d = sqrt(KL):")
        for kind in ("ppo", "bon"):
            f = fits.get(kind)
            if not f:
                continue
            peak = ("no peak within the fit (beta <= 0: gold still rising)" if f["peak_kl"] is None else
                    f"predicted peak gold {f['peak_gold']:.3f} at KL {f['peak_kl']:.2f} nats")
            lines.append(f"  {names[kind]}: alpha {f['alpha']:.3f}, beta {f['beta']:.3f} ({f['n_points']} points); "
                         f"{peak}")
    return "\n".join(lines) + "\n"


def proxy_per_nat(points: list[dict]) -> list[dict]:
    """For each PPO checkpoint with KL > 0: its proxy gain over the starting model per nat of KL, and
    best-of-n's at the same KL, linearly interpolated between best-of-n points (None outside their range)."""
    start = next((p for p in points if p["kind"] == "sft"), None) or next(
        (p for p in points if p["kind"] == "base"), None)
    bon = sorted((p for p in points if p["kind"] == "bon"), key=lambda p: p["kl_k1_mean"])
    if start is None:
        return []
    p0 = start["proxy_mean"]
    out = []
    for p in points:
        if p["kind"] != "ppo" or not p["kl_k1_mean"] > 0:
            continue
        kl = p["kl_k1_mean"]
        bon_gain = None
        for lo, hi in zip(bon, bon[1:]):
            if lo["kl_k1_mean"] <= kl <= hi["kl_k1_mean"] and hi["kl_k1_mean"] > lo["kl_k1_mean"]:
                t = (kl - lo["kl_k1_mean"]) / (hi["kl_k1_mean"] - lo["kl_k1_mean"])
                bon_gain = lo["proxy_mean"] + t * (hi["proxy_mean"] - lo["proxy_mean"]) - p0
                break
        out.append({"name": p["name"], "kl": kl, "ppo_per_nat": (p["proxy_mean"] - p0) / kl,
                    "bon_per_nat": None if bon_gain is None else bon_gain / kl})
    return out


def _nan0(values):
    return [0.0 if (v is None or math.isnan(v)) else v for v in values]


def plot_curves(points: list[dict], path: Path, title: str, fits: Optional[dict] = None) -> None:
    """Proxy and gold reward against sqrt(KL): PPO checkpoints, best-of-n, base and SFT."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ppo = sorted([p for p in points if p["kind"] == "ppo"], key=lambda p: p["step"])
    bon = sorted([p for p in points if p["kind"] == "bon"], key=lambda p: p["sqrt_kl"])
    singles = [p for p in points if p["kind"] in ("base", "sft")]
    best = _best_gold(points)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    panels = (("proxy", "proxy reward (optimised by PPO)"), ("gold", "gold reward (held out)"))
    for ax, (key, label) in zip(axes, panels):
        if ppo:
            ax.errorbar([p["sqrt_kl"] for p in ppo], [p[f"{key}_mean"] for p in ppo],
                        yerr=_nan0([p[f"{key}_se"] for p in ppo]), fmt="-o", color="tab:blue", capsize=3,
                        lw=1.8, ms=5, label="PPO checkpoints")
            for p in ppo:
                ax.annotate(str(p["step"]), (p["sqrt_kl"], p[f"{key}_mean"]), textcoords="offset points",
                            xytext=(4, -11), fontsize=7, color="tab:blue")
        if bon:
            ax.errorbar([p["sqrt_kl"] for p in bon], [p[f"{key}_mean"] for p in bon],
                        yerr=_nan0([p[f"{key}_se"] for p in bon]), fmt="--s", color="tab:orange", capsize=3,
                        lw=1.5, ms=4, label="best-of-n (SFT samples, analytic KL)")
            for p in bon:
                ax.annotate(p["name"], (p["sqrt_kl"], p[f"{key}_mean"]), textcoords="offset points",
                            xytext=(4, 5), fontsize=7, color="tab:orange")
        for p in singles:
            color, marker = ("tab:gray", "D") if p["kind"] == "base" else ("tab:green", "^")
            ax.errorbar([p["sqrt_kl"]], [p[f"{key}_mean"]], yerr=_nan0([p[f"{key}_se"]]), fmt=marker,
                        color=color, capsize=3, ms=8, label=p["name"].upper() if p["kind"] == "sft" else "base")
            ax.annotate(p["name"].upper() if p["kind"] == "sft" else "base", (p["sqrt_kl"], p[f"{key}_mean"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=9, color=color, fontweight="bold")
        if key == "gold" and fits:
            for kind, color in (("ppo", "tab:blue"), ("bon", "tab:orange")):
                f = fits.get(kind)
                if not f:
                    continue
                # each fit drawn a little past its own points: an extrapolation far beyond them says little
                top = max([p["sqrt_kl"] for p in points if p["kind"] == kind] + [0.1])
                xs = [top * 1.2 * i / 100 for i in range(101)]
                ax.plot(xs, [f["gold_start"] + gao_curve(x, f["alpha"], f["beta"], f["form"]) for x in xs], ":",
                        color=color, lw=1.3, label=f"{'PPO' if kind == 'ppo' else 'best-of-n'} fit (Gao et al.)")
        if best is not None and best["kind"] == "ppo":
            ax.plot([best["sqrt_kl"]], [best[f"{key}_mean"]], linestyle="none", marker="*", ms=20,
                    color="gold", markeredgecolor="black", zorder=5, label=f"best gold: {best['name']}")
            if key == "gold":
                ax.annotate(f"best gold\n{best['name']}\n{best['gold_mean']:.3f}",
                            (best["sqrt_kl"], best["gold_mean"]), textcoords="offset points", xytext=(30, -55),
                            fontsize=8, arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.8},
                            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6", "alpha": 0.9})
        ax.set_xlabel(X_LABEL)
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0].capitalize())
        ax.grid(alpha=0.3)
        ax.set_xlim(left=-0.05 * max([p["sqrt_kl"] for p in points] + [1.0]))
    axes[0].legend(loc="best", fontsize=8, framealpha=0.85)
    if fits:
        axes[1].legend(handles=[h for h in axes[1].get_legend_handles_labels()[0]
                                if "fit" in str(h.get_label())], loc="lower right", fontsize=8, framealpha=0.85)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(point: dict) -> dict:
    """NaN (a standard error of one sample) as null, so the manifest is strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in point.items()}


def _write_csv(points: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for p in points:
            w.writerow(["" if p[c] is None else repr(p[c]) if isinstance(p[c], float) else p[c]
                        for c in CSV_COLUMNS])


# ---------------------------------------------------------------------------------------------
# The stage


def run_eval(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False) -> Path:
    from reward.registry import build_reward
    from tqdm.auto import tqdm

    from pipeline.reward_stage import load_reward_scorer

    ec, pc = cfg.eval, cfg.ppo
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    if is_complete(out) and not overwrite:
        raise ArtifactError(f"{out} already holds a complete eval output; pass --overwrite to replace it")
    if ec.prompts < 1 or ec.samples_per_prompt < 1:
        raise ConfigError(f"eval.prompts ({ec.prompts}) and eval.samples_per_prompt "
                            f"({ec.samples_per_prompt}) must be >= 1")
    bad_n = [n for n in ec.best_of_n if n < 1]
    if bad_n:
        raise ConfigError(f"eval.best_of_n: every n must be >= 1, got {bad_n}")

    # 1. prompts
    prompts, report = data.load_prompts(cfg.data.prompts_eval, **data.loader_options(cfg.data))
    if len(prompts) < ec.prompts:
        print(f"[eval] only {len(prompts)} eval prompts available (eval.prompts={ec.prompts})", flush=True)
    prompts = prompts[:ec.prompts]
    print(f"[eval] {report.summary()}; using {len(prompts)}", flush=True)

    # 2. artifacts: SFT adapter, PPO output and its checkpoints
    sft_dir = substitute_run_dir(pc.sft_adapter, run_dir)
    sft_dir = Path(sft_dir) if sft_dir else None
    ppo_dir = run_dir / "ppo"
    ppo_manifest = read_manifest(ppo_dir) if is_complete(ppo_dir) else None
    if ppo_manifest is None:
        print(f"[eval] no complete PPO output in {ppo_dir}: evaluating base, SFT and best-of-n only", flush=True)
    checkpoints = _ppo_checkpoints(ppo_dir) if ppo_manifest is not None else []
    if ppo_manifest is not None and not checkpoints and (ppo_dir / "adapter_model.safetensors").is_file():
        checkpoints = [(int(ppo_manifest.get("metrics", {}).get("steps", pc.steps)), ppo_dir)]
    if ppo_manifest is not None:
        trained = ppo_manifest.get("config", {}).get("ppo", {})
        for key in ("temperature", "reference"):
            if key in trained and trained[key] != getattr(pc, key):
                print(f"[eval] note: PPO trained with ppo.{key}={trained[key]!r}, this eval uses "
                      f"{getattr(pc, key)!r}", flush=True)

    # 3. one base, many adapters: sft + policy (+ the learned reward, attached by its loader)
    base_model, tok, base = models.load_base(cfg.model)
    consumed: dict = {}
    adapters: dict[str, Path] = {}
    if sft_dir is not None:
        check_same_base(read_manifest(sft_dir), base, f"SFT adapter {sft_dir}")
        adapters[SFT] = sft_dir
        consumed[SFT] = {"path": str(sft_dir),
                         "sha256": models.sha256_file(sft_dir / "adapter_model.safetensors")}
    if pc.reference == "sft" and sft_dir is None:
        raise ArtifactError("ppo.reference=sft needs ppo.sft_adapter; set ppo.reference=base to anchor to the base")
    from peft import LoraConfig

    if ppo_manifest is not None:
        check_same_base(ppo_manifest, base, f"PPO output {ppo_dir}")
        policy_cfg = LoraConfig.from_pretrained(str(ppo_dir if (ppo_dir / "adapter_config.json").is_file()
                                                    else checkpoints[0][1]))
        policy_cfg.inference_mode = True
        stacked_on = list(ppo_manifest.get("stacked_on", list(adapters)))
        missing = [a for a in stacked_on if a not in adapters]
        if missing:
            raise ArtifactError(f"the PPO policy in {ppo_dir} is stacked on {missing}, which this config does not "
                                "provide (ppo.sft_adapter)")
    else:
        policy_cfg = models.lora_config(pc.lora)  # a placeholder: the model must be a PeftModel for the reward
        stacked_on = list(adapters)
    peft_model = models.stack_adapters(base_model, adapters, trainable=None, new_adapter=(POLICY, policy_cfg))
    peft_model.eval()
    for p in peft_model.parameters():
        p.requires_grad_(False)
    reference = [SFT] if pc.reference == "sft" else None
    start = [SFT] if sft_dir is not None else None  # the model PPO started from: win rates and best-of-n
    device = next(peft_model.parameters()).device

    # 4. rewards: the proxy (what PPO optimised) and the gold, both on the same in-memory base
    context = {"load_reward_model": lambda path, **kw: load_reward_scorer(path, host=(peft_model, tok, base), **kw)}
    proxy_fn = build_reward(substitute_run_dir(pc.rewards, run_dir), context=context)
    gold_fn = build_reward(substitute_run_dir(ec.gold, run_dir), context=context)
    reward_state = None
    if checkpoints and any(c.normalizer is not None for c in proxy_fn.components):
        final_ckpt = checkpoints[-1][1].parent
        if Checkpoints(final_ckpt.parent, "ppo").is_checkpoint(final_ckpt):
            reward_state = load_state(final_ckpt).get("reward")
    _freeze_normalizers(proxy_fn, reward_state, "proxy")
    _freeze_normalizers(gold_fn, None, "gold")

    # 5. sample, score, KL
    encoded = rollout.encode_prompts(tok, [p["prompt"] for p in prompts], pc.max_prompt_length)
    stop_ids = rollout.stop_token_ids(tok, base_model)
    k = ec.samples_per_prompt
    batch_size = ec.batch_size
    merged = models.sample_from_merged(peft_model, pc.rollout_weights, pc.rollout_merge_max_gb,
                                       models.compute_dtype(cfg.model, device))
    specs = [ModelSpec("base", "base", None)]
    if sft_dir is not None:
        specs.append(ModelSpec("sft", "sft", [SFT]))
    for step, policy_dir in checkpoints:
        name = f"step-{step:06d}" if policy_dir.name == "policy" else "final"
        specs.append(ModelSpec("ppo", name, stacked_on + [POLICY], step=step, policy_dir=policy_dir))
        consumed[f"ppo:{name}"] = {"path": str(policy_dir),
                                   "sha256": models.sha256_file(policy_dir / "adapter_model.safetensors")}

    print(f"[eval] {len(specs)} models x {len(prompts)} prompts x {k} samples at temperature {pc.temperature}, "
          f"reference {pc.reference}; best-of-n {list(ec.best_of_n)}", flush=True)
    results: dict[str, Samples] = {}
    for spec in tqdm(specs, desc="eval models"):
        if spec.policy_dir is not None:
            models.load_adapter_weights(peft_model, POLICY, spec.policy_dir)
            _check_adapter_loaded(peft_model, POLICY, spec.policy_dir)
        s = _sample(peft_model, tok, encoded, k, spec.adapters, reference, pc.temperature, ec.max_new_tokens,
                    stop_ids, batch_size, _seed(ec.seed, spec.name), desc=f"sample {spec.name}", merged=merged)
        _score(s, prompts, tok, proxy_fn, gold_fn, batch_size=max(16, batch_size))
        results[spec.name] = s

    comparator = results["sft" if sft_dir is not None else "base"]
    points = []
    for spec in specs:
        s = results[spec.name]
        win = win_rate(s.gold, comparator.gold)  # same (prompt, sample) order: sample j of prompt i vs j of i
        points.append(_point(spec.kind, spec.name, spec.step, s.kl_k1, s.kl_k3, s.proxy, s.gold, win))

    # 6. best-of-n from the starting (SFT) model: one pool, disjoint groups of n per prompt
    bon_rows = []
    if ec.best_of_n:
        m = max(ec.best_of_n)
        pool = _sample(peft_model, tok, encoded, m, start, reference, pc.temperature, ec.max_new_tokens,
                       stop_ids, batch_size, _seed(ec.seed, "best-of-n pool"), desc="sample best-of-n", with_kl=False,
                       merged=merged)
        _score(pool, prompts, tok, proxy_fn, gold_fn, batch_size=max(16, batch_size))
        for n in sorted(set(ec.best_of_n)):
            groups = m // n
            proxy, gold, comp, picks = [], [], [], []
            for i in range(len(prompts)):
                for g in range(groups):
                    idx = [i * m + g * n + t for t in range(n)]
                    best = max(idx, key=lambda r: pool.proxy[r])  # first of equals on ties
                    proxy.append(pool.proxy[best])
                    gold.append(pool.gold[best])
                    # compare with an independent SFT sample of the same prompt
                    comp.append(comparator.gold[i * k + g % k])
                    picks.append((i, g, best))
            kl = bon_kl(n)
            point = _point("bon", f"n={n}", None, [kl] * len(gold), [kl] * len(gold), proxy, gold,
                           win_rate(gold, comp))
            point.update(kl_k1_mean=kl, kl_k1_se=0.0, kl_k3_mean=kl, sqrt_kl=math.sqrt(kl))
            points.append(point)
            bon_rows += [{"kind": "bon", "name": f"n={n}", "step": None, "prompt_index": i, "group": g,
                          "prompt": prompts[i]["prompt"][-1]["content"], "response": pool.texts[r],
                          "proxy": pool.proxy[r], "gold": pool.gold[r], "kl": kl}
                         for i, g, r in picks if g == 0][:_SAMPLES_TO_SAVE]

    # 7. outputs
    sample_rows = []
    for spec in specs:
        s = results[spec.name]
        for r in range(len(s.texts)):
            if s.sample_index[r] != 0 or s.prompt_index[r] >= _SAMPLES_TO_SAVE:
                continue
            sample_rows.append({"kind": spec.kind, "name": spec.name, "step": spec.step,
                                "prompt_index": s.prompt_index[r],
                                "prompt": prompts[s.prompt_index[r]]["prompt"][-1]["content"],
                                "response": s.texts[r], "ended": s.ended[r], "proxy": s.proxy[r],
                                "proxy_components": {c: v[r] for c, v in s.proxy_components.items()},
                                "gold": s.gold[r], "kl_k1": s.kl_k1[r], "kl_k3": s.kl_k3[r]})
    sample_rows += bon_rows
    extras = {spec.name: {"eos_fraction": sum(results[spec.name].ended) / len(results[spec.name].ended),
                          "mean_response_tokens": sum(map(len, results[spec.name].response_ids))
                          / len(results[spec.name].response_ids),
                          "proxy_components": {c: mean_se(v)[0]
                                               for c, v in results[spec.name].proxy_components.items()}}
              for spec in specs}
    header = (f"eval of {run_dir}: {len(prompts)} prompts x {k} samples, temperature {pc.temperature}, "
              f"KL to the {pc.reference} reference (per sequence, nats); win = gold win rate vs "
              f"{'SFT' if sft_dir is not None else 'base'} (ties half)")
    fits = curve_fits(points)
    summary = summary_text(points, header, fits)
    best = _best_gold(points)
    title = (f"Reward vs KL to the {pc.reference.upper()} reference: {run_dir.name} "
             f"({len(prompts)} prompts x {k} samples, T={pc.temperature}, error bars = 1 s.e.)")
    with atomic_output(out, overwrite=overwrite) as tmp:
        _write_csv(points, tmp / "curves.csv")
        plot_curves(points, tmp / "curves.png", title, fits)
        (tmp / "summary.txt").write_text(summary)
        with open(tmp / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in sample_rows)
        metrics = {"points": [_json_safe(p) for p in points], "best_gold": None if best is None else
                   {k_: best[k_] for k_ in ("name", "step", "gold_mean", "gold_se", "proxy_mean", "kl_k1_mean")},
                   "per_model": extras, "fits": fits, "proxy_per_nat": proxy_per_nat(points),
                   "prompts": len(prompts), "samples_per_prompt": k,
                   "temperature": pc.temperature, "reference": pc.reference}
        write_manifest(tmp, "eval", cfg, base, metrics, adapters=consumed,
                       data={"prompts": {"source": cfg.data.prompts_eval,
                                         "sha256": data.data_hash(cfg.data.prompts_eval), "rows": len(prompts)}},
                       extra={"proxy": repr(proxy_fn), "gold": repr(gold_fn)})
    sys.stdout.write("\n" + summary)
    print(f"[eval] done -> {out}", flush=True)
    return out
