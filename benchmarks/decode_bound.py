"""Sampling against what one decode step costs (issue 20: "generation tokens/s within 2x of what a single
decode step's measured cost allows").

The PPO rollout setting on the embedded model: 32 prompts of 45 tokens, 32 new tokens, the merged
sampling weights (``ppo.rollout_weights: auto``), compute dtype ``auto``. Measured in one process:
- the prefill: one forward over the prompts with a KV cache, logits at the last position only (what
  ``generate`` computes);
- one decode step: 32 rows x 1 token against that cache (median of 10);
- ``pipeline.rl.rollout.generate`` end to end, never stopping early (no stop token can be sampled).
The bound is prefill + 32 decode steps; the ratio says how much per-token Python, sampling and cache
overhead ``generate`` adds on top. Prints means with standard errors over ``--repeats``.

    python benchmarks/decode_bound.py [--repeats 3] [--rows 32] [--new-tokens 32]
    python benchmarks/decode_bound.py --orientation --rows 8,16,32

``--orientation`` times one decode step with :mod:`pipeline.models.few_rows` on and off instead, interleaved
(the cache cropped back before each step) for ``--steps`` pairs, and prints the paired ratio with its
standard error per row count.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import LoraConfigSection, ModelConfig
from pipeline.models import few_rows, loading, stacking, throughput
from pipeline.rl import rollout


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def orientation_ab(pm, rows: list[int], prompt_tokens: int, steps: int) -> None:
    """One decode step with the few-rows GEMM orientation (``few_rows.MAX_ROWS`` as shipped) against plain
    ``F.linear`` (``MAX_ROWS = 0``), alternating which goes first, on the same cache."""
    shipped = few_rows.MAX_ROWS
    g = torch.Generator().manual_seed(0)
    for b in rows:
        ids = torch.randint(100, 5000, (b, prompt_tokens), generator=g)
        times: dict[int, list[float]] = {0: [], shipped: []}
        with torch.no_grad(), stacking.merged_linear_weights(pm), loading.compute_context(pm), \
                loading.decode_attention(pm):
            cache = pm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                       logits_to_keep=1).past_key_values
            step_mask = torch.ones(b, prompt_tokens + 1, dtype=torch.long)
            for i in range(steps + 2):  # the first two pairs warm up
                for setting in ((0, shipped) if i % 2 else (shipped, 0)):
                    few_rows.MAX_ROWS = setting
                    if cache.get_seq_length() > prompt_tokens:
                        cache.crop(-1)
                    t = time.perf_counter()
                    pm(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
                    if i >= 2:
                        times[setting].append(time.perf_counter() - t)
        few_rows.MAX_ROWS = shipped
        r, r_se = _mean_se([y / x for x, y in zip(times[0], times[shipped])])
        print(f"RESULT rows={b} f_linear={statistics.median(times[0]) * 1e3:.1f}ms "
              f"few_rows={statistics.median(times[shipped]) * 1e3:.1f}ms ratio={r:.3f}±{r_se:.3f} n={steps}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="32", help="rows per decode step (comma-separated with --orientation)")
    ap.add_argument("--orientation", action="store_true", help="A/B one decode step: few_rows on vs off")
    ap.add_argument("--steps", type=int, default=40, help="decode-step pairs per row count (--orientation)")
    ap.add_argument("--prompt-tokens", type=int, default=45)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    from peft import get_peft_model

    cfg = ModelConfig()
    model, tok, _ = loading.load_base(cfg)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0), model=model))
    pm.eval()
    print(f"{throughput.cpu_description()['cpu']}, {torch.get_num_threads()} threads, "
          f"{loading.describe_precision(cfg, torch.device('cpu'))}", flush=True)
    if args.orientation:
        orientation_ab(pm, [int(r) for r in args.rows.split(",")], args.prompt_tokens, args.steps)
        return
    args.rows = int(args.rows)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (args.rows, args.prompt_tokens), generator=g)
    mask = torch.ones_like(ids)
    never = [tok.vocab_size + 10]  # no sampled token is a stop token: every row runs all new tokens
    bounds, gens = [], []
    with torch.no_grad(), stacking.merged_linear_weights(pm), loading.compute_context(pm):
        for rep in range(args.repeats + 1):  # the first round warms up
            t = time.perf_counter()
            out = pm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t
            cache, nxt, steps = out.past_key_values, ids[:, -1:], []
            for i in range(10):
                step_mask = torch.ones(args.rows, args.prompt_tokens + 1 + i, dtype=torch.long)
                t = time.perf_counter()
                pm(input_ids=nxt, attention_mask=step_mask, past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - t)
            bound = prefill + args.new_tokens * statistics.median(steps)
            t = time.perf_counter()
            rollout.generate(pm, tok, ids, mask, args.new_tokens, 0.7, stop_ids=never, generator_seed=rep)
            gen = time.perf_counter() - t
            if rep:
                bounds.append(bound)
                gens.append(gen)
                print(f"repeat {rep}: prefill {prefill:.2f} s, decode step {statistics.median(steps) * 1e3:.0f} ms, "
                      f"bound {bound:.2f} s, generate {gen:.2f} s", flush=True)
    (b, b_se), (gm, g_se) = _mean_se(bounds), _mean_se(gens)
    ratios = [x / y for x, y in zip(gens, bounds)]
    r, r_se = _mean_se(ratios)
    print(f"RESULT bound={b:.2f}±{b_se:.2f}s generate={gm:.2f}±{g_se:.2f}s ratio={r:.2f}±{r_se:.2f} "
          f"tokens_per_s={args.rows * args.new_tokens / gm:.0f}")


if __name__ == "__main__":
    main()
