"""`rlhf`: one command, a subcommand per stage. Each reads a YAML config plus key=value overrides."""
from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

import click

from pipeline.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/default.yaml"

_OVERRIDES_HELP = """
OVERRIDES are `section.key=value` pairs applied on top of the YAML file, for example
`sft.learning_rate=1e-4 sft.lora.r=8 data.skip_invalid=true`. Values are parsed as YAML.

Your own data: `data.sft_train=alpaca.json data.pairs_train=ultrafeedback.jsonl`. Each row's format
(chat messages, ShareGPT, Alpaca, Anthropic HH, chosen/rejected, PKU-SafeRLHF, UltraFeedback,
HelpSteer, Nectar) is detected from its columns, or forced with `data.format=NAME`; rows longer
than a stage's token limit follow `data.long_rows=truncate|drop|error` (default: truncate from the
left). See README "Data formats".
"""


def _user_errors():
    """Exceptions that are the user's to fix: shown as one clear line, not a traceback."""
    from pipeline.artifacts.outputs import ArtifactError
    from pipeline.data.loaders import DataError
    from pipeline.models.embedded import ModelError
    from pipeline.rl.ppo_state import PPOError
    from pipeline.rl.rollout import PromptTooLongError

    errors = [ConfigError, ArtifactError, DataError, ModelError, PromptTooLongError, PPOError, FileNotFoundError]
    try:
        from reward.base import RewardError

        errors.append(RewardError)
    except ImportError:
        pass
    return tuple(errors)


# Stages that write RUN/<stage>: one process at a time (RUN/.<stage>.lock). Those with checkpoints resume.
_WRITERS = ("sft", "reward", "ppo", "fuse", "eval")
_RESUMABLE = ("sft", "reward", "ppo")
# A full disk and its kin: the user's to fix; every output is written aside and renamed, so nothing is lost.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def _command(stage: str, config_path: str, run_dir: Path, overrides, flag: str) -> str:
    return shlex.join(["rlhf", stage, "--config", config_path, "--run-dir", str(run_dir), *overrides, flag])


def _stopped(stage: str, config_path: str, run_dir: Path, overrides, e: KeyboardInterrupt) -> str:
    """What an interrupted stage left and how to go on."""
    from pipeline.artifacts import guard
    from pipeline.artifacts.checkpoints import latest_checkpoint

    how = f"stopped by {e.signal_name}" if isinstance(e, guard.StopRequested) else "interrupted"
    detail = f" {e.detail}" if isinstance(e, guard.StopRequested) and e.detail else ""
    ckpt = latest_checkpoint(run_dir, stage) if stage in _RESUMABLE else None
    if ckpt is None:
        nxt = "nothing complete was written; run the same command again"
    else:
        nxt = f"the last checkpoint is {ckpt}; continue with: {_command(stage, config_path, run_dir, overrides, '--resume')}"
    return f"[{stage}] {how}{detail}; {nxt}"


