"""PPO step benchmark on the embedded model, against trl 1.12's PPOTrainer measured in the same run.

Setting (issue 4): SmolLM2-135M-Instruct in NF4 on CPU, batch 8, 32 response tokens, 4 PPO epochs,
1 minibatch, LoRA r=8 on all linear layers (of the top ``ppo.lora.top_layers`` in the shipped default;
every layer, as the anchor, in ``all-layers``), reference = base with adapters off, a learned reward
model (LoRA + score head) on the same base. Each setting runs in its own process so peak RSS is its own.

    python benchmarks/ppo_step.py                      # the main settings + the trl anchor if available
    python benchmarks/ppo_step.py --settings head-bf16,head-bf16-adapters,head-bf16-sdpa --no-anchor

Prints `RESULT name=<setting> per_step=<s>s peak_rss_mb=<MB> generate=<s>s score=<s>s train=<s>s`, then
ratios against the anchor (per-step time and peak memory).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR = REPO.parent / "shared" / "bench" / "trl_ppo_anchor.sh"

SETTINGS = {
    # the defaults as shipped (compute dtype auto: bf16 on CPUs with AMX/AVX512-BF16, float32 elsewhere):
    # the policy's LoRA on the top ppo.lora.top_layers layers, the trunk below them run once per step
    "default": [],
    # LoRA in every layer, as the anchor trains it: every pass runs every layer
    "all-layers": ["ppo.lora.top_layers=0"],
    # value head on the policy's hidden states, float32 compute: one forward per minibatch gives logprobs and values
    "head": ["ppo.value_model=head", "model.compute_dtype=float32"],
    # a separate value LoRA adapter + head: a second forward per minibatch
    "value-adapter": ["ppo.value_model=adapter", "model.compute_dtype=float32"],
    # bf16 compute (AMX on this CPU): unquantized parameters and activations in bf16, LoRA masters fp32
    "head-bf16": ["ppo.value_model=head", "model.compute_dtype=bfloat16"],
    # ... and the minibatch in two micro-batches of 4 rows (gradient accumulation): less activation memory
    "head-bf16-micro4": ["ppo.value_model=head", "model.compute_dtype=bfloat16", "ppo.micro_batch_size=4"],
    # ablations: sampling through the 4-bit kernels and LoRA layers, and transformers' sdpa attention
    "head-bf16-adapters": ["ppo.value_model=head", "model.compute_dtype=bfloat16", "ppo.rollout_weights=adapters"],
    "head-bf16-sdpa": ["ppo.value_model=head", "model.compute_dtype=bfloat16", "model.attn_implementation=sdpa"],
    "head-bf16-nolean": ["ppo.value_model=head", "model.compute_dtype=bfloat16", "ppo.lean_ops=false"],
    # the critic-free estimators at the shipped defaults: 2 prompts x 4 responses per step, no value head
    "rloo": ["ppo.algorithm=rloo", "ppo.samples_per_prompt=4"],
    "grpo": ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4"],
}
COMMON = ["ppo.batch_size=8", "ppo.max_new_tokens=32", "ppo.ppo_epochs=4", "ppo.minibatches=1",
          "ppo.lora.r=8", "ppo.lora.alpha=16", "ppo.lora.dropout=0.0", "ppo.lora.target_modules=all-linear",
          "ppo.sft_adapter=", "ppo.reference=base", "ppo.save_every=0", "ppo.sample_every=0",
          # the anchor's workload: no gold monitor (the default config watches gold every step)
          "ppo.monitor=[]", "ppo.value_model=head"]


def _make_reward_model(folder: Path) -> None:
    """An untrained reward adapter (LoRA r=8 + score head) with a manifest, so the benchmark needs no run."""
    import torch
    from peft import get_peft_model

    from pipeline.artifacts.outputs import write_manifest
    from pipeline.config import LoraConfigSection, PipelineConfig
    from pipeline.models import loading

    cfg = PipelineConfig()
    model, tok, base = loading.load_base(cfg.model, kind="seqcls")
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0), task_type="SEQ_CLS"))
    torch.manual_seed(0)
    pm.save_pretrained(folder)
    write_manifest(folder, "reward", cfg, base, metrics={}, extra={"pooling": cfg.reward.pooling})


def run_setting(name: str, steps: int, reward_dir: str) -> dict:
    """Child process: run PPO for `steps` steps, report the mean of steps 2.. (step 1 warms caches)."""
    from pipeline.config import load_config
    from pipeline.stages.ppo import run_ppo

    with tempfile.TemporaryDirectory() as tmp:
        overrides = COMMON + SETTINGS[name] + [f"ppo.steps={steps}",
                                               f"ppo.rewards=[{{name: reward_model, args: {{path: {reward_dir}}}}}]"]
        cfg = load_config(REPO / "configs" / "default.yaml", overrides)
        run_ppo(cfg, Path(tmp) / "run", overwrite=True)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    mean = lambda k: sum(r[k] for r in timed) / len(timed)  # noqa: E731
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "per_step": mean("time/step"), "peak_rss_mb": rss, "generate": mean("time/generate"),
            "score": mean("time/score"), "train": mean("time/train")}


def _result_line(r: dict) -> str:
    return (f"RESULT name={r['name']} per_step={r['per_step']:.2f}s peak_rss_mb={r['peak_rss_mb']:.0f} "
            f"generate={r['generate']:.2f}s score={r['score']:.2f}s train={r['train']:.2f}s")


def _run_child(name: str, steps: int, reward_dir: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--reward", reward_dir],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"setting {name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_anchor(steps: int) -> dict | None:
    if not ANCHOR.exists():
        print(f"# anchor script not found at {ANCHOR}; no ratios", flush=True)
        return None
    out = subprocess.run(["bash", str(ANCHOR), "--steps", str(steps)], capture_output=True, text=True)
    m = re.search(r"per_step=([\d.]+)s peak_rss_mb=(\d+)", out.stdout)
    if not m:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-2000:])
        print("# anchor failed; no ratios", flush=True)
        return None
    print(out.stdout.strip().splitlines()[-1], flush=True)
    return {"per_step": float(m.group(1)), "peak_rss_mb": float(m.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="default,all-layers",
                    help="comma-separated: " + ", ".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=4, help="PPO steps per setting (the first is not timed)")
    ap.add_argument("--anchor-steps", type=int, default=3)
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reward", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        print(json.dumps(run_setting(a.child, a.steps, a.reward)))
        return
    if a.child is None and a.reward:
        _make_reward_model(Path(a.reward))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reward_dir = str(Path(tmp) / "reward")
        # Built in its own process so that its model load does not count in any setting's peak RSS.
        subprocess.run([sys.executable, __file__, "--reward", reward_dir], cwd=REPO, check=True,
                       capture_output=True)
        for name in a.settings.split(","):
            r = _run_child(name, a.steps, reward_dir)
            print(_result_line(r), flush=True)
            results.append(r)
    anchor = None if a.no_anchor else _run_anchor(a.anchor_steps)
    if anchor:
        for r in results:
            print(f"RATIO name={r['name']} step_time_vs_trl112={r['per_step'] / anchor['per_step']:.3f} "
                  f"peak_rss_vs_trl112={r['peak_rss_mb'] / anchor['peak_rss_mb']:.3f}", flush=True)


if __name__ == "__main__":
    main()
