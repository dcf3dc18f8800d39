"""Memory of a PPO-style process (policy + learned reward) with the reward on the policy's base vs its own.

    python benchmarks/reward_memory.py [--reward runs/default/reward]

Each variant runs in its own process: load the NF4 base with a policy LoRA, serve the reward model
(shared: attached as one more adapter; own: a second NF4 base), score one batch of 8, and report
peak RSS. Prints `RESULT name=<variant> peak_rss_mb=<MB> score_s=<s>` and the ratio shared/own.
Without --reward an untrained reward adapter is built first (memory does not depend on training).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(variant: str, reward_dir: str) -> dict:
    from peft import get_peft_model

    from pipeline.config import PipelineConfig
    from pipeline.models import loading
    from pipeline.models.reward_model import load_reward_scorer

    cfg = PipelineConfig()
    base, tok, info = loading.load_base(cfg.model)
    policy = get_peft_model(base, loading.lora_config(cfg.ppo.lora), adapter_name="policy")
    scorer = load_reward_scorer(reward_dir, host=(policy, tok, info) if variant == "shared" else None)
    assert (scorer.model is policy) == (variant == "shared")
    prompts = [f"Tell me about topic {i}." for i in range(8)]
    responses = ["What a wonderful idea, I love it and I hope you enjoy every moment of it!"] * 8
    t = time.time()
    scorer(prompts, responses)
    return {"name": variant, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "score_s": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward", default=None, help="a RUN/reward folder (default: build an untrained one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.reward)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        reward_dir = a.reward
        if reward_dir is None:
            reward_dir = str(Path(tmp) / "reward")
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "ppo_step.py"), "--reward", reward_dir],
                           cwd=REPO, check=True, capture_output=True)
        results = {}
        for variant in ("shared", "own"):
            p = subprocess.run([sys.executable, __file__, "--child", variant, "--reward", reward_dir], cwd=REPO,
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.stderr.write(p.stderr[-3000:])
                raise SystemExit(f"{variant} failed")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            results[variant] = r
            print(f"RESULT name={variant} peak_rss_mb={r['peak_rss_mb']:.0f} score_s={r['score_s']:.2f}", flush=True)
    print(f"RATIO shared_vs_own_peak_rss={results['shared']['peak_rss_mb'] / results['own']['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
