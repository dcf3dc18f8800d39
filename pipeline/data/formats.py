"""What a row means: one adapter per data format turning a raw row (a dict, after the column map) into
the canonical rows the stages use, and the field validation they share (chat messages, Anthropic-HH
transcripts, prompts, replies). Where rows come from, and the loading loop, are in pipeline/data/loaders.py.

Canonical rows
    SFT      ``{"messages": [... ending with an assistant turn]}``
    pairs    ``{"prompt": [... ending with a user turn], "chosen": [assistant message],
             "rejected": [assistant message]}``
    prompts  ``{"prompt": [... ending with a user turn]}``

Formats, detected per row from its columns in this order (``data.format`` forces one)
    SFT    ``messages`` (chat messages); ``sharegpt`` (``conversations`` of ``{"from": human|gpt|system,
           "value"}``); ``prompt_completion``; ``alpaca`` (``instruction``, optional ``input``,
           ``output``: one user turn, instruction and input joined by a blank line); ``hh`` (``text``,
           an Anthropic-HH transcript).
    pairs  ``chosen_rejected`` (explicit ``prompt`` or a prompt shared by two conversations, HH
           included); ``response_pair`` (``prompt``, ``response_0``, ``response_1``,
           ``better_response_id``: the PKU-SafeRLHF layout); ``ranked`` (``prompt`` + ``completions``
           of ``{"response", "rank"}``, rank 1 the best: Nectar's ``answers`` of ``{"answer", "rank"}``
           read as-is); ``scored`` (``prompt`` + ``completions`` of ``{"response", "score"}``:
           UltraFeedback's ``instruction`` + ``completions`` with ``overall_score`` read as-is; or one
           ``prompt``, ``response``, ``score`` per row, grouped by prompt: HelpSteer's ``helpfulness``
           read as the score).
    prompts are always detected: ``prompt``, ``messages``, ``conversations``, ``instruction`` (+
           ``input``), ``text``, ``chosen`` (a conversation or HH transcript: the turns before its reply).

Consecutive turns of one role (an HH transcript where an inline "Human:" split a turn so that two
``Assistant:`` turns meet, a ShareGPT export or chat list with two ``gpt`` turns in a row) are joined
into one turn, their texts separated by a blank line; ``joined_turns`` counts the rows this changed
(the loader reports them per source).

Empty replies are valid in preference pairs (a preferred non-answer is real data; the loader counts
them); an empty SFT target raises ``EmptyTarget``.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

ROLES = ("system", "user", "assistant")
PAIRS_FROM = ("best_worst", "all")
# Keys looked up inside the objects of a `completions` list; the column map renames them there too.
NESTED_COLUMNS = ("response", "score", "rank")
# Names other layouts use for a canonical column, tried in order after the canonical name itself.
ALIASES = {"completions": ("answers",), "response": ("answer",), "score": ("overall_score", "helpfulness")}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}

_HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_HUMAN = re.compile(r"(?:\A\s*|\n\n)Human:")


# The loader's count of joined turns in the row being converted: the parsers that join sit several calls
# below the format adapters, which return canonical rows only.
_JOINS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("joined_turns", default=None)


@contextlib.contextmanager
def joined_turns():
    """Count, in the yielded one-item list, the turns joined to the turn before them inside the block."""
    count = [0]
    token = _JOINS.set(count)
    try:
        yield count
    finally:
        _JOINS.reset(token)


def join_same_role(messages: list[dict]) -> list[dict]:
    """``messages`` with each run of consecutive same-role turns joined into one (texts separated by a
    blank line; an empty one, such as an open final reply, adds nothing)."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            parts = [p for p in (out[-1]["content"], m["content"]) if p.strip()]
            out[-1] = {"role": m["role"], "content": "\n\n".join(parts)}
            count = _JOINS.get()
            if count is not None:
                count[0] += 1
        else:
            out.append(m)
    return out


class RowProblem(Exception):
    """One invalid row; the loader adds the source and the row number."""


class EmptyTarget(RowProblem):
    """An SFT row whose assistant reply, the text it would train on, is empty."""


@dataclass(frozen=True)
class RowContext:
    """What an adapter needs besides the row: how cells are encoded and the pairing settings."""
    from_csv: bool = False
    system: Optional[str] = None
    # canonical -> the name used inside nested objects (only NESTED_COLUMNS entries matter)
    columns: dict = field(default_factory=dict)
    pairs_from: str = "best_worst"
    score_margin: float = 0.0


