"""Find rewards by name and combine them: ``build_reward(spec) -> CompositeReward``.

Spec format (YAML-friendly):

* a string: ``"sentiment"``, a dotted path ``"my_pkg.rewards:toxicity"``, or an entry-point
  name; the same as ``{"name": <string>}``;
* a dict::

      name: str                # required (a callable is accepted too, from Python)
      weight: float            # default 1.0; 0 logs the component without adding it to total
      args: dict               # default {}; passed to the reward's factory, see below
      normalize: {kind: running | none, clip: float | null}   # default: none
      id: str                  # display/log name, default `name` (`name_2`, ... if repeated)
      timeout: float           # seconds per call, default none (see call_reward)

* a list of specs: a weighted composite; also written
  ``{"name": "composite", "args": {"components": [...]}}``.

``name`` is resolved in this order:

1. a built-in short name (:data:`BUILTINS`); the built-in factory is called with ``args``;
2. a dotted path ``package.module:attr`` (``attr`` may be dotted, ``Class.method``);
3. an entry point named ``name`` in the group ``rlhf.rewards`` (:data:`ENTRY_POINT_GROUP`), so an
   installed package can register ``shout = my_pkg.rewards:shout`` under
   ``[project.entry-points."rlhf.rewards"]``.

A dotted-path or entry-point target that is a class is instantiated with ``args`` as keyword
arguments; a function is the reward itself, with ``args`` (if any) bound as keyword arguments.
A factory (built-in or class) whose signature has a ``context`` parameter also receives the
host's ``context`` dict (e.g. ``reward_model`` uses ``context["load_reward_model"]``).

Every failure to build, including an unknown name, raises :class:`~reward.base.RewardError`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .base import RewardError, RewardFn, call_reward
from .classifier import ClassifierReward
from .host import reward_model
from .normalize import RunningNormalizer
from .remote import HttpReward
from .text import KeywordReward, LengthReward, RegexReward, RepetitionReward, SentimentReward

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "Component", "CompositeReward", "RewardResult",
           "build_reward", "component_ids", "known_rewards"]

ENTRY_POINT_GROUP = "rlhf.rewards"

BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "sentiment": SentimentReward,
    "length": LengthReward,
    "regex": RegexReward,
    "keyword": KeywordReward,
    "repetition": RepetitionReward,
    "classifier": ClassifierReward,
    "http": HttpReward,
    "reward_model": reward_model,
}
"""Built-in short name -> factory, called with the spec's ``args``."""

_COMPOSITE = "composite"
_SPEC_KEYS = ("name", "weight", "args", "normalize", "id", "timeout")
_NORMALIZE_KEYS = ("kind", "clip")


@dataclass
class RewardResult:
    """Scores of one batch.

    Attributes:
        total: per response, ``sum_i weight_i * normalized_i`` (the score PPO uses).
        components: component id -> raw scores, as the reward returned them (for logging).
        weighted: component id -> ``weight * normalized`` scores; they sum to ``total``.
        details: ``"<component id>/<key>"`` -> per-response values a component reports about its
            own scores through an optional ``details()`` method (read right after each call), e.g. a
            reward-model ensemble's members and their disagreement; logged, never added to total.
    """

    total: list[float]
    components: dict[str, list[float]]
    weighted: dict[str, list[float]]
    details: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Component:
    """One reward inside a :class:`CompositeReward`."""

    id: str
    name: str
    fn: RewardFn
    weight: float = 1.0
    normalizer: RunningNormalizer | None = None
    timeout: float | None = None


class CompositeReward:
    """A weighted sum of rewards; what :func:`build_reward` returns, even for one reward.

    Calling it scores a batch with every component (each through
    :func:`~reward.base.call_reward` under its id, so errors name the component) and returns a
    :class:`RewardResult`.

    Attributes:
        names: component ids, in order (the keys of ``RewardResult.components``).
        weights: component weights, in order.
    """

    def __init__(self, components: Sequence[Component]):
        if not components:
            raise ValueError("a composite reward needs at least one component")
        ids = [c.id for c in components]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate component ids {duplicates}")
        self.components = list(components)

    @property
    def names(self) -> list[str]:
        return [c.id for c in self.components]

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.components]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **info) -> RewardResult:
        """Score the batch; ``info`` (prompt_ids, response_ids, tokenizer) goes to each reward."""
        raw: dict[str, list[float]] = {}
        weighted: dict[str, list[float]] = {}
        details: dict[str, list[float]] = {}
        for c in self.components:
            scores = call_reward(c.id, c.fn, prompts, responses, timeout=c.timeout, **info)
            raw[c.id] = scores
            report = getattr(c.fn, "details", None)
            if callable(report):
                details.update({f"{c.id}/{k}": [float(x) for x in v] for k, v in report().items()})
            shaped = c.normalizer(scores) if c.normalizer is not None else scores
            weighted[c.id] = [c.weight * s for s in shaped]
        total = [math.fsum(column) for column in zip(*weighted.values())]
        return RewardResult(total=total, components=raw, weighted=weighted, details=details)

    def state_dict(self) -> dict:
        """Running-normaliser statistics by component id (for checkpoints)."""
        return {c.id: c.normalizer.state_dict()
                for c in self.components if c.normalizer is not None}

    def load_state_dict(self, state: Mapping) -> None:
        expected = {c.id for c in self.components if c.normalizer is not None}
        if set(state) != expected:
            raise KeyError(f"reward state has normalizers for {sorted(state)}, but this "
                           f"reward normalizes {sorted(expected)}")
        for c in self.components:
            if c.normalizer is not None:
                c.normalizer.load_state_dict(state[c.id])

    def __repr__(self) -> str:
        parts = [f"{c.id}*{c.weight:g}" + ("[running]" if c.normalizer is not None else "")
                 for c in self.components]
        return f"CompositeReward({', '.join(parts)})"


