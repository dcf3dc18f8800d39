"""The points of `rlhf eval` and what is made of them: Gao et al. fits, the summary table, curves.png and
curves.csv. Pure functions of the per-model point dicts (:func:`make_point`); no models here.

A point's ``kind`` is base | sft | ppo (a checkpoint of the `rlhf ppo` stage, whatever its
``ppo.algorithm``) | bon (best-of-n); its ``series`` names the curve it belongs to.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

CSV_COLUMNS = ("kind", "name", "step", "kl_k1_mean", "kl_k1_se", "kl_k3_mean", "sqrt_kl", "proxy_mean",
               "proxy_se", "gold_mean", "gold_se", "win_rate", "win_lo", "win_hi", "n_samples")
X_LABEL = "sqrt(KL to reference) [nats^0.5]"


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


def make_point(kind: str, name: str, step: Optional[int], k1: Sequence[float], k3: Sequence[float],
           proxy: Sequence[float], gold: Sequence[float], win: tuple[float, float, float]) -> dict:
    k1_mean, k1_se = mean_se(k1)
    k3_mean, _ = mean_se(k3)
    proxy_mean, proxy_se = mean_se(proxy)
    gold_mean, gold_se = mean_se(gold)
    return {"kind": kind, "name": name, "step": step, "kl_k1_mean": k1_mean, "kl_k1_se": k1_se,
            "kl_k3_mean": k3_mean, "sqrt_kl": math.sqrt(max(k1_mean, 0.0)), "proxy_mean": proxy_mean,
            "proxy_se": proxy_se, "gold_mean": gold_mean, "gold_se": gold_se, "win_rate": win[0],
            "win_lo": win[1], "win_hi": win[2], "n_samples": len(gold)}


def best_gold(points: list[dict]) -> Optional[dict]:
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
    best = best_gold(points)
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
    best = best_gold(points)
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


def json_safe(point: dict) -> dict:
    """NaN (a standard error of one sample) as null, so the manifest is strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in point.items()}


def write_csv(points: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for p in points:
            w.writerow(["" if p[c] is None else repr(p[c]) if isinstance(p[c], float) else p[c]
                        for c in CSV_COLUMNS])
