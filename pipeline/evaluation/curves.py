"""The points of `rlhf eval` and what is made of them: Gao et al. fits, the summary table, curves.png and
curves.csv. Pure functions of the per-model point dicts (:func:`make_point`); no models here.

A point's ``kind`` is base | sft | ppo (a checkpoint of the `rlhf ppo` stage, whatever its
``ppo.algorithm``) | bon (best-of-n) | fused (a `rlhf fuse` output); its ``series`` names the curve it
belongs to.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

from pipeline.evaluation.stats import mean_se, prompt_means

CSV_COLUMNS = ("kind", "name", "step", "kl_k1_mean", "kl_k1_se", "kl_k3_mean", "sqrt_kl", "proxy_mean",
               "proxy_se", "gold_mean", "gold_se", "win_rate", "win_lo", "win_hi", "n_samples", "series",
               # the forgetting check (pipeline/evaluation/forgetting.py): empty for best-of-n and when eval.forgetting is ""
               "general_nll", "general_ppl", "general_kl_to_base")
X_LABEL = "sqrt(KL to reference) [nats^0.5]"
# One colour per RL series, the first as the single-run plot has always drawn PPO; orange, green and
# gray stay best-of-n's, SFT's and the base's.
SERIES_COLORS = ("tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:cyan", "tab:olive", "tab:pink")


def series_of(point: dict) -> str:
    """The curve a point belongs to: its RL series key for checkpoints ("ppo", "rloo", "grpo:sweep"),
    else its kind (base, sft, bon)."""
    return point.get("series") or point["kind"]


def rl_series(points: list[dict]) -> list[str]:
    """The RL series keys among ``points``, in order of first appearance."""
    return list(dict.fromkeys(series_of(p) for p in points if p["kind"] == "ppo"))


def rl_family(points: list[dict], key: str) -> list[dict]:
    return [p for p in points if p["kind"] == "ppo" and series_of(p) == key]


def series_title(key: str) -> str:
    """How a series key reads in the table, the legend and the summary: "ppo" -> "PPO",
    "grpo:sweep" -> "GRPO (sweep)"."""
    algorithm, _, run = key.partition(":")
    return algorithm.upper() + (f" ({run})" if run else "")


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


# A fitted peak further than this multiple of the largest measured KL is reported as outside the fit.
PEAK_REACH = 4.0


def curve_fits(points: list[dict]) -> dict:
    """Gao fits of gold gain over the starting (SFT, else base) point for each RL series and best-of-n.

    Returns ``{"ppo": {...}, "bon": {...}}`` (one entry per RL series key, e.g. also "rloo", and "bon")
    with alpha, beta, the predicted peak (``peak_kl`` in nats, ``peak_gold`` absolute) and the points
    used; a family without a fit is left out.
    """
    start = next((p for p in points if p["kind"] == "sft"), None) or next(
        (p for p in points if p["kind"] == "base"), None)
    if start is None:
        return {}
    g0 = start["gold_mean"]
    out = {}
    families = [(key, "rl", rl_family(points, key)) for key in rl_series(points)]
    families.append(("bon", "bon", [p for p in points if p["kind"] == "bon"]))
    for key, form, fam in families:
        fit = fit_gao([p["sqrt_kl"] for p in fam], [p["gold_mean"] - g0 for p in fam], form)
        if fit is None:
            continue
        alpha, beta = fit
        peak = gao_peak(alpha, beta, form)
        # A maximum far past the measured points is the fit's extrapolation, not a prediction (with beta
        # near 0 the rl form peaks at exp(alpha / beta - 1): 2e11 nats for alpha 0.094, beta 0.007).
        reach = max(p["sqrt_kl"] for p in fam) ** 2
        beyond = peak is not None and peak[0] ** 2 > PEAK_REACH * reach
        kept = None if peak is None or beyond else peak
        out[key] = {"form": form, "alpha": alpha, "beta": beta, "gold_start": g0, "n_points": len(fam),
                     "max_kl": reach, "peak_kl": None if kept is None else kept[0] ** 2,
                     "peak_gold": None if kept is None else g0 + kept[1],
                     "peak_beyond_kl": peak[0] ** 2 if beyond else None}
    return out


def make_point(kind: str, name: str, step: Optional[int], k1: Sequence[float], k3: Sequence[float],
               proxy: Sequence[float], gold: Sequence[float], win: tuple[float, float, float],
               series: Optional[str] = None, per_prompt: Optional[int] = None) -> dict:
    """One row of the curves: means (and standard errors) over a model's samples. ``series`` defaults to
    ``kind``; RL checkpoints pass their series key. With ``per_prompt`` (samples per prompt, the samples
    prompt-major) the row also keeps gold's and the proxy's per-prompt means, ``gold_by_prompt`` and
    ``proxy_by_prompt``, so that two models on the same prompts can be compared pair by pair
    (:func:`pipeline.evaluation.overopt.fall_along`); the CSV leaves them out."""
    k1_mean, k1_se = mean_se(k1)
    k3_mean, _ = mean_se(k3)
    proxy_mean, proxy_se = mean_se(proxy)
    gold_mean, gold_se = mean_se(gold)
    return {"kind": kind, "name": name, "step": step, "kl_k1_mean": k1_mean, "kl_k1_se": k1_se,
            "kl_k3_mean": k3_mean, "sqrt_kl": math.sqrt(max(k1_mean, 0.0)), "proxy_mean": proxy_mean,
            "proxy_se": proxy_se, "gold_mean": gold_mean, "gold_se": gold_se, "win_rate": win[0],
            "win_lo": win[1], "win_hi": win[2], "n_samples": len(gold), "series": series or kind} | (
        {} if per_prompt is None else
        {"gold_by_prompt": prompt_means(gold, per_prompt), "proxy_by_prompt": prompt_means(proxy, per_prompt)})


def best_gold(points: list[dict]) -> Optional[dict]:
    """The RL checkpoint (of any series) with the highest mean gold; base/SFT when there is none."""
    ppo = [p for p in points if p["kind"] == "ppo"]
    pool = ppo or [p for p in points if p["kind"] in ("base", "sft")]
    return max(pool, key=lambda p: p["gold_mean"]) if pool else None


def _fmt(v: float, width: int, prec: int = 3) -> str:
    return f"{'nan':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{width}.{prec}f}"


def _pm(mean: float, se: float) -> str:
    if math.isnan(se):
        return f"{mean:8.3f}        "
    return f"{mean:8.3f} ± {se:5.3f}"


def _at(p: dict) -> str:
    return (f"gold {p['gold_mean']:.3f} ± {p['gold_se']:.3f}, proxy {p['proxy_mean']:.3f}, "
            f"KL {p['kl_k1_mean']:.3f} nats (sqrt {p['sqrt_kl']:.3f})")


def summary_text(points: list[dict], header: str, fits: Optional[dict] = None) -> str:
    """An aligned table of the points, where gold peaks in each RL series, each series against best-of-n,
    gold at equal KL when there are several series, and the curve fits."""
    lines = [header, ""]
    w = max([13] + [len(p["name"]) for p in points])
    cols = (f"{'model':<{w}} {'KL k1 (nats)':>16} {'KL k3':>7} {'sqrtKL':>6}  {'proxy':>16}  {'gold':>16}  "
            f"{'win vs SFT [95% CI]':>21} {'n':>5}")
    lines += [cols, "-" * len(cols)]
    for p in points:
        win = "" if math.isnan(p["win_rate"]) else f"{p['win_rate']:.3f} [{p['win_lo']:.3f}, {p['win_hi']:.3f}]"
        lines.append(f"{p['name']:<{w}} {_pm(p['kl_k1_mean'], p['kl_k1_se'])} {_fmt(p['kl_k3_mean'], 7)} "
                     f"{_fmt(p['sqrt_kl'], 6)}  {_pm(p['proxy_mean'], p['proxy_se'])}  "
                     f"{_pm(p['gold_mean'], p['gold_se'])}  {win:>21} {p['n_samples']:>5}")
    lines.append("")
    series = rl_series(points)
    best_per_series = {key: max(rl_family(points, key), key=lambda p: p["gold_mean"]) for key in series}
    if not series and best_gold(points) is not None:
        best = best_gold(points)
        lines.append(f"gold peaks at {best['name']} (no PPO checkpoints): {_at(best)}")
    for key, best in best_per_series.items():
        lines.append(f"gold peaks at {best['name']} among {series_title(key)} checkpoints: {_at(best)}")
        last = rl_family(points, key)[-1]
        if last is not best:
            lines.append(f"the last checkpoint {last['name']} has gold {last['gold_mean']:.3f} and proxy "
                         f"{last['proxy_mean']:.3f} at KL {last['kl_k1_mean']:.3f}")
    bon = [p for p in points if p["kind"] == "bon"]
    if bon:
        b = max(bon, key=lambda p: p["gold_mean"])
        lines.append(f"best-of-n's gold peaks at {b['name']}: gold {b['gold_mean']:.3f} ± {b['gold_se']:.3f} at "
                     f"KL {b['kl_k1_mean']:.3f} nats (analytic)")
        for key, best in best_per_series.items():
            title = series_title(key)
            higher = best["gold_mean"] > b["gold_mean"]
            lines.append(f"{title} {'reached a higher' if higher else 'did not reach a higher'} gold than best-of-n: "
                         f"{title} {best['gold_mean']:.3f} at KL {best['kl_k1_mean']:.2f} nats, best-of-n "
                         f"{b['gold_mean']:.3f} at KL {b['kl_k1_mean']:.2f} nats (difference "
                         f"{best['gold_mean'] - b['gold_mean']:+.3f} ± {math.hypot(best['gold_se'], b['gold_se']):.3f})")
        efficiency = proxy_per_nat(points)
        if efficiency:
            lines.append(f"proxy gain per nat of KL (over the start), {' / '.join(map(series_title, series))} vs "
                         "best-of-n at the same KL (interpolated):")
            for e in efficiency:
                bon_txt = "beyond best-of-n's KL range" if e["bon_per_nat"] is None else f"{e['bon_per_nat']:.3f}"
                lines.append(f"  {e['name']:<{w}} KL {e['kl']:.2f}: {series_title(e['series'])} "
                             f"{e['ppo_per_nat']:.3f}, best-of-n {bon_txt}")
    at_kl = gold_at_kl(points, fits or {})
    if sum(key in at_kl for key in series) > 1:
        keys = [k for k in [*series, "bon"] if k in at_kl]
        lines.append("gold at equal KL, read off each family's Gao fit within the KL its points reach "
                     "('-': beyond them):")
        lines.append(f"  {'KL (nats)':>9}  " + "  ".join(f"{series_title(k) if k != 'bon' else 'best-of-n':>10}"
                                                         for k in keys))
        for level in sorted({lv for k in keys for lv in at_kl[k]}):
            cells = [at_kl[k].get(level) for k in keys]
            lines.append(f"  {level:>9g}  " + "  ".join(f"{'-':>10}" if v is None else f"{v:>10.3f}" for v in cells))
    if fits:
        lines.append("Gao et al. 2022 fits of gold gain over the start against d = sqrt(KL):")
        for key in [*series, "bon"]:
            f = fits.get(key)
            if not f:
                continue
            name = ("best-of-n, R = d(alpha - beta d)" if key == "bon"
                    else f"{series_title(key)}, R = d(alpha - beta log d)")
            if f.get("peak_beyond_kl") is not None:
                peak = (f"no peak within {PEAK_REACH:g}x the KL its points reach ({f['max_kl']:.2f} nats): the "
                        f"fitted maximum lies at {f['peak_beyond_kl']:.3g} nats, an extrapolation")
            elif f["peak_kl"] is None:
                peak = "no peak within the fit (beta <= 0: gold still rising)"
            else:
                peak = f"predicted peak gold {f['peak_gold']:.3f} at KL {f['peak_kl']:.2f} nats"
            lines.append(f"  {name}: alpha {f['alpha']:.3f}, beta {f['beta']:.3f} ({f['n_points']} points); "
                         f"{peak}")
    return "\n".join(lines) + "\n"


KL_LEVELS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def gold_at_kl(points: list[dict], fits: dict, levels: Sequence[float] = KL_LEVELS) -> dict:
    """Each fitted family's gold at common KL levels (nats): ``{key: {kl: gold}}``, from its Gao fit
    (:func:`curve_fits`), only for levels up to the largest KL among the family's own points (a fit
    says little beyond its data); a family without a fit or a level beyond its points is left out.

    A comparison of series at equal KL, which their checkpoints (each at its own KL) do not give directly.
    """
    out: dict = {}
    for key, f in fits.items():
        fam = [p for p in points if p["kind"] == "bon"] if key == "bon" else rl_family(points, key)
        top = max((p["kl_k1_mean"] for p in fam), default=0.0)
        values = {lv: f["gold_start"] + gao_curve(math.sqrt(lv), f["alpha"], f["beta"], f["form"])
                  for lv in levels if lv <= top}
        if values:
            out[key] = values
    return out


def proxy_per_nat(points: list[dict]) -> list[dict]:
    """For each RL checkpoint with KL > 0: its proxy gain over the starting model per nat of KL, and
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
        out.append({"name": p["name"], "series": series_of(p), "kl": kl, "ppo_per_nat": (p["proxy_mean"] - p0) / kl,
                    "bon_per_nat": None if bon_gain is None else bon_gain / kl})
    return out


