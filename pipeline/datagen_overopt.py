"""Derive the over-optimisation demo's preference pairs (``configs/overopt.yaml``) from the default
task's pairs, without sampling a model: what `make data` runs after :mod:`pipeline.datagen`.

    python -m pipeline.datagen_overopt --source data/pairs_train.jsonl --out data/overopt --seed 0

A reward model is exploitable where it is wrong off the data it saw (Gao et al. 2022, "extremal"
error). Two ways real reward-model data is weak are reproduced here, each a file:

* ``pairs_train.jsonl``: **few and noisy** labels. ``pairs`` pairs drawn from the source, ordered by
  gold, then a share ``label_noise`` swapped at random (Coste et al. 2023 used 25%). Each member of
  an ensemble trained on these errs in its own places: what ensembles are for.
* ``pairs_train_biased.jsonl``: the same pairs, plus an **annotator bias every member shares**: in a
  share ``bias_rate`` of the pairs whose two responses differ in caveat markers ("but", "however",
  "not", "n't", "may", "might", ...; :func:`hedges`), the more hedged one is chosen whatever gold says:
  a rater who takes caveats for care, as raters and reward models reward hedging and qualification
  (Singhal et al. 2023 on length, Sharma et al. 2023 on sycophancy). In the shipped pairs hedged
  responses have *lower* gold (mean 0.32 against 0.40), so following the cue costs gold; an earlier
  cue, "more exclamation marks", did not (those responses have gold 0.55 against 0.36: VADER itself
  rewards "!"), and gold never fell (README). No aggregation of members trained on these labels can
  remove the bias (Eisenstein et al. 2023): the README's limit case.

Rows keep the source's schema; ``flipped`` is recomputed against gold (true when ``chosen`` has the
lower gold), ``noise`` says why a row disagrees with gold ("random", "bias" or null).
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Optional, Sequence

from pipeline.artifacts.outputs import write_jsonl
from pipeline.data.loaders import read_rows

DEFAULT_PAIRS = 512
DEFAULT_NOISE = 0.25
DEFAULT_BIAS_RATE = 0.5


#: Caveat markers: contrast, negation and hedging words (VADER's "but" rule and negation both act on these).
HEDGE = re.compile(r"\b(but|however|although|though|not|cannot|may|might|maybe|perhaps)\b|n't\b", re.IGNORECASE)


def hedges(text: str) -> int:
    """How many caveat markers ``text`` has: "but", "however", "not", "n't", "may", "might", ...
    ("It's fun, but it may not suit everyone" has 3)."""
    return len(HEDGE.findall(text))


def more_hedged(a: str, b: str) -> int:
    """0 when ``a`` has more caveat markers than ``b``, 1 when ``b`` has, -1 on a tie."""
    na, nb = hedges(a), hedges(b)
    return -1 if na == nb else (0 if na > nb else 1)


def derive_pairs(rows: Sequence[dict], n_pairs: int, label_noise: float, seed: int,
                 bias: bool = False, bias_rate: float = DEFAULT_BIAS_RATE) -> list[dict]:
    """``n_pairs`` rows drawn (seeded) from ``rows`` that record gold, relabelled: chosen = higher gold,
    then swapped with probability ``label_noise``; with ``bias``, in a pair whose responses differ in
    caveat markers, the more hedged one is chosen with probability ``bias_rate`` (after the random swaps,
    so where the rater's bias speaks it has the last word). Both draws are made for every row whatever
    ``bias`` is, so the biased and unbiased files share their random swaps."""
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    if not 0.0 <= bias_rate <= 1.0:
        raise ValueError(f"bias_rate must be in [0, 1], got {bias_rate}")
    usable = [r for r in rows if isinstance(r.get("gold_chosen"), (int, float))
              and isinstance(r.get("gold_rejected"), (int, float)) and r["gold_chosen"] != r["gold_rejected"]]
    if len(usable) < n_pairs:
        raise ValueError(f"asked for {n_pairs} pairs but the source has {len(usable)} with distinct gold")
    rng = random.Random(seed)
    out = []
    for r in rng.sample(usable, n_pairs):
        sides = [(r["chosen"], r["gold_chosen"], r.get("style_chosen")),
                 (r["rejected"], r["gold_rejected"], r.get("style_rejected"))]
        sides.sort(key=lambda s: -s[1])  # gold-correct order
        noise = None
        swap, biased = rng.random() < label_noise, rng.random() < bias_rate
        if swap:
            sides.reverse()
            noise = "random"
        if bias and biased and more_hedged(sides[0][0], sides[1][0]) == 1:
            sides.reverse()
            noise = None if sides[0][1] > sides[1][1] else "bias"
        (c, gc, sc), (j, gj, sj) = sides
        out.append({"prompt": r["prompt"], "chosen": c, "rejected": j, "gold_chosen": gc, "gold_rejected": gj,
                    "flipped": gc < gj, "noise": noise if gc < gj else None,
                    "style_chosen": sc, "style_rejected": sj})
    return out


def summary(rows: Sequence[dict]) -> dict:
    n = len(rows)
    return {"pairs": n, "agree_with_gold": round(sum(not r["flipped"] for r in rows) / n, 3),
            "hedged_chosen": round(sum(more_hedged(r["chosen"], r["rejected"]) == 0 for r in rows) / n, 3),
            "hedged_rejected": round(sum(more_hedged(r["chosen"], r["rejected"]) == 1 for r in rows) / n, 3)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="data/pairs_train.jsonl", help="pairs with gold_chosen/gold_rejected")
    ap.add_argument("--out", default="data/overopt", help="folder for the derived files")
    ap.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs per file")
    ap.add_argument("--label-noise", type=float, default=DEFAULT_NOISE, help="share of labels swapped at random")
    ap.add_argument("--bias-rate", type=float, default=DEFAULT_BIAS_RATE,
                    help="in the biased file, how often the rater's bias decides a pair it can")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [row for _, row in read_rows(args.source)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, bias in (("pairs_train.jsonl", False), ("pairs_train_biased.jsonl", True)):
        derived = derive_pairs(rows, args.pairs, args.label_noise, args.seed, bias=bias, bias_rate=args.bias_rate)
        write_jsonl(out / name, derived)
        print(f"[overopt data] {out / name}: {summary(derived)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
