"""Derive the over-optimisation demo's preference pairs (``configs/overopt.yaml``) from the default
task's pairs, without sampling a model: what `make data` runs after :mod:`pipeline.datagen`.

    python -m pipeline.datagen_overopt --source data/pairs_train.jsonl --out data/overopt --seed 0

A reward model is exploitable where it is wrong off the data it saw (Gao et al. 2022, "extremal"
error). Two ways real reward-model data is weak are reproduced here, each a file:

* ``pairs_train.jsonl``: **few and noisy** labels. ``pairs`` pairs drawn from the source, ordered by
  gold, then a share ``label_noise`` swapped at random (Coste et al. 2023 used 25%). Each member of
  an ensemble trained on these errs in its own places: what ensembles are for.
* ``pairs_train_biased.jsonl``: the same pairs, plus an **annotator bias every member shares**: in each
  pair whose two responses differ in how many exclamation marks they use, the louder one is chosen,
  whatever gold says (a rater swayed by enthusiasm, as real raters are by length and confidence;
  Singhal et al. 2023). No aggregation of members trained on these labels can remove it
  (Eisenstein et al. 2023): the README's limit case.

Rows keep the source's schema; ``flipped`` is recomputed against gold (true when ``chosen`` has the
lower gold), ``noise`` says why a row disagrees with gold ("random", "bias" or null).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Optional, Sequence

from pipeline.artifacts.outputs import write_jsonl
from pipeline.data.loaders import read_rows

DEFAULT_PAIRS = 512
DEFAULT_NOISE = 0.25


def louder(a: str, b: str) -> int:
    """0 when ``a`` has more exclamation marks than ``b``, 1 when ``b`` has, -1 on a tie."""
    na, nb = a.count("!"), b.count("!")
    return -1 if na == nb else (0 if na > nb else 1)


def derive_pairs(rows: Sequence[dict], n_pairs: int, label_noise: float, seed: int,
                 bias: bool = False) -> list[dict]:
    """``n_pairs`` rows drawn (seeded) from ``rows`` that record gold, relabelled: chosen = higher gold,
    then swapped with probability ``label_noise``; with ``bias``, the response with more "!" is chosen
    wherever the two differ in "!" (after the random swaps, so the bias is the last word)."""
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
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
        if rng.random() < label_noise:  # drawn for every row, so both files share the random swaps
            sides.reverse()
            noise = "random"
        if bias:
            loud = louder(sides[0][0], sides[1][0])
            if loud == 1:
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
            "louder_chosen": round(sum(louder(r["chosen"], r["rejected"]) == 0 for r in rows) / n, 3),
            "louder_rejected": round(sum(louder(r["chosen"], r["rejected"]) == 1 for r in rows) / n, 3)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="data/pairs_train.jsonl", help="pairs with gold_chosen/gold_rejected")
    ap.add_argument("--out", default="data/overopt", help="folder for the derived files")
    ap.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs per file")
    ap.add_argument("--label-noise", type=float, default=DEFAULT_NOISE, help="share of labels swapped at random")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [row for _, row in read_rows(args.source)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, bias in (("pairs_train.jsonl", False), ("pairs_train_biased.jsonl", True)):
        derived = derive_pairs(rows, args.pairs, args.label_noise, args.seed, bias=bias)
        write_jsonl(out / name, derived)
        print(f"[overopt data] {out / name}: {summary(derived)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