def _nan0(values):
    return [0.0 if (v is None or math.isnan(v)) else v for v in values]


# fused models (kind "fused"): a marker of their own, distinct from checkpoints (o), best-of-n (s), base (D), SFT (^)
FUSED_STYLES = (("tab:purple", "P"), ("tab:brown", "X"), ("tab:pink", "h"), ("tab:olive", "p"))


def plot_curves(points: list[dict], path: Path, title: str, fits: Optional[dict] = None) -> None:
    """Proxy and gold reward against sqrt(KL): each RL series' checkpoints in its own colour, best-of-n,
    base, SFT and fused models."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    series = rl_series(points)
    colors = {k: SERIES_COLORS[i % len(SERIES_COLORS)] for i, k in enumerate(series)}
    colors["bon"] = "tab:orange"
    bon = sorted([p for p in points if p["kind"] == "bon"], key=lambda p: p["sqrt_kl"])
    singles = [p for p in points if p["kind"] in ("base", "sft")]
    fused = [p for p in points if p["kind"] == "fused"]
    best = best_gold(points)
    watched = watched_keys(points)
    fig, axes = plt.subplots(1, 3 if watched else 2, figsize=(19.5 if watched else 13, 5.2), constrained_layout=True)
    optimised_by = " / ".join(map(series_title, series)) or "PPO"
    panels = (("proxy", f"proxy reward (optimised by {optimised_by})"), ("gold", "gold reward (held out)"))
    if watched:
        plot_watched(axes[2], points, series, colors, watched)
    for ax, (key, label) in zip(axes, panels):
        for s in series:
            fam = sorted(rl_family(points, s), key=lambda p: p["step"])
            ax.errorbar([p["sqrt_kl"] for p in fam], [p[f"{key}_mean"] for p in fam],
                        yerr=_nan0([p[f"{key}_se"] for p in fam]), fmt="-o", color=colors[s], capsize=3,
                        lw=1.8, ms=5, label=f"{series_title(s)} checkpoints")
            for p in fam:
                ax.annotate(str(p["step"]), (p["sqrt_kl"], p[f"{key}_mean"]), textcoords="offset points",
                            xytext=(4, -11), fontsize=7, color=colors[s])
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
        for i, p in enumerate(fused):
            color, marker = FUSED_STYLES[i % len(FUSED_STYLES)]
            ax.errorbar([p["sqrt_kl"]], [p[f"{key}_mean"]], yerr=_nan0([p[f"{key}_se"]]), fmt=marker, color=color,
                        capsize=3, ms=9, markeredgecolor="black", label=p["name"])
            ax.annotate(p["name"], (p["sqrt_kl"], p[f"{key}_mean"]), textcoords="offset points", xytext=(6, -14),
                        fontsize=8, color=color)
        if key == "gold" and fits:
            for s in [*series, "bon"]:
                f = fits.get(s)
                if not f:
                    continue
                # each fit drawn a little past its own points: an extrapolation far beyond them says little
                fam = bon if s == "bon" else rl_family(points, s)
                top = max([p["sqrt_kl"] for p in fam] + [0.1])
                xs = [top * 1.2 * i / 100 for i in range(101)]
                ax.plot(xs, [f["gold_start"] + gao_curve(x, f["alpha"], f["beta"], f["form"]) for x in xs], ":",
                        color=colors[s], lw=1.3,
                        label=f"{'best-of-n' if s == 'bon' else series_title(s)} fit (Gao et al.)")
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


def watched_keys(points: list[dict]) -> list[str]:
    """What the RL points carry besides proxy and gold (``monitor/<id>``, ``<component>/disagreement``)."""
    keys = {k[:-5] for p in points if p["kind"] == "ppo" for k in p if k.endswith("_mean")
            and (k.startswith("monitor/") or k.endswith("/disagreement_mean"))}
    return sorted(keys)


def plot_watched(ax, points: list[dict], series: list[str], colors: dict, keys: list[str]) -> None:
    """The third panel: the monitors PPO watched (a held-out ensemble member rises and falls like gold
    would) and the ensemble's disagreement, along sqrt(KL), from the SFT point on."""
    styles = ("-o", "--s", "-.^", ":D", "-v", "--P")
    start = [p for p in points if p["kind"] in ("sft", "base")][-1:]
    for s in series:
        fam = start + sorted(rl_family(points, s), key=lambda p: p["step"])
        for i, key in enumerate(keys):
            pts = [p for p in fam if f"{key}_mean" in p]
            if not pts:
                continue
            ax.errorbar([p["sqrt_kl"] for p in pts], [p[f"{key}_mean"] for p in pts],
                        yerr=_nan0([p[f"{key}_se"] for p in pts]), fmt=styles[i % len(styles)], color=colors[s],
                        capsize=2, lw=1.3, ms=4, label=f"{series_title(s)}: {key}")
    ax.set_xlabel(X_LABEL)
    ax.set_title("Watched without gold: monitors, ensemble disagreement")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.85)


def json_safe(point: dict) -> dict:
    """NaN (a standard error of one sample) as null, so the manifest is strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in point.items()}


def write_csv(points: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for p in points:
            values = [p.get(c) for c in CSV_COLUMNS]
            w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in values])
