"""The reward contract, its error type, and the checked call every host goes through.

A reward is any callable

    fn(prompts: list[str], responses: list[str], **info) -> sequence of float

returning one finite float per response, as a list, tuple, 1-D numpy array or 1-D tensor.
``info`` may carry ``prompt_ids`` and ``response_ids`` (lists of token-id lists) and the
``tokenizer``. A reward either accepts ``**info`` or names only the keys it uses as keyword
parameters; keys it does not name are not passed to it, so ``def f(prompts, responses)`` is a
valid reward.

Nothing here ever turns a failure into a zero score: a reward that raises, hangs past its
timeout, or returns the wrong count, a non-number, NaN or inf raises :class:`RewardError`
naming the reward and, where there is one, the first offending row.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["RewardError", "RewardFn", "call_reward", "check_scores"]

RewardFn = Callable[..., Any]
"""``fn(prompts, responses, **info) -> sequence of float`` (see the module docstring)."""

_SNIPPET = 60


def _snippet(text: str) -> str:
    return repr(text[:_SNIPPET]) + ("..." if len(text) > _SNIPPET else "")


class RewardError(Exception):
    """A reward could not be built, failed, or returned unusable scores.

    Attributes:
        reward: the reward's name (its component id inside a composite).
        row: index of the first offending response, or None when the failure is not tied to
            one row (an exception, a timeout, a wrong count, a build error).
        detail: the message without the ``reward '<name>':`` prefix.

    ``str(err)`` reads e.g. ``reward 'length': row 3 returned nan (prompt: 'Tell me...')``.
    """

    def __init__(self, reward: str, detail: str, row: int | None = None,
                 prompt: str | None = None):
        self.reward = reward
        self.row = row
        self.detail = detail
        self.prompt = prompt
        where = f"row {row} " if row is not None else ""
        context = f" (prompt: {_snippet(prompt)})" if prompt is not None else ""
        super().__init__(f"reward {reward!r}: {where}{detail}{context}")

    def __reduce__(self):
        # Exceptions pickle as cls(*self.args); ours has a different constructor signature,
        # and hosts may carry errors across process boundaries.
        return (type(self), (self.reward, self.detail, self.row, self.prompt))


def _as_list(name: str, scores: Any) -> list:
    if hasattr(scores, "ndim") and hasattr(scores, "tolist"):  # numpy array or torch tensor
        if scores.ndim != 1:
            shape = tuple(getattr(scores, "shape", ()))
            raise RewardError(name, f"returned an array of shape {shape}; expected a 1-D "
                                    "sequence with one score per response")
        return scores.tolist()
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Iterable):
        raise RewardError(name, f"returned {type(scores).__name__}; expected a sequence "
                                "with one score per response")
    return list(scores)


def check_scores(name: str, scores: Any, n: int, prompts: Sequence[str] | None = None
                 ) -> list[float]:
    """Convert a reward's output to ``list[float]`` and validate it.

    Args:
        name: the reward's name, used in error messages.
        scores: what the reward returned (list, tuple, 1-D numpy array or tensor, iterable).
        n: the expected number of scores (the number of responses).
        prompts: the batch's prompts; when given, row errors quote the offending prompt.

    Raises:
        RewardError: wrong count (``row`` is None), a non-numeric value, NaN or inf
            (``row`` is the first offending index).
    """
    values = _as_list(name, scores)
    if len(values) != n:
        raise RewardError(name, f"returned {len(values)} scores for {n} responses")
    out = []
    for row, value in enumerate(values):
        prompt = prompts[row] if prompts is not None else None
        try:
            if isinstance(value, (str, bytes)):  # float("1.5") works, but is a reward bug
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(name, f"returned a non-numeric {type(value).__name__} "
                                    f"{repr(value)[:40]}", row, prompt) from None
        if not math.isfinite(number):
            raise RewardError(name, f"returned {number}", row, prompt)
        out.append(number)
    return out


def _accepted_info(fn: RewardFn, info: dict) -> dict:
    """The subset of ``info`` that ``fn`` accepts (all of it if fn takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return info
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return info
    names = {p.name for p in params
             if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in info.items() if k in names}


def _run_with_timeout(name: str, fn: RewardFn, args: tuple, kwargs: dict, timeout: float):
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    # A daemon thread: Python cannot kill a thread, so a hung reward is abandoned rather than
    # allowed to block interpreter exit.
    worker = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(name, f"timed out after {timeout:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def call_reward(name: str, fn: RewardFn, prompts: Sequence[str], responses: Sequence[str],
                timeout: float | None = None, **info) -> list[float]:
    """Call one reward and return its validated scores.

    Args:
        name: the reward's name, used in every error message.
        fn: the reward callable.
        prompts, responses: the batch; must have the same length.
        timeout: seconds; when set the reward runs in a worker thread and a call that does not
            finish in time raises RewardError (the thread is abandoned, not killed).
        **info: passed to the reward (only the keys it accepts, see the module docstring).

    Raises:
        RewardError: timeout, an exception inside the reward (chained as ``__cause__``, its
            message repeated), or invalid scores (see :func:`check_scores`).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    kwargs = _accepted_info(fn, info)
    try:
        if timeout is None:
            scores = fn(prompts, responses, **kwargs)
        else:
            scores = _run_with_timeout(name, fn, (prompts, responses), kwargs, timeout)
    except RewardError as exc:
        if exc.reward == name:
            raise
        raise RewardError(name, f"raised {exc}") from exc
    except Exception as exc:
        raise RewardError(name, f"raised {type(exc).__name__}: {exc}") from exc
    return check_scores(name, scores, len(responses), prompts)
