"""Gold score of the fused adapter and the merged model next to the stacked SFT + PPO policy.

    python benchmarks/fused_gold.py --run-dir runs/default [--prompts 32 --samples 4]

Samples every variant on the same eval prompts with the same seeds (PPO temperature, top_k=0,
top_p=1) and prints `RESULT name=<variant> gold=<mean> se=<se> n=<samples>` plus the fraction of
responses identical to the stacked policy's.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sample(model, tok, prompts, samples: int, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    from pipeline.models import forwards
    from pipeline.rl import rollout

    encoded = rollout.encode_prompts(tok, prompts, 512)
    rows = [e for e in encoded for _ in range(samples)]
    texts = []
    for b, s in enumerate(range(0, len(rows), 32)):
        q, qm = forwards.left_pad(rows[s:s + 32], tok.pad_token_id)
        resp, mask, _ = rollout.generate(model, tok, q, qm, max_new_tokens, temperature, generator_seed=seed + b)
        texts += rollout.decode_responses(tok, resp, mask)
    return texts


def main() -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_config
    from pipeline.data import loaders
    from pipeline.models import loading, stacking
    from reward.registry import build_reward

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "default"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    a = ap.parse_args()
    cfg = load_config(a.config)
    run = Path(a.run_dir)
    rows, _ = loaders.load_prompts(cfg.data.prompts_eval)
    prompts = [r["prompt"] for r in rows[:a.prompts]]
    gold = build_reward(cfg.eval.gold)
    args = (a.samples, cfg.eval.max_new_tokens, cfg.ppo.temperature, cfg.eval.seed)

    base, tok, _ = loading.load_base(cfg.model)
    stacked = stacking.stack_adapters(base, {"sft": run / "sft", "policy": run / "ppo"})
    stacked.eval()
    texts = {"stacked": sample(stacked, tok, prompts, *args)}
    stacked.unload()
    from peft import PeftModel

    fused = PeftModel.from_pretrained(stacked.get_base_model(), str(run / "fused" / "adapter"))
    fused.eval()
    texts["fused_adapter"] = sample(fused, tok, prompts, *args)
    merged = AutoModelForCausalLM.from_pretrained(str(run / "fused" / "merged"), dtype=torch.float32)
    merged.eval()
    texts["merged_model"] = sample(merged, tok, prompts, *args)

    flat_prompts = [p[-1]["content"] for p in prompts for _ in range(a.samples)]
    for name, t in texts.items():
        scores = gold(flat_prompts, t).total
        same = sum(x == y for x, y in zip(t, texts["stacked"])) / len(t)
        se = statistics.stdev(scores) / len(scores) ** 0.5
        print(f"RESULT name={name} gold={statistics.mean(scores):.4f} se={se:.4f} n={len(scores)} "
              f"identical_to_stacked={same:.3f}", flush=True)


if __name__ == "__main__":
    main()