def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        same_name = found.setdefault(ep.name, [])
        # The same distribution can be visible twice through sys.path; only distinct
        # targets are a real conflict.
        if all(other.value != ep.value for other in same_name):
            same_name.append(ep)
    return found


def known_rewards() -> dict[str, str]:
    """Short name -> one-line description, for built-ins and installed entry points."""
    known = {name: "built-in: " + (inspect.getdoc(factory) or "").split("\n")[0]
             for name, factory in BUILTINS.items()}
    known[_COMPOSITE] = "built-in: weighted sum of component rewards (a list of specs)"
    for name, eps in _entry_points().items():
        if name not in known:
            sources = "; ".join(f"{ep.value} from {ep.dist.name if ep.dist else '?'}"
                                for ep in eps)
            known[name] = f"entry point: {sources}"
    return known


def _unknown_name_message(name: str) -> str:
    builtins = sorted([*BUILTINS, _COMPOSITE])
    plugins = sorted(set(_entry_points()) - set(builtins))
    hint = ""
    if "." in name and ":" not in name:
        module, _, attr = name.rpartition(".")
        hint = f" Did you mean the dotted path '{module}:{attr}'?"
    return (f"unknown reward name.{hint} Built-in: {', '.join(builtins)}. "
            f"Entry points ({ENTRY_POINT_GROUP}): {', '.join(plugins) or 'none installed'}. "
            "For your own code use a dotted path 'package.module:function' (a class there is "
            "instantiated with args), or register it in the "
            f"'{ENTRY_POINT_GROUP}' entry-point group of an installed package.")


