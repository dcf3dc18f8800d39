"""Early stopping on a watched signal: the peak of a smoothed per-step series and how long ago it was.

PPO logs ``ppo/monitor/<id>``, a reward that is scored but never optimised. When that signal is a
reward the policy is not trained on (a gold reward, or a reward-model ensemble member held out of the
optimised ensemble), its peak followed by a fall while the optimised proxy still rises is the mark of
over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"; Coste et al.
2023, "Reward Model Ensembles Help Mitigate Overoptimization", who watch held-out reward models).
Stopping there is early stopping on a validation signal (Prechelt 1998, "Early Stopping - But
When?"): smooth it, remember the best step, stop after ``patience`` steps without a new best.

Pure Python, no torch: the same numbers in a live run and in one rebuilt from its metrics log.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Watch:
    """What :func:`peak_watch` sees after ``len(smoothed)`` steps.

    ``smoothed[t - 1]``: the trailing mean at step t; ``best_step``: the 1-based step of the smoothed
    peak; ``best_value``: the smoothed value there; ``stop``: ``patience`` steps or more have passed
    since the peak without a new one."""

    smoothed: list[float]
    best_step: int
    best_value: float
    stop: bool


def trailing_means(values: Sequence[float], window: int) -> list[float]:
    """``out[t - 1]`` = mean of ``values[max(0, t - window):t]`` for t = 1..len(values): the mean of the
    last ``window`` values up to step t, of fewer while fewer exist. E.g. [1, 3, 5, 4], window 2:
    [1, 2, 4, 4.5]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [sum(values[max(0, t - window):t]) / (t - max(0, t - window)) for t in range(1, len(values) + 1)]


def peak_watch(values: Sequence[float], window: int, patience: int, min_delta: float = 0.0) -> Watch:
    """The smoothed peak of a per-step series and whether to stop.

    ``values``: one number per completed step, ``values[t - 1]`` for step t (at least one). Smoothed
    at step t: :func:`trailing_means`. A step is a new peak only when its smoothed value beats the best
    so far by more than ``min_delta`` (so on a tie the earlier peak stands). ``stop`` is
    ``len(values) - best_step >= patience``.

    Worked example: values [1, 3, 5, 4, 2, 2], window 2, patience 3, min_delta 0:
    smoothed [1, 2, 4, 4.5, 3, 2]; the peak is step 4 (4.5); 6 - 4 = 2 < 3, no stop yet. One more
    value 2 gives smoothed 2 at step 7 and 7 - 4 = 3: stop. With min_delta 0.5, step 4's 4.5 does not
    beat step 3's 4 by more than 0.5: the peak stays at step 3 and 6 - 3 = 3 already stops.
    """
    if not values:
        raise ValueError("peak_watch needs at least one value")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if min_delta < 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta}")
    smoothed = trailing_means(values, window)
    best_step, best_value = 1, smoothed[0]
    for step, value in enumerate(smoothed[1:], start=2):
        if value > best_value + min_delta:
            best_step, best_value = step, value
    return Watch(smoothed, best_step, best_value, len(values) - best_step >= patience)


def nearest_step(steps: Iterable[int], target: int) -> int | None:
    """The step in ``steps`` closest to ``target``, the earlier of two as close; None if there are none.
    E.g. steps [2, 4, 6], target 5: 4."""
    return min(steps, key=lambda s: (abs(s - target), s), default=None)


def history_from_rows(rows: Iterable[dict], key: str, upto: int) -> list[float]:
    """``rows[key]`` for steps 1..``upto`` from per-step log rows (dicts with ``step``), in step order;
    later rows are ignored (a resumed run logs them again). A step without the key raises ValueError
    naming the missing steps: the decision could not be the one an uninterrupted run makes."""
    found = {r["step"]: r[key] for r in rows if isinstance(r.get("step"), int) and r["step"] <= upto and key in r}
    missing = [s for s in range(1, upto + 1) if s not in found]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"no {key} logged for step(s) {shown}")
    return [float(found[s]) for s in range(1, upto + 1)]
