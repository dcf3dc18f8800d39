"""Reading over-optimisation off an eval's curves: where gold peaks along KL and how far it then falls
(with its standard error), where a watched signal (a held-out reward-model member) peaks, and where the
Gao et al. 2022 fit predicts the peak. Pure functions of the points `rlhf eval` writes."""
from __future__ import annotations

import math
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
    se = lambda p: p.get(f"{key}_se") or 0.0  # noqa: E731
    fall = peak[f"{key}_mean"] - last[f"{key}_mean"]
    unpaired = math.hypot(se(peak), se(last))
    a, b = peak.get(f"{key}_by_prompt"), last.get(f"{key}_by_prompt")
    paired = peak is not last and a is not None and b is not None and len(a) == len(b) >= 2
    fall_se = paired_diff(a, b)[1] if paired else unpaired
    return Fall(key, peak["name"], peak["kl_k1_mean"], peak[f"{key}_mean"], se(peak), last["name"],
                last["kl_k1_mean"], last[f"{key}_mean"], fall, fall_se, unpaired, len(a) if paired else 0)


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
