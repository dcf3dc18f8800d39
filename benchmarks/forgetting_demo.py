"""Forgetting, measured: the LoRA SFT adapter next to a full fine-tune of the same model on the same data.

    make forgetting-demo [RUN=runs/default] [ARGS="--steps 20 --learning-rate 1e-5"]
    python benchmarks/forgetting_demo.py --config configs/default.yaml --run-dir runs/default \\
        [--steps N] [--learning-rate LR] [--out FOLDER] [--overwrite] [section.key=value ...]

LoRA is chosen partly because it forgets less than full fine-tuning (Biderman et al. 2024, "LoRA
Learns Less and Forgets Less", arXiv 2405.09673). This script measures it on this pipeline's model:

1. LoRA: the NF4 base with the SFT stage's adapter (``ppo.sft_adapter``, RUN/sft), float32 compute.
2. Full fine-tune: the same NF4 base dequantized to a plain float32 model (the weights the adapter was
   trained against, :func:`pipeline.models.load_dequantized_base`), every parameter trained with the SFT
   stage's own trainer and settings (``sft.*``: rows, assistant-only loss, batch, schedule, max length),
   except the learning rate (``--learning-rate``, default 2e-5: full fine-tuning moves every weight,
   so it takes a far smaller rate than LoRA's) and the number of optimizer steps (``--steps``, default
   as the SFT stage: ``sft.max_steps``, else ``sft.epochs`` over the data).
3. Each measured on the general text of ``eval.forgetting`` (pipeline/evaluation/forgetting.py: token loss,
   perplexity, per-token KL to its own starting model over the full vocabulary) and on the task
   (``data.sft_eval``: mean token loss on the assistant turns), so what each forgot sits next to what
   each learned.

Writes ``--out`` (default RUN/forgetting-demo; atomically): ``summary.txt``, ``results.json``,
``metrics.jsonl`` (the full fine-tune's training log), ``config.yaml`` and ``manifest.json``. The
fine-tuned weights are not kept. Memory: the float32 model with its gradients and two Adam moments,
~2.2 GB on the embedded 135M model, plus activations.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LR = 2e-5


def run(cfg, run_dir: Path, out: Path, steps: int | None, learning_rate: float, overwrite: bool = False) -> dict:
    import torch

    from pipeline.artifacts import hashing
    from pipeline.artifacts.outputs import (
        ArtifactError,
        MetricsLogger,
        atomic_output,
        check_same_base,
        read_manifest,
        write_manifest,
    )
    from pipeline.config import substitute_run_dir
    from pipeline.data import loaders
    from pipeline.evaluation import forgetting
    from pipeline.models import loading, stacking
    from pipeline.models.trainer_utils import JsonlMetrics, train_loss
    from pipeline.stages.sft import build_trainer, eval_loss

    # 1. inputs: the LoRA adapter, the general text, the SFT rows
    sft_dir = substitute_run_dir(cfg.ppo.sft_adapter, run_dir)
    if not sft_dir or not (Path(sft_dir) / "adapter_model.safetensors").is_file():
        raise ArtifactError(f"no SFT adapter at '{sft_dir}' (ppo.sft_adapter): run `make sft RUN={run_dir}` first")
    sft_dir = Path(sft_dir)
    passages = forgetting.read_passages(cfg.eval.forgetting)
    dkw = loaders.loader_options(cfg.data)
    train_rows, train_report = loaders.load_sft(cfg.data.sft_train, **dkw)
    eval_rows, eval_report = loaders.load_sft(cfg.data.sft_eval, **dkw)
    reports = (train_report, eval_report)
    float32 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype="float32"))
    ft_cfg = dataclasses.replace(float32, sft=dataclasses.replace(
        cfg.sft, learning_rate=learning_rate, max_steps=cfg.sft.max_steps if steps is None else steps))

    with atomic_output(out, overwrite=overwrite) as tmp:
        # 2. LoRA: the NF4 base and the SFT adapter, float32 compute; the base is the adapter switched off
        t0 = time.time()
        base_model, tok, base = loading.load_base(float32.model)
        check_same_base(read_manifest(sft_dir), base, f"SFT adapter {sft_dir}")
        peft_model = stacking.stack_adapters(base_model, {"sft": sft_dir})
        peft_model.eval()
        text = forgetting.encode_passages(tok, passages, cfg.eval.forgetting, cfg.eval.forgetting_max_tokens,
                                          cfg.eval.batch_size)
        print(f"[forgetting-demo] {text.passages} passages, {text.tokens} scored tokens of {cfg.eval.forgetting}",
              flush=True)
        probe = forgetting.ForgettingProbe(peft_model, text)
        results = {"base": probe.measure(adapters=None), "lora_sft": probe.measure(adapters=["sft"])}
        # the task loss through the SFT stage's own trainer: the same rows, masks and lengths as trained on
        trainer, _ = build_trainer(float32, peft_model, tok, train_rows, eval_rows, reports, tmp / "trainer", None,
                                   [], dtype=torch.float32)
        with peft_model.disable_adapter():
            results["base"]["task_eval_loss"] = eval_loss(trainer, cfg.sft.max_length)
        results["lora_sft"]["task_eval_loss"] = eval_loss(trainer, cfg.sft.max_length)
        lora_trainable = sum(p.numel() for n, p in peft_model.named_parameters() if ".sft." in n)
        lora_seconds = time.time() - t0
        del probe, trainer, peft_model, base_model
        gc.collect()
        loading.release_free_memory()

        # 3. full fine-tune: the dequantized base in float32, every parameter, the SFT stage's trainer
        model, tok, _ = loading.load_dequantized_base(cfg.model)
        model.to(loading.resolve_device(cfg.model.device))
        probe = forgetting.ForgettingProbe(model, text, snapshot=True)  # the head trains (tied embeddings)
        results["full_ft_start"] = probe.measure(model)
        logger = MetricsLogger(tmp / "metrics.jsonl")
        trainer, _ = build_trainer(ft_cfg, model, tok, train_rows, eval_rows, reports, tmp / "trainer", None,
                                   [JsonlMetrics(logger, "full_ft")], dtype=torch.float32)
        trainable, _ = loading.count_parameters(trainer.model)
        print(f"[forgetting-demo] full fine-tune: {trainable:,} trainable parameters, learning rate "
              f"{learning_rate:g}, {'as the SFT stage' if steps is None else f'{steps} steps'}", flush=True)
        t_train = time.time()
        trainer.train()
        train_seconds = time.time() - t_train
        model.eval()
        results["full_ft"] = probe.measure(model)
        results["full_ft"]["task_eval_loss"] = eval_loss(trainer, cfg.sft.max_length)
        logger.close()
        full = {"steps": trainer.state.global_step, "learning_rate": learning_rate,
                "train_seconds": round(train_seconds, 1), "train_loss": train_loss(trainer.state.log_history),
                "trainable_params": trainable}
        del trainer, model
        shutil.rmtree(tmp / "trainer", ignore_errors=True)

        # 4. report
        names = {"base": "base (NF4)", "lora_sft": "LoRA SFT adapter", "full_ft_start": "full FT start (fp32)",
                 "full_ft": f"full FT, {full['steps']} step{'s' * (full['steps'] != 1)}"}
        summary = forgetting.table([(names[k], results[k]) for k in names], text)
        summary += ("Each KL is to the model's own start: the NF4 base for LoRA, the same base dequantized to "
                    "float32 for the full fine-tune.\n")
        summary += (f"\nTask (data.sft_eval, mean token loss on assistant turns): base "
                    f"{results['base']['task_eval_loss']:.4f}, LoRA SFT {results['lora_sft']['task_eval_loss']:.4f}, "
                    f"full FT {results['full_ft']['task_eval_loss']:.4f}\n"
                    f"LoRA: {lora_trainable:,} trained parameters ({sft_dir}, sft.learning_rate "
                    f"{cfg.sft.learning_rate:g}); full FT: all {trainable:,} at learning rate {learning_rate:g}, "
                    f"{names['full_ft'].split(', ')[1]} in {full['train_seconds']} s (train loss "
                    f"{full['train_loss']:.4f})\n")
        for k in ("lora_sft", "full_ft"):
            forgot = results[k]["nll"] - results["base"]["nll"]
            learned = results["base"]["task_eval_loss"] - results[k]["task_eval_loss"]
            summary += (f"{names[k]}: task loss {-learned:+.4f} nats/token, general loss {forgot:+.4f} "
                        f"nats/token, KL to its start {results[k]['kl']:.4f} nats/token\n")
        metrics = {"models": {k: {m: v for m, v in r.items() if not m.endswith(("_sums", "_counts"))}
                              for k, r in results.items()},
                   "full_ft": full, "lora": {"adapter": str(sft_dir), "trainable_params": lora_trainable,
                                             "learning_rate": cfg.sft.learning_rate},
                   "general_text": {"source": cfg.eval.forgetting, "passages": text.passages, "tokens": text.tokens,
                                    "truncated": text.truncated},
                   "wall_seconds": round(time.time() - t0, 1), "lora_side_seconds": round(lora_seconds, 1)}
        (tmp / "summary.txt").write_text(summary)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        write_manifest(tmp, "forgetting-demo", ft_cfg, base, metrics,
                       adapters={"sft": {"path": str(sft_dir),
                                         "sha256": hashing.sha256_file(sft_dir / "adapter_model.safetensors")}},
                       data={"general_text": {"source": cfg.eval.forgetting,
                                              "sha256": loaders.data_hash(cfg.eval.forgetting)},
                             "train": loaders.manifest_entry(cfg.data.sft_train, train_report, cfg.data.split),
                             "eval": loaders.manifest_entry(cfg.data.sft_eval, eval_report, cfg.data.split)})
    sys.stdout.write("\n" + summary)
    print(f"[forgetting-demo] done -> {out}", flush=True)
    return results


def main(argv=None) -> None:
    from pipeline.cli import quiet_libraries
    from pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--run-dir", default=None, help="the run whose SFT adapter is compared (default: "
                                                     "runs/<config file name>)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps of the full fine-tune (default: as the SFT stage)")
    ap.add_argument("--learning-rate", type=float, default=DEFAULT_LR)
    ap.add_argument("--out", default=None, help="output folder (default: RUN/forgetting-demo)")
    ap.add_argument("--overwrite", action="store_true", help="replace a complete output folder")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    a = ap.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    if not a.learning_rate > 0:
        ap.error(f"--learning-rate must be > 0, got {a.learning_rate}")
    cfg = load_config(a.config, a.overrides)
    # eval.forgetting is off by default in `rlhf eval`; the demo is about forgetting, so it reads the
    # shipped general text unless another is given.
    cfg.eval.forgetting = cfg.eval.forgetting or "data/general_text.jsonl"
    run_dir = Path(a.run_dir or Path("runs") / Path(a.config).stem)
    quiet_libraries()
    run(cfg, run_dir, Path(a.out) if a.out else run_dir / "forgetting-demo", a.steps, a.learning_rate, a.overwrite)


if __name__ == "__main__":
    main()
