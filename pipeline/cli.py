"""`rlhf`: one command, a subcommand per stage. Each reads a YAML config plus key=value overrides."""
from __future__ import annotations

import functools
import os
import sys
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
    from pipeline.artifacts import ArtifactError
    from pipeline.data import DataError
    from pipeline.rollout import PromptTooLongError

    from pipeline.ppo import PPOError

    errors = [ConfigError, ArtifactError, DataError, PromptTooLongError, PPOError, FileNotFoundError]
    try:
        from reward.base import RewardError

        errors.append(RewardError)
    except ImportError:
        pass
    return tuple(errors)


def stage_command(fn):
    """Shared options for a stage: --config, --run-dir, --overwrite and OVERRIDES."""

    @click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                  type=click.Path(dir_okay=False), help="Pipeline YAML file.")
    @click.option("--run-dir", default=None,
                  help="Where the stages write (default: runs/<config file name>).")
    @click.argument("overrides", nargs=-1)
    @functools.wraps(fn)
    def wrapper(config_path, run_dir, overrides, **kwargs):
        try:
            cfg = load_config(config_path, overrides)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        run_dir = Path(run_dir or Path("runs") / Path(config_path).stem)
        try:
            return fn(cfg=cfg, run_dir=run_dir, **kwargs)
        except _user_errors() as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """RLHF with LoRA policies on one shared 4-bit base.

    Stages write into a run directory: sft/ -> reward/ -> ppo/ -> fused/, eval/.
    Each stage saves its adapter, resolved config.yaml, metrics.jsonl and manifest.json.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@main.command(help="Stage 1: supervised fine-tuning of a LoRA adapter on the NF4 base (QLoRA)." + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing complete RUN/sft output.")
@stage_command
def sft(cfg, run_dir, overwrite):
    from pipeline.sft import run_sft

    run_sft(cfg, run_dir, overwrite=overwrite)


@main.command(help="Stage 2: train a reward model (LoRA + score head) on preference pairs." + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing complete RUN/reward output.")
@stage_command
def reward(cfg, run_dir, overwrite):
    from pipeline.reward_stage import run_reward

    run_reward(cfg, run_dir, overwrite=overwrite)


@main.command(help="Stage 3: RL on the policy adapter against the configured rewards: PPO, or the critic-free "
              "RLOO or GRPO with ppo.algorithm=rloo|grpo and ppo.samples_per_prompt=k (k >= 2)." + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Start over even if RUN/ppo holds a complete output.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in RUN/ppo.work/.")
@stage_command
def ppo(cfg, run_dir, overwrite, resume):
    from pipeline.ppo import run_ppo

    run_ppo(cfg, run_dir, overwrite=overwrite, resume=resume)


@main.command(help="Stage 4 (optional): fuse stage adapters into one adapter and/or a merged model."
              + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing complete RUN/fused output.")
@stage_command
def fuse(cfg, run_dir, overwrite):
    from pipeline.fuse import run_fuse

    run_fuse(cfg, run_dir, overwrite=overwrite)


@main.command(name="eval", help="KL-versus-reward curves for base, SFT, PPO checkpoints and best-of-n; "
              "eval.runs=[RUN2, RUN3] adds other runs' checkpoints (e.g. RLOO, GRPO) as series of their own."
              + _OVERRIDES_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing complete RUN/eval output.")
@stage_command
def eval_(cfg, run_dir, overwrite):
    from pipeline.evaluate import run_eval

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
    from pipeline.scoring import run_score

    run_score(cfg, run_dir, input_path, output_path, rewards_yaml)


if __name__ == "__main__":
    sys.exit(main())
