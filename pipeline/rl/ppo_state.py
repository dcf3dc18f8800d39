"""The state of a PPO-family run that is not the algorithm: where it is in the prompts, checkpoints
(written whole, then renamed; safetensors + JSON, no pickles), resuming from one exactly, every
process's RNG stream, and stopping a step that cannot complete with the trained parameters put back
to its start and a checkpoint a rerun with ``--resume`` redoes the step from.

A checkpoint after ``step`` completed steps holds the policy (and value) adapter, the value head,
the optimizer, scheduler and KL controller, the reward normalisers, the RNG state of every process
and the data position; resuming from it gives the same run, bit for bit, as not stopping.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

import torch

from pipeline.artifacts.checkpoints import (
    Checkpoints,
    rng_state,
    save_state,
    set_rng_state,
    step_name,
)
from pipeline.artifacts.outputs import ArtifactError
from pipeline.models import stacking
from pipeline.rl.policy_value import POLICY, VALUE, PolicyValue


class PPOError(RuntimeError):
    """The run stopped; the message says why and where the resumable checkpoint is."""


class StepFailed(Exception):
    """A step that cannot complete (a reward raised, a loss is not finite). ``message`` says what and
    where; ``advice`` what the user does before ``--resume``; ``restore``: parameters changed during
    the step and are put back to its start before the checkpoint is saved."""

    def __init__(self, message: str, advice: str, restore: bool = False):
        super().__init__(message)
        self.message, self.advice, self.restore = message, advice, restore


# ---------------------------------------------------------------------------------------------
# Data position: a seeded shuffled order of the prompts per epoch


@dataclass
class Position:
    """How far the run is through the prompts: the epoch and the next index into its order."""

    epoch: int = 0
    cursor: int = 0


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` prompts in ``epoch``: a permutation from a generator seeded by (seed, epoch),
    so that a resumed run replays it without a saved copy."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def next_prompts(position: Position, n_prompts: int, count: int, seed: int) -> tuple[list[int], Position]:
    """The next ``count`` prompt indices from ``position`` (a new epoch's order when one runs out) and the
    position after them. E.g. 3 prompts, count 2 from (0, 2): order[0][2], then order[1][0]; (1, 1)."""
    epoch, cursor = position.epoch, position.cursor
    order = prompt_order(n_prompts, seed, epoch)
    idx = []
    while len(idx) < count:
        if cursor >= len(order):
            epoch, cursor = epoch + 1, 0
            order = prompt_order(n_prompts, seed, epoch)
        idx.append(order[cursor])
        cursor += 1
    return idx, Position(epoch, cursor)


# ---------------------------------------------------------------------------------------------
# One step's starting point


@dataclass
class StepStart:
    """What a failed step is undone to: the data position, RNG and reward-normaliser state at its start,
    and, once the update begins, the trained parameters and the optimizer state."""

    step: int
    position: Position
    rng: dict
    reward_state: dict
    parameters: Optional[dict] = None
    optimizer: Optional[dict] = None


def check_resumable(state: dict, ckpt: Path, algorithm: str, samples_per_prompt: int) -> None:
    """Refuse a checkpoint written by another estimator or group size (its optimizer and value state
    do not fit). Checkpoints from before ``ppo.algorithm`` existed are PPO with one sample per prompt."""
    written = (state.get("algorithm", "ppo"), state.get("samples_per_prompt", 1))
    if written != (algorithm, samples_per_prompt):
        raise ArtifactError(f"--resume: {ckpt} was written with ppo.algorithm={written[0]}, "
                            f"ppo.samples_per_prompt={written[1]}; this config has {algorithm} and "
                            f"{samples_per_prompt}. Resume with the same settings, or pass --overwrite to start over")


def save_checkpoint(checkpoints: Checkpoints, step: int, pv: PolicyValue, optimizer, scheduler, kl_ctl, reward_fn,
                    state: dict) -> Path:
    """Everything needed to continue exactly: adapter, value parameters, optimizer, scheduler, KL
    controller, reward normalisers, RNG states and data position, as safetensors + JSON (no pickles)
    in a folder written whole, then renamed."""
    def write(folder: Path) -> None:
        stacking.save_adapter(pv.peft_model, POLICY, folder / "policy")
        if pv.value_adapters is not None:
            stacking.save_adapter(pv.peft_model, VALUE, folder / "value_adapter")
        value = {} if pv.value_head is None else {"value_head": pv.value_head.state_dict()}
        save_state(folder, {**value, "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "kl_controller": kl_ctl.state_dict(),
                            "reward": reward_fn.state_dict(), "rng": rng_state(), **state})

    return checkpoints.save(step, write)


# ---------------------------------------------------------------------------------------------
# The run's state


class RunState:
    """The objects a checkpoint saves, and the three things done with them: ``resume`` from a
    checkpoint, ``checkpoint`` after a completed step, and ``stop`` a failed step (restore, save, raise).

    ``accelerator``: its ``num_processes``, ``process_index``, ``is_main_process`` and
    ``wait_for_everyone`` (one process on CPU; every process's RNG state is gathered into the
    checkpoint so that each resumes its own stream)."""

    def __init__(self, checkpoints: Checkpoints, pv: PolicyValue, optimizer, scheduler, kl_ctl, reward_fn,
                 accelerator, algorithm: str, samples_per_prompt: int):
        self.checkpoints = checkpoints
        self.pv, self.optimizer, self.scheduler = pv, optimizer, scheduler
        self.kl_ctl, self.reward_fn = kl_ctl, reward_fn
        self.accelerator = accelerator
        self.algorithm, self.samples_per_prompt = algorithm, samples_per_prompt

    def resume(self, ckpt: Path, state: dict) -> tuple[int, Position]:
        """Load a checkpoint's adapters, value head, optimizer, scheduler, KL controller, reward
        normalisers and this process's RNG state; returns (completed steps, data position)."""
        pv = self.pv
        stacking.load_adapter_weights(pv.peft_model, POLICY, ckpt / "policy")
        if pv.value_adapters is not None:
            stacking.load_adapter_weights(pv.peft_model, VALUE, ckpt / "value_adapter")
        if pv.value_head is not None:
            pv.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_fn.load_state_dict(state["reward"])
        rank = self.accelerator.process_index
        set_rng_state(state["rng_per_process"][rank] if "rng_per_process" in state else state["rng"])
        return state["step"], Position(state["epoch"], state["cursor"])

    def begin_step(self, step: int, position: Position) -> StepStart:
        """Capture what the step may have to be undone to (RNG and reward state before it draws anything)."""
        return StepStart(step, position, rng_state(), copy.deepcopy(self.reward_fn.state_dict()))

    def begin_update(self, start: StepStart) -> None:
        """Capture the trained parameters and the optimizer before the first gradient step of ``start``'s step."""
        start.parameters = self.pv.trainable_state()
        start.optimizer = copy.deepcopy(self.optimizer.state_dict())

    def checkpoint(self, step: int, position: Position, start: Optional[StepStart] = None) -> Path:
        """Save the state after ``step`` completed steps. For a failed step, ``start`` supplies the RNG and
        reward state captured at its beginning: resuming then redoes it exactly."""
        world = self.accelerator.num_processes
        own_rng = start.rng if start is not None else rng_state()
        rngs = [own_rng]
        if world > 1:
            import torch.distributed as dist

            rngs = [None] * world
            dist.all_gather_object(rngs, own_rng)
        path = self.checkpoints.root / step_name(step)
        if self.accelerator.is_main_process:
            current = None
            if start is not None:
                current = self.reward_fn.state_dict()
                self.reward_fn.load_state_dict(start.reward_state)
            try:
                save_checkpoint(self.checkpoints, step, self.pv, self.optimizer, self.scheduler, self.kl_ctl,
                                self.reward_fn,
                                {"step": step, "epoch": position.epoch, "cursor": position.cursor,
                                 "rng_per_process": rngs, "algorithm": self.algorithm,
                                 "samples_per_prompt": self.samples_per_prompt})
            finally:
                if current is not None:
                    self.reward_fn.load_state_dict(current)
        self.accelerator.wait_for_everyone()
        return path

    def stop(self, start: StepStart, failure: StepFailed) -> NoReturn:
        """Put the trained parameters and the optimizer back to the start of the failed step (when it had
        changed them), save that as the checkpoint of the last completed step, and raise ``PPOError``."""
        if failure.restore and start.parameters is not None:
            with torch.no_grad():
                for n, p in self.pv.named_parameters():
                    if n in start.parameters:
                        p.copy_(start.parameters[n])
            self.optimizer.load_state_dict(start.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        path = self.checkpoint(start.step, start.position, start)
        if failure.restore:
            message = (f"{failure.message}; parameters restored to the start of the step and saved in {path}. "
                       f"{failure.advice}")
        else:
            message = (f"{failure.message}\nA resumable checkpoint of the last completed step is in {path}; "
                       f"{failure.advice}")
        raise PPOError(message) from failure.__cause__
