"""Built-in ``reward_model``: a trained reward model, loaded by the host program.

The layout of a trained reward model (adapter, score head, manifest) belongs to the pipeline,
and this package never imports the pipeline. The host passes a loader in the build context
instead: ``context["load_reward_model"](path, **args)`` returns a reward callable.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["reward_model"]


def reward_model(path: str, context: Mapping | None = None, **args):
    """A trained reward model, loaded by the rlhf host's ``context["load_reward_model"]``."""
    loader = (context or {}).get("load_reward_model")
    if not callable(loader):
        raise ValueError(
            f"the reward_model plugin needs the rlhf host to load the reward model at {path!r}: "
            "run it through `rlhf score` or `rlhf ppo`, or pass "
            "context={'load_reward_model': fn} to build_reward")
    return loader(path, **args)