@dataclass
class Group:
    """One scored response of a one-response-per-row layout; the loader groups them by prompt."""
    prompt: list[dict]
    reply: list[dict]
    score: float

    @property
    def key(self) -> str:
        return json.dumps(self.prompt, sort_keys=True)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "sft" or "pairs"
    columns: str  # the columns it reads, for error messages
    detect: Callable[[dict, RowContext], bool]
    convert: Callable[[dict, RowContext], Union[list[dict], Group]]


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "text", dict: "object", list: "list", bool: "bool", int: "int", float: "float"}.get(
        type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Field validation


def parse_hh(text: str, keep_open_reply: bool = False) -> list[dict]:
    """Parse an Anthropic-HH transcript into canonical messages; raises ``ValueError`` naming the problem.

    ``"\\n\\nHuman: Hi\\n\\nAssistant: Hello!"`` -> ``[{"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"}]``. Turn markers are ``Human:``/``Assistant:`` at the
    start of the text or after a blank line; each turn's text is stripped. The transcript must start
    with ``Human:``; consecutive turns of one speaker are joined (``join_same_role``). An empty final
    ``Assistant:`` (the cue that ends HH prompts) is
    dropped, or with ``keep_open_reply`` returned as an empty assistant message (an empty response in
    a preference pair); any other empty turn is an error.
    """
    if not isinstance(text, str):
        raise ValueError(f"HH transcript must be text, got {type_name(text)}")
    marks = list(_HH_MARKER.finditer(text))
    if not any(m.group(1) == "Human" for m in marks):
        raise ValueError("HH transcript has no 'Human:' turn")
    if text[:marks[0].start()].strip():
        raise ValueError("HH transcript has text before its first turn marker")
    if marks[0].group(1) != "Human":
        raise ValueError("HH transcript must start with 'Human:' (it starts with 'Assistant:')")
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        turns.append((m.group(1), text[m.end():end].strip()))
    open_reply = turns[-1] == ("Assistant", "") and len(turns) > 1
    if open_reply:
        turns.pop()
    messages = []
    for i, (speaker, content) in enumerate(turns, 1):
        if not content:
            raise ValueError(f"HH transcript turn {i} ('{speaker}:') is empty")
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content})
    messages = join_same_role(messages)
    if open_reply and keep_open_reply:
        messages.append({"role": "assistant", "content": ""})
    return messages


def looks_hh(text: str) -> bool:
    return bool(_HH_HUMAN.search(text))


def _hh(text: str, name: str, keep_open_reply: bool = False) -> list[dict]:
    try:
        return parse_hh(text, keep_open_reply)
    except ValueError as e:
        raise RowProblem(f"{name}: {e}") from None


def _get(row: dict, name: str) -> Any:
    if name not in row:
        raise RowProblem(f"missing column '{name}'")
    if row[name] is None:
        raise RowProblem(f"{name}: value is null")
    return row[name]


def _require_text(value: str, name: str) -> str:
    if not value.strip():
        raise RowProblem(f"{name}: empty text")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{name}: expected text, got {type_name(value)}")
    return value


def _json_list(value: str) -> Optional[list]:
    if not value.lstrip().startswith("["):
        return None
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded) else None


def _decoded_list(value: Any, name: str, from_csv: bool, of: str = "objects") -> list:
    """A non-empty list cell (of ``of``, for the messages); CSV cells hold it JSON-encoded."""
    if from_csv and isinstance(value, str):
        decoded = _json_list(value)
        if decoded is None:
            raise RowProblem(f"{name}: expected a JSON list of {of}, got text that is not one")
        value = decoded
    if not isinstance(value, list):
        raise RowProblem(f"{name}: expected a list of {of}, got {type_name(value)}")
    if not value:
        raise RowProblem(f"{name}: empty list of {of}")
    return value


