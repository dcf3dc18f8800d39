"""SFT training throughput: our `rlhf sft` against a plain trl SFTTrainer script, same model, data and batch.

Both train a LoRA (r=16, all-linear) on the embedded SmolLM2-135M-Instruct in NF4 on CPU for the same
number of steps on data/sft_train.jsonl, batch 8. Throughput = non-padding tokens seen / training
seconds (the trainer's own counters). Each variant runs in its own process. Ours runs with
``sft.grad_accum=1`` (the default config accumulates 2 micro-batches of 4), so both see the same 8-row
batches: the same tokens in the same steps. ``ours-full-head`` is ours
with trl's LM head over every position, as trl runs it on CPU (trainer_utils.COMPACT_LM_HEAD off);
``ours-trl-head`` scores the labelled positions with trl's chunked function instead of the blocked head
(trainer_utils.BLOCKED_LM_HEAD off);
``ours-unshared`` runs the start every row of a batch shares (the system prompt) once a row, as trl does
(forwards.SHARE_PREFIXES off).
``trl-plain`` keeps trl's defaults: on a quantized base SFTTrainer casts the LoRA weights to bf16 and
``bf16`` defaults to on, which is emulated (about 40x slower than float32) on a CPU without
AVX512-BF16/AMX; trl also turns gradient checkpointing on by default. ``trl-fp32`` is the script as
someone who knows this writes it for a small model in float32 (``bf16=False``, LoRA weights cast back
to float32, no gradient checkpointing, which we do not use either): the fair baseline on such a CPU.
Both use our default LoRA (r=16, alpha=32, dropout 0), so the ratio is not a dropout setting's.

    python benchmarks/sft_throughput.py [--steps 12]

Prints `RESULT name=<variant> tokens_per_s=<x> seconds=<s> tokens=<n>` and the ratio of each of ours to
the plain script measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("trl-plain", "trl-fp32", "ours", "ours-full-head", "ours-trl-head", "ours-unshared", "ours-padding-free")


def plain_trl(steps: int, fp32: bool = False) -> dict:
    """What a user writes with trl alone (the baseline); ``fp32``: written for float32 (module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.models.embedded import resolve_model_path

    path = resolve_model_path("embedded:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    rows = [json.loads(line) for line in (REPO / "data" / "sft_train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        fp32_args = {"bf16": False, "gradient_checkpointing": False} if fp32 else {}
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=8, max_steps=steps, learning_rate=2e-4,
                         max_length=256, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                         seed=42, include_num_input_tokens_seen="non_padding", **fp32_args)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))
        if fp32:  # undo SFTTrainer's bf16 cast of a quantized model's adapters; the optimizer is built in train()
            for param in trainer.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        out = trainer.train()
        seconds = out.metrics["train_runtime"]
        tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "seconds": seconds}


def ours(steps: int, padding_free: bool, compact_head: bool = True, share_starts: bool = True,
         blocked_head: bool = True) -> dict:
    from pipeline.config import load_config
    from pipeline.models import forwards, trainer_utils
    from pipeline.stages.sft import run_sft

    trainer_utils.COMPACT_LM_HEAD = compact_head
    trainer_utils.BLOCKED_LM_HEAD = blocked_head
    forwards.SHARE_PREFIXES = share_starts

    overrides = [f"sft.max_steps={steps}", "sft.batch_size=8", "sft.grad_accum=1", "sft.max_length=256", "sft.gold_eval_prompts=0",
                 "data.sft_eval=", f"sft.padding_free={str(padding_free).lower()}", "sft.logging_steps=1000"]
    cfg = load_config(REPO / "configs" / "default.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_sft(cfg, tmp)
        metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    return {"tokens": metrics["train_tokens"], "seconds": metrics["train_seconds"], "mfu": metrics["train_mfu"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child.startswith("trl-"):
            r = plain_trl(a.steps, fp32=a.child == "trl-fp32")
        else:
            r = ours(a.steps, a.child == "ours-padding-free", a.child != "ours-full-head", a.child != "ours-unshared",
                     a.child != "ours-trl-head")
        print(json.dumps(r))
        return
    results = {}
    for name in a.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps)], cwd=REPO,
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout[-2000:] + p.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        results[name] = r
        mfu = f" mfu={r['mfu']:.3f}" if "mfu" in r else ""
        print(f"RESULT name={name} tokens_per_s={r['tokens_per_s']:.1f} seconds={r['seconds']:.1f} "
              f"tokens={r['tokens']:.0f}{mfu}", flush=True)
    for baseline in ("trl-plain", "trl-fp32"):
        if baseline in results:
            base = results[baseline]["tokens_per_s"]
            for name, r in results.items():
                if not name.startswith("trl-"):
                    print(f"RATIO name={name} tokens_per_s_vs_{baseline.replace('-', '_')}="
                          f"{r['tokens_per_s'] / base:.3f}", flush=True)


if __name__ == "__main__":
    main()