def _error_log(run_dir: Path, stage: str) -> Path:
    """Write the traceback of the exception being handled, the command and the versions to a log file in
    the run folder (or the temp folder if that cannot be written); returns its path."""
    import tempfile
    import time
    import traceback

    from pipeline.artifacts.outputs import library_versions

    text = (f"command: {' '.join(sys.argv)}\ntime: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            f"libraries: {library_versions()}\n\n{traceback.format_exc()}")
    name = f"{stage}-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (run_dir / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return Path("(no log written: the run folder and the temp folder are not writable)")


def _main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a single process) holds the stage lock."""
    return os.environ.get("RANK", "0") == "0"


def stage_command(fn):
    """Shared options for a stage: --config, --run-dir and OVERRIDES. Around the stage: the config is
    validated before anything loads; one writer per RUN/<stage> (a lock); SIGINT/SIGTERM stop cleanly;
    every torch.load is weights-only; errors are one line (an unexpected one adds the path of a full log)."""
    stage = fn.__name__.rstrip("_")

    @click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                  type=click.Path(dir_okay=False), help="Pipeline YAML file.")
    @click.option("--run-dir", default=None,
                  help="Where the stages write (default: runs/<config file name>).")
    @click.argument("overrides", nargs=-1)
    @functools.wraps(fn)
    def wrapper(config_path, run_dir, overrides, **kwargs):
        from pipeline.artifacts import guard
        from pipeline.artifacts.checkpoints import weights_only_loads

        if kwargs.get("resume") and kwargs.get("overwrite"):
            raise click.UsageError("--resume continues the unfinished run and --overwrite starts over; pass one")
        try:
            cfg = load_config(config_path, overrides)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        run_dir = Path(run_dir or Path("runs") / Path(config_path).stem)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(guard.stop_on_signals())
                stack.enter_context(weights_only_loads())
                if stage in _WRITERS and _main_process():
                    stack.enter_context(guard.stage_lock(run_dir, stage))
                result = fn(cfg=cfg, run_dir=run_dir, **kwargs)
            _end_process_group()
            return result
        except KeyboardInterrupt as e:
            click.echo(_stopped(stage, config_path, run_dir, overrides, e), err=True)
            sys.exit(guard.exit_code(getattr(e, "signal_name", "SIGINT")))
        except _user_errors() as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from None
        except OSError as e:
            if e.errno not in _DISK_ERRNOS:
                raise click.ClickException(f"internal error: {type(e).__name__}: {e}; full log: "
                                           f"{_error_log(run_dir, stage)}") from None
            where = f" writing {e.filename}" if e.filename else ""
            resume = " (with --resume)" if stage in _RESUMABLE else ""
            raise click.ClickException(f"{e.strerror or e}{where}. Outputs and checkpoints are written aside and "
                                       f"renamed when whole, so the earlier ones are intact; free space and run "
                                       f"again{resume}.") from None
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(f"internal error: {type(e).__name__}: {first}\nfull log: "
                                       f"{_error_log(run_dir, stage)}") from None

    return wrapper


def _end_process_group() -> None:
    """Destroy the process group a multi-process stage (``accelerate launch``) set up, once it has finished.
    Left to interpreter shutdown, gloo's worker threads can outlive it and abort the process ("terminate
    called without an active exception", SIGABRT: pytorch/pytorch#190489), failing a run that completed.
    Only on success: after an error another process may still be inside a collective, and destroying the
    group then can deadlock (pytorch/torchtitan#1342)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _DropNotice(logging.Filter):
    """bitsandbytes logs at import, on every CPU with AVX512-BF16, that its optional hub kernel package
    (`kernels`) is missing: nothing the user can act on (the built-in CPU kernels are used)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


_DROP_NOTICE = _DropNotice()


def quiet_libraries() -> None:
    """Silence library output the user cannot act on."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DROP_NOTICE)  # once: filters are a set
    # trl's per-dataset map/filter progress bars (six per SFT run, each over in milliseconds).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # trl 1.16's SFTConfig still declares transformers' deprecated `gradient_checkpointing` (default True),
    # and peft reads `is_gradient_checkpointing`: deprecation notices between the libraries.
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """RLHF with LoRA policies on one shared 4-bit base.

    Stages write into a run directory: sft/ -> reward/ -> ppo/ -> fused/, eval/.
    Each stage saves its adapter, resolved config.yaml, metrics.jsonl and manifest.json.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()


_RESUME_HELP = """
A killed or stopped run keeps RUN/{stage}.work/ with its latest checkpoints ({key}); --resume continues
it exactly, --overwrite starts over. SIGINT/SIGTERM (Ctrl-C) stop after the current step and save it.
"""


def _resumable(stage: str, summary: str, every: str, target: str):
    """The command of a stage that checkpoints (sft, reward, ppo): --overwrite, --resume, and the stage
    function ``target`` ("module:function"), imported when the command runs."""
    def command(cfg, run_dir, overwrite, resume):
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(cfg, run_dir, overwrite=overwrite, resume=resume)

    command.__name__ = stage
    command = stage_command(command)
    command = click.option("--resume", is_flag=True,
                           help=f"Continue from the latest checkpoint in RUN/{stage}.work/.")(command)
    command = click.option("--overwrite", is_flag=True,
                           help=f"Start over, replacing RUN/{stage} or an unfinished RUN/{stage}.work.")(command)
    return main.command(name=stage, help=summary + _OVERRIDES_HELP + _RESUME_HELP.format(stage=stage, key=every))(
        command)


sft = _resumable("sft", "Stage 1: supervised fine-tuning of a LoRA adapter on the NF4 base (QLoRA).",
                 "every sft.save_steps steps", "pipeline.stages.sft:run_sft")
reward = _resumable("reward", "Stage 2: train a reward model (LoRA + score head) on preference pairs.",
                    "every reward.save_steps steps", "pipeline.stages.reward:run_reward")
ppo = _resumable("ppo", "Stage 3: RL on the policy adapter against the configured rewards: PPO, or the critic-free "
                 "RLOO or GRPO with ppo.algorithm=rloo|grpo and ppo.samples_per_prompt=k (k >= 2).",
                 "every ppo.save_every steps", "pipeline.stages.ppo:run_ppo")


@main.command(help="Stage 4 (optional): fuse stage adapters into one adapter and/or a merged model. "
              "fuse.method: cat (default, exact), a peft weighted combination (linear, svd, ties, ...), or learned: "
              "train a per-layer, per-token gate over the frozen adapters (AdapterFusion on LoRA) on reward-ranked "
              "policy samples and fuse.sft_rows SFT conversations; writes gate + adapters and a mean-gate "
              "approximation as one LoRA adapter." + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing complete RUN/fused output.")
@stage_command
def fuse(cfg, run_dir, overwrite):
    from pipeline.stages.fuse import run_fuse

    run_fuse(cfg, run_dir, overwrite=overwrite)


@main.command(name="eval", help="KL-versus-reward curves for base, SFT, PPO checkpoints and best-of-n; "
              "eval.runs=[RUN2, RUN3] adds other runs' checkpoints (e.g. RLOO, GRPO) as series of their own; "
              "fuse outputs in eval.fused (default RUN/fused, when present) are points of their own. "
              "The forgetting check gives each model's token loss, perplexity and KL to the base on general "
              "text no stage trains on (eval.forgetting; eval.forgetting= skips it)." + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing complete RUN/eval output.")
@stage_command
def eval_(cfg, run_dir, overwrite):
    from pipeline.stages.evaluate import run_eval

    run_eval(cfg, run_dir, overwrite=overwrite)


@main.command(help="Score a jsonl of {prompt, response} rows with the configured rewards (ppo.rewards), "
              "writing one row per input with the total and each component." + _OVERRIDES_HELP)
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="jsonl with 'prompt' and 'response' fields.")
@click.option("--output", "output_path", default="-", help="Where to write scores (jsonl; '-' = stdout).")
@click.option("--rewards", "rewards_yaml", default=None,
              help="YAML list of reward specs to use instead of ppo.rewards, e.g. '[{name: sentiment}]'.")
@stage_command
def score(cfg, run_dir, input_path, output_path, rewards_yaml):
    from pipeline.stages.score import run_score

    run_score(cfg, run_dir, input_path, output_path, rewards_yaml)


@main.command(help="Check a run folder: every stage output's files (PPO checkpoints included) against the sizes "
              "and sha256 its manifest lists. One line per problem, naming the file and the command that remakes "
              "it, then a summary; exits 1 if anything is missing, truncated or changed.")
@click.argument("run_dir", type=click.Path(file_okay=False))
def verify(run_dir):
    from pipeline.artifacts.verify import verify_run

    check = verify_run(Path(run_dir))
    for line in check.notes + check.problems:
        click.echo(line)
    click.echo(check.summary())
    sys.exit(1 if check.problems else 0)


@main.command(help="Measure this machine: CPU, instruction sets, the compute dtype model.compute_dtype=auto picks, "
              "and the matmul throughput (FLOP/s) in float32 and bfloat16 on the threads the stages use (and on the GPU, "
              "where CUDA is present): the peak MFU is computed against. Nothing is loaded or written unless --json is given.")
@click.option("--seconds", default=0.5, show_default=True, type=click.FloatRange(min=0.05),
              help="How long each dtype's matmul is repeated (the best repeat is kept).")
@click.option("--size", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Side of the square matrices multiplied.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the figures to this JSON file.")
def doctor(seconds, size, json_path):
    import json

    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import loading, throughput

    cpu = throughput.cpu_description()
    threads = torch.get_num_threads()
    auto = loading.describe_precision(ModelConfig(compute_dtype="auto"), torch.device("cpu"))
    peaks = {name: throughput.probe_matmul(dtype, size=size, seconds=seconds)
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    click.echo(f"cpu: {cpu['cpu'] or 'unknown'}; {', '.join(cpu['isa']) or 'no AVX2/AVX512/AMX flags seen'}")
    click.echo(f"torch {torch.__version__}, {threads} threads; model.compute_dtype=auto: {auto}")
    for name, flops in peaks.items():
        click.echo(f"matmul {size}x{size} {name}: {flops / 1e9:,.1f} GFLOP/s")
    click.echo(f"bfloat16 / float32: {peaks['bfloat16'] / peaks['float32']:.2f}x")
    gpu = {}
    if torch.cuda.is_available():  # what the stages measure MFU against on a GPU (throughput.measured_peak)
        dev = torch.device("cuda")
        gpu = {"gpu": torch.cuda.get_device_name(dev), "gpu_matmul_size": throughput.GPU_PROBE_SIZE,
               "gpu_matmul_flops_per_s": {name: throughput.measured_peak(dtype, dev)
                                          for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}}
        for name, flops in gpu["gpu_matmul_flops_per_s"].items():
            click.echo(f"{gpu['gpu']}: matmul {throughput.GPU_PROBE_SIZE}^2 {name}: {flops / 1e12:,.1f} TFLOP/s")
    if json_path:
        Path(json_path).write_text(json.dumps({**cpu, "torch": torch.__version__, "threads": threads,
                                               "compute_dtype_auto": auto, "matmul_size": size,
                                               "matmul_flops_per_s": peaks, **gpu}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