def _messages(value: Any, name: str, from_csv: bool = False, empty_last_ok: bool = False) -> list[dict]:
    """Canonical messages from a message list; ``empty_last_ok`` lets a final assistant turn be empty."""
    value = _decoded_list(value, name, from_csv, "messages")
    pre = "" if name == "messages" else f"{name}: "
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise RowProblem(f"{pre}message {i} is not an object (got {type_name(m)})")
        role = m.get("role")
        if role is None:
            raise RowProblem(f"{pre}message {i} has no role")
        if not isinstance(role, str):
            raise RowProblem(f"{pre}message {i} role must be text, got {type_name(role)}")
        if role not in ROLES:
            raise RowProblem(f"{pre}message {i} has unknown role {role!r} (expected {', '.join(ROLES)})")
        content = m.get("content")
        if content is None:
            raise RowProblem(f"{pre}message {i} has no content")
        if not isinstance(content, str):
            raise RowProblem(f"{pre}message {i} content must be text, got {type_name(content)}")
        if not content.strip() and not (empty_last_ok and i == len(value) and role == "assistant"):
            raise RowProblem(f"{pre}message {i} ({role}) has empty content")
        if role == "system" and i > 1:
            raise RowProblem(f"{pre}message {i} is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    return join_same_role(out)


def _text_or_messages(value: Any, name: str, from_csv: bool, empty_ok: bool = False) -> Any:
    """Text (non-empty unless ``empty_ok``) or a message list (a final assistant turn may then be empty)."""
    if isinstance(value, str):
        if from_csv:
            decoded = _json_list(value)
            if decoded is not None:
                return _messages(decoded, name, empty_last_ok=empty_ok)
        return value if empty_ok else _require_text(value, name)
    if isinstance(value, list):
        return _messages(value, name, empty_last_ok=empty_ok)
    raise RowProblem(f"{name}: expected text or a list of messages, got {type_name(value)}")


def _prompt(value: Any, name: str, from_csv: bool, drop_replies: bool = False,
            text_ok: bool = True) -> list[dict]:
    """Messages ending with a user turn, from text (plain or HH) or a message list (``text_ok=False``:
    a message list only). With ``drop_replies``, trailing assistant turns (an empty one included) go."""
    if text_ok and isinstance(value, str) and not (from_csv and _json_list(value) is not None):
        text = _require_text(value, name)
        msgs = _hh(text, name) if looks_hh(text) else [{"role": "user", "content": text}]
    elif not text_ok or isinstance(value, (list, str)):
        msgs = _messages(value, name, from_csv, empty_last_ok=drop_replies)
    else:
        raise RowProblem(f"{name}: expected text or a list of messages, got {type_name(value)}")
    if drop_replies:
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or not any(m["role"] == "user" for m in msgs):
            raise RowProblem(f"{name}: has no user turn")
    if msgs[-1]["role"] != "user":
        raise RowProblem(f"{name}: must end with a user turn (the last is '{msgs[-1]['role']}')")
    return msgs


def _same_turns(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _reply(value: Any, name: str, prompt: list[dict], from_csv: bool) -> list[dict]:
    """One assistant message (possibly empty), from text, a message list, or a conversation repeating ``prompt``."""
    value = _text_or_messages(value, name, from_csv, empty_ok=True)
    if isinstance(value, str):
        if not looks_hh(value):
            marks = list(_HH_MARKER.finditer(value))
            if len(marks) == 1 and marks[0].start() == 0 and marks[0].group(1) == "Assistant":
                value = value[marks[0].end():].strip()
            return [{"role": "assistant", "content": value}]
        value = _hh(value, name, keep_open_reply=True)
    # System messages are compared away: a prompt may carry one that the conversation repeats or not.
    convo = [m for m in value if m["role"] != "system"]
    turns = [m for m in prompt if m["role"] != "system"]
    if convo and convo[0]["role"] != "assistant":
        if not _same_turns(convo[:len(turns)], turns):
            raise RowProblem(f"{name}: conversation does not start with the prompt")
        convo = convo[len(turns):]
    if len(convo) != 1 or convo[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in convo) or "nothing"
        raise RowProblem(f"{name}: expected one assistant reply after the prompt, got {roles}")
    return convo


def _with_system(msgs: list[dict], system: Optional[str]) -> list[dict]:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}] + msgs
    return msgs


def _missing(row: dict, expected: str) -> RowProblem:
    names = ", ".join(sorted(map(str, row))[:10]) or "none"
    return RowProblem(f"missing column: expected {expected} (the row has: {names})")


