"""Running score normalisation for reward components."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["RunningNormalizer"]


class RunningNormalizer:
    """Standardise scores with the running mean and std of every score seen so far.

    Each call first folds the batch into the running statistics (Welford's algorithm, one
    score at a time), then returns ``(x - mean) / std`` for the batch, where ``std`` is the
    population standard deviation over all scores seen (floored at ``eps``, so a constant
    stream maps to 0). With ``clip`` the normalised values are clipped to ``[-clip, clip]``.

    ``state_dict()`` / ``load_state_dict()`` save and restore the statistics (count, mean, m2),
    e.g. inside a PPO checkpoint, so a resumed run normalises exactly as the original would.
    """

    def __init__(self, clip: float | None = None, eps: float = 1e-8):
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be a positive number or None, got {clip!r}")
        self.clip = clip
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def std(self) -> float:
        """Population standard deviation of all scores seen (0 before any)."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def update(self, scores: Sequence[float]) -> None:
        """Fold ``scores`` into the running statistics."""
        for x in scores:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    def normalize(self, scores: Sequence[float]) -> list[float]:
        """Standardise ``scores`` with the current statistics, without updating them."""
        std = max(self.std, self.eps)
        out = [(x - self.mean) / std for x in scores]
        if self.clip is not None:
            out = [min(max(v, -self.clip), self.clip) for v in out]
        return out

    def __call__(self, scores: Sequence[float]) -> list[float]:
        """Update with the batch, then normalise it."""
        self.update(scores)
        return self.normalize(scores)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise KeyError(f"normalizer state lacks {sorted(missing)}; has {sorted(state)}")
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])

    def __repr__(self) -> str:
        return (f"RunningNormalizer(count={self.count}, mean={self.mean:.4g}, "
                f"std={self.std:.4g}, clip={self.clip})")
