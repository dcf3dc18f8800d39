"""Reading over-optimisation off an eval's curves: where gold peaks along KL and how far it then falls
(with its standard error), where a watched signal (a held-out reward-model member) peaks, and where the
Gao et al. 2022 fit predicts the peak. Pure functions of the points `rlhf eval` writes."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from pipeline.evaluation.curves import rl_family
from pipeline.evaluation.stats import paired_diff


@dataclass
class Fall:
    """Along one series (its start point first, then checkpoints by step): the peak of ``key`` (name,
    KL, mean, se), the last point's mean, and the fall ``peak - last`` with its standard error.

    Where both points keep per-prompt means (``<key>_by_prompt``, eval's points do) the error is the
    paired one over prompts (:func:`pipeline.evaluation.stats.paired_diff`): both models answered the
    same prompts, so a prompt's own effect cancels, and a prompt's samples count as one observation, not
    as k independent ones. ``unpaired_se`` is sqrt(se_peak^2 + se_last^2) from the points' own errors,
    what older evals (no per-prompt means) fall back to."""
    key: str
    peak_name: str
    peak_kl: float
    peak: float
    peak_se: float
    last_name: str
    last_kl: float
    last: float
    fall: float
    fall_se: float
    unpaired_se: float
    paired_prompts: int = 0  # how many prompts the paired error is over; 0: unpaired

    @property
    def fall_in_se(self) -> float:
        return self.fall / self.fall_se if self.fall_se > 0 else float("inf") if self.fall > 0 else 0.0


def fall_along(points: list[dict], series: str, key: str = "gold") -> Optional[Fall]:
    """The peak of ``<key>_mean`` along ``series`` (the SFT point, else the base, counts as its start) and
    its fall to the series' last checkpoint. E.g. means 0.5 (SFT), 0.7, 0.6 with SEs 0.01, 0.02, 0.03:
    peak 0.7, fall 0.1 +- sqrt(0.02^2 + 0.03^2) = 0.036, 2.77 SE; paired instead where both points keep
    per-prompt means (:class:`Fall`)."""
    start = [p for p in points if p["kind"] == "sft"][:1] or [p for p in points if p["kind"] == "base"][:1]
    fam = start + sorted(rl_family(points, series), key=lambda p: p["step"])
    fam = [p for p in fam if p.get(f"{key}_mean") is not None]
    if len(fam) < 2:
        return None
    peak = max(fam, key=lambda p: p[f"{key}_mean"])
    last = fam[-1]
    fall = peak[f"{key}_mean"] - last[f"{key}_mean"]
    unpaired = _unpaired_se(peak, last, key)
    n = 0 if peak is last else _paired_prompts(peak, last, key)
    fall_se = paired_diff(peak[f"{key}_by_prompt"], last[f"{key}_by_prompt"])[1] if n else unpaired
    return Fall(key, peak["name"], peak["kl_k1_mean"], peak[f"{key}_mean"], peak.get(f"{key}_se") or 0.0,
                last["name"], last["kl_k1_mean"], last[f"{key}_mean"], fall, fall_se, unpaired, n)


def _paired_prompts(a: dict, b: dict, key: str) -> int:
    """How many prompts two points can be paired over on ``key`` (both keep per-prompt means of one
    length, at least 2); 0 when they cannot."""
    pa, pb = a.get(f"{key}_by_prompt"), b.get(f"{key}_by_prompt")
    return len(pa) if pa is not None and pb is not None and len(pa) == len(pb) >= 2 else 0


def _unpaired_se(a: dict, b: dict, key: str) -> float:
    return math.hypot(a.get(f"{key}_se") or 0.0, b.get(f"{key}_se") or 0.0)


def report_lines(points: list[dict], fits: dict, series: list[str], watched: list[str]) -> list[str]:
    """One block per series: gold's peak and fall, the proxy's, each watched key's peak, the Gao fit's
    predicted peak."""
    lines = []
    for s in series:
        lines.append(f"series {s}:")
        for key in ["gold", "proxy", *watched]:
            f = fall_along(points, s, key)
            if f is None:
                continue
            lines.append(f"  {key:<28} peak {f.peak:+.3f} +- {f.peak_se:.3f} at {f.peak_name} (KL {f.peak_kl:.2f}); "
                         f"last {f.last:+.3f} at {f.last_name} (KL {f.last_kl:.2f}); fall {f.fall:+.3f} +- "
                         f"{f.fall_se:.3f} ({f.fall_in_se:.1f} SE" + (
                             f", paired over {f.paired_prompts} prompts; unpaired +- {f.unpaired_se:.3f}, "
                             f"{f.fall / f.unpaired_se if f.unpaired_se > 0 else 0.0:.1f} SE)"
                             if f.paired_prompts else ", unpaired)"))
        fit = fits.get(s) or {}
        if fit.get("peak_kl") is not None:
            lines.append(f"  Gao fit (rl form) predicts the gold peak at KL {fit['peak_kl']:.2f}, gold "
                         f"{fit['peak_gold']:+.3f}")
        elif fit:
            lines.append(f"  Gao fit: no peak within {4:g}x the measured KL"
                         + (f" (extrapolated to KL {fit['peak_beyond_kl']:.1f})" if fit.get("peak_beyond_kl") else ""))
    return lines


@dataclass
class ArmReading:
    """One arm of a comparison against a reference arm (an ensemble against the single reward model) over
    the seeds both ran: each seed's fall of ``key`` from the arm's own peak, and the difference of the last
    checkpoints' means (arm - reference) with its standard error, paired over prompts where the points keep
    per-prompt means. ``fall`` and ``ref_fall`` are means over seeds; ``last_diff`` too, with
    ``last_diff_se = sqrt(sum se_i^2) / n``."""
    arm: str
    seeds: list[int]
    fall: float
    ref_fall: float
    last_diff: float
    last_diff_se: float
    paired: bool

    @property
    def fall_ratio(self) -> float:
        return self.fall / self.ref_fall if self.ref_fall > 0 else math.inf

    @property
    def last_diff_in_se(self) -> float:
        return self.last_diff / self.last_diff_se if self.last_diff_se > 0 else math.inf


def last_difference(points: list[dict], series: str, reference: str, key: str = "gold") -> tuple[float, float, bool]:
    """``(difference, se, paired)`` of the last checkpoints' ``<key>_mean``, ``series`` minus ``reference``:
    paired over prompts where both keep ``<key>_by_prompt`` of one length, else sqrt(se_a^2 + se_b^2)."""
    last = {}
    for name in (series, reference):
        fam = rl_family(points, name)
        if not fam:
            raise ValueError(f"no checkpoint in series {name!r}")
        last[name] = max(fam, key=lambda p: p["step"])
    a, b = last[series], last[reference]
    if _paired_prompts(a, b, key):
        return (*paired_diff(a[f"{key}_by_prompt"], b[f"{key}_by_prompt"]), True)
    return a[f"{key}_mean"] - b[f"{key}_mean"], _unpaired_se(a, b, key), False


def compare_arms(points: list[dict], arms: dict[str, dict[int, str]], reference: str = "single",
                 key: str = "gold") -> list[ArmReading]:
    """Every arm of ``arms`` (arm -> {seed: series key}) but ``reference``, read against ``reference`` over
    the seeds both have. E.g. single falls 0.2 and 0.1 (seeds 1, 2), mean falls 0.05 and 0.07 and ends
    +0.10 +- 0.03 and +0.20 +- 0.04 above single: fall 0.06 against 0.15 (0.4x), last +0.15 +-
    sqrt(0.03^2 + 0.04^2) / 2 = 0.025 (6 SE)."""
    out = []
    ref = arms.get(reference, {})
    for arm, by_seed in arms.items():
        seeds = sorted(s for s in by_seed if s in ref)
        if arm == reference or not seeds:
            continue
        falls = [fall_along(points, by_seed[s], key) for s in seeds]
        ref_falls = [fall_along(points, ref[s], key) for s in seeds]
        diffs = [last_difference(points, by_seed[s], ref[s], key) for s in seeds]
        n = len(seeds)
        out.append(ArmReading(arm, seeds, sum(f.fall for f in falls) / n, sum(f.fall for f in ref_falls) / n,
                              sum(d[0] for d in diffs) / n, math.sqrt(sum(d[1] ** 2 for d in diffs)) / n,
                              all(d[2] for d in diffs)))
    return out


_ARM = re.compile(r"(?:^|:)([A-Za-z_]+)-s(\d+)$")


def arms_of(series: list[str]) -> dict[str, dict[int, str]]:
    """The comparison's arms among series keys named after `make overopt-compare`'s folders,
    ``<arm>-s<seed>``: ``["ppo:single-s42", "ppo:mean-s42", "ppo"]`` -> ``{"single": {42: "ppo:single-s42"},
    "mean": {42: "ppo:mean-s42"}}``."""
    out: dict[str, dict[int, str]] = {}
    for key in series:
        m = _ARM.search(key)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = key
    return out


def comparison_lines(readings: list[ArmReading], reference: str = "single", key: str = "gold") -> list[str]:
    """What issue 21 asks of each arm against the reference: its fall from its own peak at most half the
    reference's, and its last checkpoint's ``key`` at least 2 standard errors above the reference's."""
    lines = []
    for r in readings:
        seeds = " ".join(map(str, r.seeds))
        lines.append(f"{r.arm} against {reference} (seeds {seeds}): {key} falls {r.fall:+.3f} from its peak, "
                     f"{r.fall_ratio:.2f}x {reference}'s {r.ref_fall:+.3f}; last checkpoint {r.last_diff:+.3f} +- "
                     f"{r.last_diff_se:.3f} ({r.last_diff_in_se:.1f} SE, {'paired over prompts' if r.paired else 'unpaired'})"
                     f" -> fall <= 0.5x: {'yes' if r.fall_ratio <= 0.5 else 'no'}; last >= +2 SE: "
                     f"{'yes' if r.last_diff_in_se >= 2 else 'no'}")
    return lines