def _import_dotted(cid: str, path: str):
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise RewardError(cid, f"dotted path {path!r} must look like 'package.module:attr'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise RewardError(cid, f"cannot import module {module_name!r} of dotted path {path!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise RewardError(cid, f"dotted path {path!r}: {type(obj).__name__} "
                                   f"{getattr(obj, '__name__', obj)!r} has no attribute "
                                   f"{attr!r}") from None
    return obj


def _load_entry_point(cid: str, name: str):
    eps = _entry_points().get(name)
    if not eps:
        raise RewardError(cid, _unknown_name_message(name))
    if len(eps) > 1:
        raise RewardError(cid, f"entry point {name!r} in {ENTRY_POINT_GROUP!r} is registered by "
                               f"several packages: {[ep.value for ep in eps]}; use a dotted path")
    try:
        return eps[0].load()
    except Exception as exc:
        raise RewardError(cid, f"cannot load entry point {name!r} ({eps[0].value}): "
                               f"{type(exc).__name__}: {exc}") from exc


def _accepts_context(factory) -> bool:
    try:
        return "context" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _make(cid: str, name, args: dict, context: dict | None) -> RewardFn:
    """Resolve ``name`` and build the reward callable from it and ``args``."""
    if callable(name):
        target, factory = name, False
    elif name in BUILTINS:
        target, factory = BUILTINS[name], True
    elif ":" in name:
        target, factory = _import_dotted(cid, name), False
    else:
        target, factory = _load_entry_point(cid, name), False
    factory = factory or inspect.isclass(target)
    if not callable(target):
        raise RewardError(cid, f"{name!r} resolved to a non-callable {type(target).__name__}")
    try:
        if factory:
            extra = {"context": context} if _accepts_context(target) else {}
            fn = target(**args, **extra)
        else:
            fn = functools.partial(target, **args) if args else target
    except Exception as exc:
        raise RewardError(cid, f"cannot build it: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise RewardError(cid, f"{name!r} built a non-callable {type(fn).__name__}")
    return fn


def _display_name(name) -> str:
    return name if isinstance(name, str) else getattr(name, "__name__", type(name).__name__)


def _normalizer(cid: str, spec) -> RunningNormalizer | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise RewardError(cid, f"normalize must be a mapping with keys {list(_NORMALIZE_KEYS)}, "
                               f"got {spec!r}")
    unknown = sorted(set(spec) - set(_NORMALIZE_KEYS))
    if unknown:
        raise RewardError(cid, f"unknown normalize keys {unknown}; valid: {list(_NORMALIZE_KEYS)}")
    kind = spec.get("kind")
    if kind == "none":
        return None
    if kind != "running":
        raise RewardError(cid, f"normalize.kind must be 'running' or 'none', got {kind!r}")
    try:
        return RunningNormalizer(clip=spec.get("clip"))
    except (TypeError, ValueError) as exc:
        raise RewardError(cid, f"normalize: {exc}") from exc


def _number(cid: str, key: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive" if positive else "a finite"
        raise RewardError(cid, f"{key} must be {kind} number, got {value!r}")
    return float(value)


def _as_dict(spec) -> dict:
    if isinstance(spec, str) or callable(spec):
        return {"name": spec}
    if isinstance(spec, Mapping):
        return dict(spec)
    raise RewardError(repr(spec)[:40], "a reward spec must be a name, a dict with 'name', or a "
                                       f"list of specs; got {type(spec).__name__}")


def _components(spec) -> list:
    """The list of component specs that ``spec`` stands for."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    spec = _as_dict(spec)
    if spec.get("name") != _COMPOSITE:
        return [spec]
    extra = sorted(set(spec) - {"name", "args"})
    args = spec.get("args")
    if extra or not isinstance(args, Mapping) or set(args) != {"components"}:
        raise RewardError(_COMPOSITE, "write a composite as {'name': 'composite', 'args': "
                                      "{'components': [spec, ...]}} (weights, normalize and ids "
                                      "go on the components)")
    return list(args["components"])


def _component(spec: dict, cid: str, context: dict | None) -> Component:
    name = spec.get("name")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise RewardError(cid, f"unknown spec keys {unknown}; valid: {list(_SPEC_KEYS)}")
    if not (isinstance(name, str) and name) and not callable(name):
        raise RewardError(cid, f"spec needs a 'name' (a string or a callable), got {name!r}")
    if name == _COMPOSITE:
        raise RewardError(cid, "a composite cannot be a component of another composite; list "
                               "all components in one list")
    args = spec.get("args") or {}
    if not isinstance(args, Mapping):
        raise RewardError(cid, f"args must be a mapping, got {type(args).__name__}")
    timeout = spec.get("timeout")
    return Component(
        id=cid,
        name=_display_name(name),
        fn=_make(cid, name, dict(args), context),
        weight=_number(cid, "weight", spec.get("weight", 1.0)),
        normalizer=_normalizer(cid, spec.get("normalize")),
        timeout=None if timeout is None else _number(cid, "timeout", timeout, positive=True),
    )


def component_ids(specs: Sequence) -> list[str]:
    """The component ids :func:`build_reward` gives a list of specs (strings or dicts), without building
    anything: what a host logs each component under."""
    return _assign_ids([s if isinstance(s, Mapping) else {"name": s} for s in specs])


def _assign_ids(specs: list[dict]) -> list[str]:
    """Explicit ids as given (must be unique); others default to name, then name_2, name_3..."""
    explicit = [s["id"] for s in specs if s.get("id") is not None]
    for cid in explicit:
        if not isinstance(cid, str) or not cid:
            raise RewardError(str(cid), "a component id must be a non-empty string")
        if explicit.count(cid) > 1:
            raise RewardError(cid, "two components share this id")
    taken = set(explicit)
    ids = []
    for s in specs:
        cid = s.get("id")
        if cid is None:
            base = _display_name(s.get("name")) if s.get("name") is not None else "?"
            cid, k = base, 1
            while cid in taken:
                k += 1
                cid = f"{base}_{k}"
            taken.add(cid)
        ids.append(cid)
    return ids


def build_reward(spec, context: dict | None = None) -> CompositeReward:
    """Build the reward described by ``spec`` (see the module docstring for the format).

    Args:
        spec: a name, a dict, a callable, or a list of those.
        context: services from the host program, passed to factories that take ``context``
            (``load_reward_model`` for the ``reward_model`` built-in).

    Returns:
        A :class:`CompositeReward`, also for a single reward.

    Raises:
        RewardError: unknown name (the message lists the known ones), import errors, bad
            args or spec keys; the error's ``reward`` is the component id.
    """
    specs = [_as_dict(s) for s in _components(spec)]
    if not specs:
        raise RewardError(_COMPOSITE, "the reward spec is an empty list")
    ids = _assign_ids(specs)
    return CompositeReward([_component(s, cid, context) for s, cid in zip(specs, ids)])