def _number(value: Any, name: str, text_ok: bool) -> float:
    """A finite number; CSV cells (``text_ok``) may hold it as text."""
    if isinstance(value, str) and text_ok:
        try:
            value = float(value)
        except ValueError:
            raise RowProblem(f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(f"{name}: expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise RowProblem(f"{name}: expected a finite number, got {value}")
    return float(value)


def _target(msgs: list[dict], where: str) -> list[dict]:
    """An SFT conversation, refused when its final assistant turn (the training target) is empty."""
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"].strip():
        raise EmptyTarget(f"empty SFT target: {where} is empty, so the row has nothing to train on")
    return msgs


# ---------------------------------------------------------------------------------------------
# SFT formats


def _sft_messages(row: dict, ctx: RowContext) -> list[dict]:
    msgs = _messages(_get(row, "messages"), "messages", ctx.from_csv, empty_last_ok=True)
    if msgs[-1]["role"] != "assistant":
        raise RowProblem(f"conversation must end with an assistant turn "
                         f"(message {len(msgs)} is '{msgs[-1]['role']}')")
    return _target(msgs, f"message {len(msgs)} (the final assistant turn)")


def _sharegpt(value: Any, from_csv: bool) -> list[dict]:
    """ShareGPT ``[{"from": "human"|"gpt"|"system", "value": text}, ...]`` as canonical messages
    (``user``/``assistant`` are accepted for ``from`` too); a final ``gpt`` turn may be empty."""
    turns = _decoded_list(value, "conversations", from_csv, "turns")
    msgs = []
    for i, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise RowProblem(f"conversations: turn {i} is not an object (got {type_name(t)})")
        who, text = t.get("from"), t.get("value")
        if who not in _SHAREGPT_ROLES:
            raise RowProblem(f"conversations: turn {i} has unknown 'from' {who!r} (expected human, gpt, system)")
        if not isinstance(text, str):
            raise RowProblem(f"conversations: turn {i} 'value' must be text, got {type_name(text)}")
        msgs.append({"role": _SHAREGPT_ROLES[who], "content": text})
    return _messages(msgs, "conversations", empty_last_ok=True)


def _sft_sharegpt(row: dict, ctx: RowContext) -> list[dict]:
    msgs = _sharegpt(_get(row, "conversations"), ctx.from_csv)
    if msgs[-1]["role"] != "assistant":
        raise RowProblem(f"conversations: must end with a 'gpt' turn (turn {len(msgs)} is "
                         f"'{msgs[-1]['role']}')")
    return _target(msgs, f"conversations turn {len(msgs)} (the final 'gpt' turn)")


def _sft_prompt_completion(row: dict, ctx: RowContext) -> list[dict]:
    prompt = _prompt(_get(row, "prompt"), "prompt", ctx.from_csv)
    return _target(prompt + _reply(_get(row, "completion"), "completion", prompt, ctx.from_csv), "completion")


def _alpaca_prompt(row: dict) -> list[dict]:
    """Alpaca's instruction and optional input as one user turn (joined by a blank line)."""
    instruction = _require_text(_text(_get(row, "instruction"), "instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and _text(extra, "input").strip():
        instruction = f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": instruction}]


def _sft_alpaca(row: dict, ctx: RowContext) -> list[dict]:
    prompt = _alpaca_prompt(row)
    return _target(prompt + [{"role": "assistant", "content": _text(_get(row, "output"), "output")}], "output")


def _sft_hh(row: dict, ctx: RowContext) -> list[dict]:
    text = _get(row, "text")
    if not isinstance(text, str):
        raise RowProblem(f"text: expected an HH transcript, got {type_name(text)}")
    _require_text(text, "text")
    if not looks_hh(text):
        raise RowProblem("text: not an HH transcript (no 'Human:' turn)")
    msgs = _hh(text, "text", keep_open_reply=True)
    if msgs[-1]["role"] != "assistant":
        raise RowProblem("text: HH transcript must end with an 'Assistant:' turn")
    return _target(msgs, "text: the final 'Assistant:' turn")


def _sft(convert: Callable[[dict, RowContext], list[dict]]) -> Callable[[dict, RowContext], list[dict]]:
    def run(row: dict, ctx: RowContext) -> list[dict]:
        msgs = convert(row, ctx)
        if not any(m["role"] == "user" for m in msgs):
            raise RowProblem("conversation has no user turn")
        return [{"messages": _with_system(msgs, ctx.system)}]
    return run


# ---------------------------------------------------------------------------------------------
# Pair formats


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], ctx: RowContext) -> dict:
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise RowProblem("chosen and rejected are identical")
    return {"prompt": _with_system(prompt, ctx.system), "chosen": chosen, "rejected": rejected}


def _implicit_pair(chosen: Any, rejected: Any, from_csv: bool) -> tuple[list, list, list]:
    c = _text_or_messages(chosen, "chosen", from_csv, empty_ok=True)
    r = _text_or_messages(rejected, "rejected", from_csv, empty_ok=True)
    if isinstance(c, str) != isinstance(r, str):
        raise RowProblem("chosen and rejected must both be text or both be message lists")
    if isinstance(c, str):
        for text, name in ((c, "chosen"), (r, "rejected")):
            if not looks_hh(text):
                raise RowProblem(f"missing column 'prompt' ({name} is plain text, not an HH transcript, "
                                 f"so the prompt cannot be derived from it)")
        c, r = _hh(c, "chosen", keep_open_reply=True), _hh(r, "rejected", keep_open_reply=True)
    for msgs, name in ((c, "chosen"), (r, "rejected")):
        if msgs[-1]["role"] != "assistant":
            raise RowProblem(f"{name}: must end with an assistant turn (the last is '{msgs[-1]['role']}')")
    if not _same_turns(c[:-1], r[:-1]):
        i = next((i for i, (x, y) in enumerate(zip(c, r)) if not _same_turns([x], [y])), min(len(c), len(r)))
        raise RowProblem(f"chosen and rejected differ before their final assistant turn (at message {i + 1}), "
                         f"so they share no prompt")
    prompt = c[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowProblem("the turns shared by chosen and rejected must end with a user turn")
    return prompt, [c[-1]], [r[-1]]


def _pairs_chosen_rejected(row: dict, ctx: RowContext) -> list[dict]:
    for name in ("chosen", "rejected"):
        if name not in row:
            raise RowProblem(f"missing column '{name}'")
    if "prompt" in row:
        prompt = _prompt(_get(row, "prompt"), "prompt", ctx.from_csv)
        chosen = _reply(_get(row, "chosen"), "chosen", prompt, ctx.from_csv)
        rejected = _reply(_get(row, "rejected"), "rejected", prompt, ctx.from_csv)
    else:
        prompt, chosen, rejected = _implicit_pair(_get(row, "chosen"), _get(row, "rejected"), ctx.from_csv)
    return [_pair(prompt, chosen, rejected, ctx)]


def _pairs_response_pair(row: dict, ctx: RowContext) -> list[dict]:
    prompt = _prompt(_get(row, "prompt"), "prompt", ctx.from_csv)
    better = _get(row, "better_response_id")
    if isinstance(better, str) and better.strip() in ("0", "1"):  # CSV cells, and datasets that store labels as text
        better = int(better)
    if isinstance(better, float) and better in (0.0, 1.0):
        better = int(better)
    if isinstance(better, bool) or better not in (0, 1):
        raise RowProblem(f"better_response_id: expected 0 or 1 (the index of the better response), got {better!r}")
    replies = [_reply(_get(row, f"response_{k}"), f"response_{k}", prompt, ctx.from_csv) for k in (0, 1)]
    return [_pair(prompt, replies[better], replies[1 - better], ctx)]


def preference_pairs(values: Sequence[float], mode: str, margin: float = 0.0) -> list[tuple[int, int]]:
    """``(better, worse)`` index pairs from per-response values (higher is better).

    ``mode`` "best_worst": the first highest against the first lowest; "all": every two responses,
    in index order. A pair needs its values to differ by more than ``margin`` (ties never pair).
    E.g. values (3, 5, 1, 5), margin 1: best_worst -> [(1, 2)] (5 - 1 = 4 > 1); all -> (0, 1): 5 - 3 = 2
    -> (1, 0); (0, 2): 2 -> (0, 2); (0, 3): 2 -> (3, 0); (1, 2): 4 -> (1, 2); (1, 3): 0 no; (2, 3): 4 -> (3, 2).
    """
    if mode not in PAIRS_FROM:
        raise ValueError(f"mode must be one of {PAIRS_FROM}, got {mode!r}")
    if len(values) < 2:
        return []
    if mode == "best_worst":
        best = max(range(len(values)), key=lambda i: (values[i], -i))
        worst = min(range(len(values)), key=lambda i: (values[i], i))
        return [(best, worst)] if values[best] - values[worst] > margin else []
    out = []
    for i, j in itertools.combinations(range(len(values)), 2):
        if values[i] - values[j] > margin:
            out.append((i, j))
        elif values[j] - values[i] > margin:
            out.append((j, i))
    return out


def scored_pairs(prompt: list[dict], replies: Sequence[list[dict]], values: Sequence[float], ctx: RowContext,
                 margin: float) -> list[tuple[dict, int]]:
    """Canonical pairs from scored replies, with the index of each pair's chosen reply; pairs of two
    identical replies carry no preference and are left out."""
    out = []
    for i, j in preference_pairs(values, ctx.pairs_from, margin):
        if replies[i][0]["content"].strip() != replies[j][0]["content"].strip():
            out.append(({"prompt": _with_system(prompt, ctx.system), "chosen": replies[i], "rejected": replies[j]}, i))
    return out


def _lookup(obj: dict, canon: str, ctx: RowContext) -> Optional[str]:
    """The key ``obj`` uses for ``canon``: the mapped name if mapped, else the canonical name or an alias."""
    mapped = ctx.columns.get(canon)
    # At the top level the column map has already renamed the column to its canonical name.
    names = (mapped, canon) if mapped else (canon,) + ALIASES.get(canon, ())
    return next((k for k in names if k in obj), None)


def _items(row: dict, ctx: RowContext) -> Optional[tuple[str, Any]]:
    key = _lookup(row, "completions", ctx)
    return None if key is None else (key, row[key])


def _first_item(row: dict, ctx: RowContext) -> Optional[dict]:
    found = _items(row, ctx)
    if found is None:
        return None
    value = found[1]
    if ctx.from_csv and isinstance(value, str):
        value = _json_list(value)
    return value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else {}


def _group_prompt(row: dict, ctx: RowContext) -> list[dict]:
    name = "prompt" if "prompt" in row or "instruction" not in row else "instruction"
    return _prompt(_get(row, name), name, ctx.from_csv)


def _ranked_replies(row: dict, ctx: RowContext, value_key: str) -> tuple[list[dict], list, list[float]]:
    """The prompt, replies and values (score, or rank) of a ``completions``-style row."""
    prompt = _group_prompt(row, ctx)
    name, value = _items(row, ctx)
    items = _decoded_list(value, name, ctx.from_csv)
    replies, values = [], []
    for i, item in enumerate(items, 1):
        where = f"{name} item {i}"
        if not isinstance(item, dict):
            raise RowProblem(f"{where}: expected an object, got {type_name(item)}")
        text_key, value_name = _lookup(item, "response", ctx), _lookup(item, value_key, ctx)
        for key, canon in ((text_key, "response"), (value_name, value_key)):
            if key is None:
                wanted = ctx.columns.get(canon) or "' or '".join((canon,) + ALIASES.get(canon, ()))
                raise RowProblem(f"{where}: missing '{wanted}' (it has: {', '.join(sorted(map(str, item))[:10])})")
        replies.append(_reply(_get(item, text_key), f"{where} {text_key}", prompt, False))
        values.append(_number(_get(item, value_name), f"{where} {value_name}", False))
    return prompt, replies, values


def _pairs_scored(row: dict, ctx: RowContext) -> Union[list[dict], Group]:
    if _items(row, ctx) is None:
        if "response" not in row or _lookup(row, "score", ctx) is None:
            raise _missing(row, SCORED_COLUMNS)
        prompt = _group_prompt(row, ctx)
        score_key = _lookup(row, "score", ctx)
        return Group(prompt, _reply(_get(row, "response"), "response", prompt, ctx.from_csv),
                     _number(_get(row, score_key), score_key, ctx.from_csv))
    prompt, replies, scores = _ranked_replies(row, ctx, "score")
    return [p for p, _ in scored_pairs(prompt, replies, scores, ctx, ctx.score_margin)]


def _pairs_ranked(row: dict, ctx: RowContext) -> list[dict]:
    if _items(row, ctx) is None:
        raise _missing(row, "'prompt' + 'completions' (objects with 'response' and 'rank')")
    prompt, replies, ranks = _ranked_replies(row, ctx, "rank")
    # Rank 1 is the best: negate so that higher is better; any two different ranks form a pair.
    return [p for p, _ in scored_pairs(prompt, replies, [-r for r in ranks], ctx, 0.0)]


def _is_ranked(row: dict, ctx: RowContext) -> bool:
    item = _first_item(row, ctx)
    return item is not None and _lookup(item, "rank", ctx) is not None and _lookup(item, "score", ctx) is None


def _is_scored(row: dict, ctx: RowContext) -> bool:
    return _items(row, ctx) is not None or ("response" in row and _lookup(row, "score", ctx) is not None)


SCORED_COLUMNS = ("'prompt' + 'completions' (objects with 'response' and 'score'), or 'prompt' + 'response' + "
                  "'score' per row")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("messages", "sft", "'messages'", lambda r, c: "messages" in r, _sft(_sft_messages)),
    Format("sharegpt", "sft", "'conversations'", lambda r, c: "conversations" in r, _sft(_sft_sharegpt)),
    Format("prompt_completion", "sft", "'prompt' + 'completion'", lambda r, c: "prompt" in r or "completion" in r,
           _sft(_sft_prompt_completion)),
    Format("alpaca", "sft", "'instruction' (+ 'input') + 'output'", lambda r, c: "instruction" in r or "output" in r,
           _sft(_sft_alpaca)),
    Format("hh", "sft", "'text' (an HH transcript)", lambda r, c: "text" in r, _sft(_sft_hh)),
    Format("chosen_rejected", "pairs", "'chosen' + 'rejected' (+ 'prompt')",
           lambda r, c: "chosen" in r or "rejected" in r, _pairs_chosen_rejected),
    Format("response_pair", "pairs", "'prompt' + 'response_0' + 'response_1' + 'better_response_id'",
           lambda r, c: any(k in r for k in ("response_0", "response_1", "better_response_id")),
           _pairs_response_pair),
    Format("ranked", "pairs", "'prompt' + 'completions' (objects with 'response' and 'rank')", _is_ranked,
           _pairs_ranked),
    Format("scored", "pairs", SCORED_COLUMNS, _is_scored, _pairs_scored),
)}
FORMAT_NAMES = ("auto",) + tuple(FORMATS)


def detect(row: dict, kind: str, ctx: RowContext) -> Format:
    """The first format of ``kind`` whose columns the row has; raises ``RowProblem`` listing them all."""
    for f in FORMATS.values():
        if f.kind == kind and f.detect(row, ctx):
            return f
    options = [f"{f.columns} ({f.name})" for f in FORMATS.values() if f.kind == kind]
    raise _missing(row, f"one of {'; '.join(options)}")


# ---------------------------------------------------------------------------------------------
# Prompts


def prompt_row(row: dict, ctx: RowContext) -> list[dict]:
    """A PPO prompt from the first present of prompt, messages, conversations, instruction (+ input), text,
    chosen; trailing assistant turns are dropped, so full conversations serve as prompts."""
    if "prompt" in row:
        msgs = _prompt(_get(row, "prompt"), "prompt", ctx.from_csv, drop_replies=True)
    elif "messages" in row:
        msgs = _prompt(_get(row, "messages"), "messages", ctx.from_csv, drop_replies=True, text_ok=False)
    elif "conversations" in row:
        msgs = _prompt(_sharegpt(_get(row, "conversations"), ctx.from_csv), "conversations", False,
                       drop_replies=True, text_ok=False)
    elif "instruction" in row:
        msgs = _alpaca_prompt(row)
    elif "text" in row:
        msgs = _prompt(_get(row, "text"), "text", ctx.from_csv, drop_replies=True)
    elif "chosen" in row:
        # A preference pair without a prompt column (Anthropic HH): the chosen conversation before its reply.
        chosen = _get(row, "chosen")
        if isinstance(chosen, str) and not looks_hh(chosen) and _json_list(chosen) is None:
            raise RowProblem("chosen: plain text, not an HH transcript or a conversation, so it holds no prompt")
        msgs = _prompt(chosen, "chosen", ctx.from_csv, drop_replies=True)
    else:
        raise _missing(row, "'prompt', 'messages', 'conversations', 'instruction', 'text', or 'chosen'")
    return [{"prompt": _with_system(msgs, ctx.system)}]
