"""The PPO run's state (pipeline/rl/ppo_state.py): data position, checkpoint and resume, RNG streams and
putting a failed step back, on a policy built as run_ppo builds it (tiny NF4 model, float32)."""
import random

import pytest
import torch

from pipeline.artifacts.checkpoints import Checkpoints, load_state, rng_state
from pipeline.artifacts.outputs import ArtifactError
from pipeline.config import LoraConfigSection
from pipeline.models import loading, stacking
from pipeline.rl import ppo_math
from pipeline.rl.policy_value import POLICY, PolicyValue
from pipeline.rl.ppo_state import (
    Position,
    PPOError,
    RunState,
    StepFailed,
    check_resumable,
    next_prompts,
    prompt_order,
)


class _OneProcess:
    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self):
        pass


class _Normaliser:
    """A reward with state, as running normalisation has: ``count`` increases on every call."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def _run_state(tiny_model_cfg, root):
    base_model, _, _ = loading.load_base(tiny_model_cfg)
    torch.manual_seed(0)
    section = LoraConfigSection(r=4, alpha=8, dropout=0.0)
    peft_model = stacking.stack_adapters(base_model, {}, trainable=POLICY,
                                         new_adapter=(POLICY, loading.lora_config(section, model=base_model)))
    pv = PolicyValue(peft_model, base_model.config.hidden_size, [POLICY], None)
    trainable = [p for p in pv.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    run = RunState(Checkpoints(root, "ppo"), pv, optimizer, scheduler,
                   ppo_math.make_kl_controller("fixed", 0.05, 6.0, 10000), _Normaliser(), _OneProcess(), "ppo", 1)
    return run, trainable


def _train_once(run, trainable):
    loss = sum((p.float() ** 2).sum() for p in trainable) + run.pv.value_head.weight.sum()
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def test_next_prompts_walks_a_seeded_order_across_epochs():
    # 3 prompts, 2 per step: step 1 takes order(epoch 0)[0:2]; step 2 takes order(0)[2], then order(1)[0].
    o0, o1 = prompt_order(3, seed=7, epoch=0), prompt_order(3, seed=7, epoch=1)
    assert sorted(o0) == [0, 1, 2] and prompt_order(3, 7, 0) == o0  # a permutation, the same every time
    idx, pos = next_prompts(Position(), 3, 2, seed=7)
    assert idx == o0[:2] and pos == Position(0, 2)
    idx, pos = next_prompts(pos, 3, 2, seed=7)
    assert idx == [o0[2], o1[0]] and pos == Position(1, 1)


def test_check_resumable_refuses_another_estimator():
    check_resumable({}, "ckpt", "ppo", 1)  # written before ppo.algorithm existed: PPO, one sample per prompt
    check_resumable({"algorithm": "rloo", "samples_per_prompt": 4}, "ckpt", "rloo", 4)
    with pytest.raises(ArtifactError, match="ppo.algorithm=ppo, ppo.samples_per_prompt=1; this config has rloo and 4"):
        check_resumable({}, "ckpt", "rloo", 4)


def test_checkpoint_then_resume_restores_every_part_exactly(tiny_model_cfg, tmp_path):
    run, trainable = _run_state(tiny_model_cfg, tmp_path / "a")
    _train_once(run, trainable)
    run.reward_fn.count = 5
    random.seed(3)
    torch.manual_seed(3)
    path = run.checkpoint(1, Position(2, 9))
    want_params = run.pv.trainable_state()
    want_draw = torch.rand(4)  # what the run draws next after the checkpoint

    other, other_trainable = _run_state(tiny_model_cfg, tmp_path / "b")
    assert not torch.equal(other.pv.value_head.weight, run.pv.value_head.weight)
    step, position = other.resume(path, load_state(path))
    assert (step, position) == (1, Position(2, 9))
    got = other.pv.trainable_state()
    assert got.keys() == want_params.keys() and all(torch.equal(got[k], want_params[k]) for k in got)
    assert other.reward_fn.count == 5
    assert torch.equal(torch.rand(4), want_draw)  # the RNG stream continues where it was saved
    # the optimizer state came back: one more identical update gives identical parameters
    _train_once(run, trainable)
    _train_once(other, other_trainable)
    after_a, after_b = run.pv.trainable_state(), other.pv.trainable_state()
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)


def test_stop_restores_the_step_start_and_saves_what_redoes_it(tiny_model_cfg, tmp_path):
    run, trainable = _run_state(tiny_model_cfg, tmp_path)
    torch.manual_seed(11)
    start = run.begin_step(4, Position(0, 3))
    rng_at_start = rng_state()["torch"]
    run.reward_fn.count = 1  # the step's reward call moved the normaliser
    torch.rand(5)  # and the rollout drew random numbers
    run.begin_update(start)
    before = run.pv.trainable_state()
    _train_once(run, trainable)
    assert not torch.equal(run.pv.value_head.weight, before["value_head.weight"])
    with pytest.raises(PPOError) as ei:
        run.stop(start, StepFailed("step 5, PPO epoch 1: loss is nan", "Lower it.", restore=True))
    path = tmp_path / "step-000004"
    assert str(ei.value) == (f"step 5, PPO epoch 1: loss is nan; parameters restored to the start of the step "
                             f"and saved in {path}. Lower it.")
    now = run.pv.trainable_state()
    assert all(torch.equal(now[k], before[k]) for k in now)
    assert not run.optimizer.state  # the optimizer is back to before its first step
    saved = load_state(path)
    assert (saved["step"], saved["epoch"], saved["cursor"]) == (4, 0, 3)
    assert saved["reward"] == {"count": 0}  # the normaliser as the step found it
    assert torch.equal(saved["rng_per_process"][0]["torch"], rng_at_start)
    assert run.reward_fn.count == 1  # the live normaliser is left as it is


def test_a_reward_failure_keeps_its_cause_and_restores_nothing(tiny_model_cfg, tmp_path):
    run, trainable = _run_state(tiny_model_cfg, tmp_path)
    start = run.begin_step(0, Position())
    cause = ValueError("row 3 is NaN")
    try:
        raise StepFailed("step 1: row 3 is NaN", "fix the reward and run again with --resume.") from cause
    except StepFailed as failure:
        with pytest.raises(PPOError) as ei:
            run.stop(start, failure)
    assert ei.value.__cause__ is cause
    assert str(ei.value) == ("step 1: row 3 is NaN\nA resumable checkpoint of the last completed step is in "
                             f"{tmp_path / 'step-000000'}; fix the reward and run again with --resume.")
