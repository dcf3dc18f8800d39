"""Reward plugins for the RLHF pipeline.

A reward is ``fn(prompts, responses, **info) -> one float per response`` (see
:mod:`reward.base`). :func:`build_reward` turns a spec (built-in name, dotted path
``package.module:attr``, ``rlhf.rewards`` entry point, or a weighted list of those) into a
:class:`CompositeReward` whose call returns a :class:`RewardResult`.

This package never imports the pipeline: third-party rewards depend on it alone.
"""

from .base import RewardError, RewardFn, call_reward, check_scores
from .normalize import RunningNormalizer
from .registry import (BUILTINS, ENTRY_POINT_GROUP, Component, CompositeReward, RewardResult,
                       build_reward, known_rewards)

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "Component", "CompositeReward", "RewardError",
           "RewardFn", "RewardResult", "RunningNormalizer", "build_reward", "call_reward",
           "check_scores", "known_rewards"]
