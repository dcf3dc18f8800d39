"""The LM head and the response tokens' log-probabilities: :func:`pipeline.rl.ppo_math.head_token_logprobs_and_entropy`
in vocabulary blocks (as shipped) against the plain path (``F.linear`` then
:func:`pipeline.rl.ppo_math.token_logprobs_and_entropy`, what a model with a trained or biased head takes)
and against the same function in one block (the whole ``(rows, vocab)`` logits at once, as it was before
blocks).

The embedded model's head shape (49,152 x 576, random weights: the time does not depend on the values),
``--rows`` token positions (PPO's 8-row micro-batches of 32 tokens: 256; eval's 32-row KL passes: 1,024),
in the compute dtype ``auto`` picks on this machine. Each pair runs both arms back to back, alternating which
goes first; prints each arm's median and the paired ratio's mean with its standard error:
forward + backward (PPO's update) and a forward without a graph (reference and old log-probs, eval's KL).

    python benchmarks/lm_head.py [--rows 256] [--pairs 20] [--vocab-block 4096] [--row-block 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.models import loading
from pipeline.rl import ppo_math


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256, help="token positions per call (B x T)")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab-block", type=int, default=ppo_math.HEAD_VOCAB_BLOCK)
    ap.add_argument("--row-block", type=int, default=ppo_math.HEAD_ROW_BLOCK)
    args = ap.parse_args()
    dtype = loading.compute_dtype(ModelConfig(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(dtype)
    hidden = torch.randn(8, args.rows // 8, args.hidden, generator=g).to(dtype)
    tokens = torch.randint(0, args.vocab, (8, args.rows // 8), generator=g)

    def plain(grad: bool):
        h = hidden.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            lp, _ = ppo_math.token_logprobs_and_entropy(F.linear(h, weight), tokens, with_entropy=True)
        if grad:
            lp.sum().backward()

    def fused(vocab_block: int, row_block: int):
        def run(grad: bool):
            h = hidden.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                lp, _ = ppo_math.head_token_logprobs_and_entropy(h, weight, tokens, True, vocab_block, row_block)
            if grad:
                lp.sum().backward()
        return run

    arms = {"plain": plain, "one block": fused(args.vocab, args.rows),
            f"blocks {args.row_block}x{args.vocab_block}": fused(args.vocab_block, args.row_block)}
    base, candidates = "plain", [k for k in arms if k != "plain"]
    print(f"LM head {args.vocab} x {args.hidden}, {args.rows} positions, {dtype}, {torch.get_num_threads()} threads, "
          f"{args.pairs} pairs")
    for grad in (True, False):
        for arm in arms.values():
            arm(grad)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in arms}
        ratios: dict[str, list[float]] = {k: [] for k in candidates}
        for i in range(args.pairs):
            order = list(arms) if i % 2 == 0 else list(reversed(arms))
            pair = {}
            for k in order:
                t0 = time.perf_counter()
                arms[k](grad)
                pair[k] = time.perf_counter() - t0
                times[k].append(pair[k])
            for k in candidates:
                ratios[k].append(pair[k] / pair[base])
        label = "forward + backward" if grad else "forward, no graph"
        print(f"{label}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in times.items()))
        for k in candidates:
            mu, se = _mean_se(ratios[k])
            print(f"  {k} / plain: {mu:.3f} ± {se:.3f}")
        mu, se = _mean_se([a / b for a, b in zip(times[candidates[1]], times[candidates[0]])])
        print(f"  {candidates[1]} / one block: {mu:.3f} ± {se:.3f}")


if __name__ == "__main__":
    main()
