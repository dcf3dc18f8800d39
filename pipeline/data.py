"""Loading and validating the pipeline's data: SFT conversations, preference pairs and PPO prompts.

Sources
    A local ``.jsonl`` (or ``.ndjson``), ``.json``, ``.csv`` or ``.parquet`` file, or a hub dataset id
    read with ``datasets.load_dataset(id, split=split)``. A source that does not exist locally is taken
    for a hub id only if it looks like one (``name`` or ``owner/name``); anything that looks like a path
    (a data-file extension such as ``.jsonl``, more than one ``/``, a leading ``/``, ``.`` or ``~``)
    raises ``DataError`` naming the missing path.

Row numbers (used in every error message as ``<source> row N: <problem>``)
    jsonl: the 1-based line number (blank lines are skipped but still counted).
    csv: the line on which the record starts; the header is line 1, so the first record is row 2.
    json, parquet, hub: the 1-based position of the row.

Canonical messages
    ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; other keys are dropped,
    content is kept verbatim but must not be empty or whitespace only, and only the first message may
    be a system message.

Column mapping
    ``columns={"prompt": "question"}`` reads the file's ``question`` column as ``prompt``. A mapped
    column that a row lacks is reported as a missing column for that row. Entries for canonical names a
    loader does not use are ignored, so one mapping can serve all three loaders.

CSV cells are strings; a message-list field (``messages``, ``prompt``, ``completion``, ``chosen``,
``rejected``) may hold a JSON-encoded list of messages.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["DataError", "LoadReport", "parse_hh", "read_rows", "load_sft", "load_pairs", "load_prompts",
           "data_hash"]

ROLES = ("system", "user", "assistant")
FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CANONICAL_COLUMNS = ("messages", "prompt", "completion", "text", "chosen", "rejected")
MAX_PROBLEMS = 10

# Suffixes that mark a string as a file path even though it is not in FILE_TYPES.
_PATH_SUFFIXES = {".txt", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".arrow", ".yaml", ".yml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_HUMAN = re.compile(r"(?:\A\s*|\n\n)Human:")


class DataError(ValueError):
    """A data problem; the message names the source and, for a bad row, ``row N`` and the problem."""


class _RowProblem(Exception):
    """One invalid row; the loader adds the source and the row number."""


@dataclass
class _Unreadable:
    """A row the reader could not turn into an object (bad JSON line, too many CSV cells)."""
    problem: str


@dataclass
class LoadReport:
    """What a loader read from one source.

    ``total`` rows were examined, ``kept`` are returned, ``skipped`` were invalid (only with
    ``skip_invalid=True``); ``problems`` holds the first ten as ``"row N: <problem>"``.
    """
    source: str
    total: int = 0
    kept: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line, plus one indented line per recorded problem."""
        text = f"{self.source}: kept {self.kept} of {self.total} rows"
        if not self.skipped:
            return text
        lines = [f"{text}, skipped {self.skipped} invalid"] + [f"  {p}" for p in self.problems]
        if self.skipped > len(self.problems):
            lines.append(f"  ... and {self.skipped - len(self.problems)} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sources and raw rows


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "text", dict: "object", list: "list", bool: "bool", int: "int", float: "float"}.get(
        type(value), type(value).__name__)


def _looks_like_path(source: str) -> bool:
    if not _HUB_ID.match(source):
        return True
    suffix = Path(source).suffix.lower()
    return suffix in FILE_TYPES or suffix in _PATH_SUFFIXES


def _resolve(source: str) -> Optional[tuple[str, Path]]:
    """``(file type, path)`` for a local file, ``None`` for a hub id; raises for a bad local path."""
    if not source or not source.strip():
        raise DataError("no data source given (empty string)")
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source}: is a directory; expected a .jsonl, .json, .csv or .parquet file "
                        f"or a hub dataset id")
    if path.is_file():
        kind = FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{source}: unsupported file type '{path.suffix}' "
                            f"(expected .jsonl, .json, .csv or .parquet)")
        return kind, path
    if _looks_like_path(source):
        raise DataError(f"{source}: file not found (looked for {path.resolve()})")
    return None


def _iter_jsonl(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, _Unreadable(f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                yield n, obj if isinstance(obj, dict) else _Unreadable(
                    f"expected a JSON object, got {_type_name(obj)}")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 ({e})") from None


def _iter_json(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 ({e})") from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # A JSON-lines file saved with a .json name; read it line by line so row numbers are lines.
            yield from _iter_jsonl(path, source)
            return
        raise DataError(f"{source}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        what = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else _type_name(data)
        raise DataError(f'{source}: expected a JSON list of objects or {{"data": [...]}}, got {what}')
    for n, obj in enumerate(data, 1):
        yield n, obj if isinstance(obj, dict) else _Unreadable(f"expected a JSON object, got {_type_name(obj)}")


def _iter_csv(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    # Long HH transcripts exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: Optional[list[str]] = None
        end = 0
        try:
            for cells in reader:
                start, end = end + 1, reader.line_num
                if not cells:
                    continue
                if header is None:
                    header = cells
                    continue
                if len(cells) > len(header):
                    yield start, _Unreadable(f"has {len(cells)} cells but the header has {len(header)} columns")
                    continue
                # Short records give fewer keys, so their absent cells read as missing columns.
                yield start, dict(zip(header, cells))
        except csv.Error as e:
            raise DataError(f"{source} row {reader.line_num}: invalid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not valid UTF-8 ({e})") from None


def _iter_parquet(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{source}: not a readable parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _iter_hub(source: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, auth, missing split, unknown id: all mean "cannot read this source"
        raise DataError(f"{source}: not a local file, and loading it as a hub dataset (split '{split}') "
                        f"failed: {type(e).__name__}: {e}") from None
    for n, row in enumerate(ds, 1):
        yield n, dict(row)


def _open(source: str, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    local = _resolve(source)
    if local is None:
        return "hub", _iter_hub(source, split)
    kind, path = local
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}
    return kind, readers[kind](path, source)


def read_rows(source: str, split: str = "train", max_rows: int = 0) -> list[tuple[int, dict]]:
    """Read raw rows as ``(row number, row dict)`` pairs, at most ``max_rows`` of them (0 = all).

    No validation beyond "each row is an object": CSV values stay strings, a JSON file may be a list
    of objects or ``{"data": [...]}``. An unreadable row (bad JSON line, non-object, too many CSV
    cells) raises ``DataError`` naming the source and row.
    """
    source = str(source)
    _, rows = _open(source, split)
    out: list[tuple[int, dict]] = []
    with contextlib.closing(rows):
        for n, row in rows:
            if isinstance(row, _Unreadable):
                raise DataError(f"{source} row {n}: {row.problem}")
            out.append((n, row))
            if max_rows and len(out) >= max_rows:
                break
    return out


# ---------------------------------------------------------------------------------------------
# Field validation


def parse_hh(text: str) -> list[dict]:
    """Parse an Anthropic-HH transcript into canonical messages.

    ``"\\n\\nHuman: Hi\\n\\nAssistant: Hello!"`` -> ``[{"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"}]``. Turn markers are ``Human:``/``Assistant:`` at the
    start of the text or after a blank line; each turn's text is stripped. The transcript must start
    with ``Human:`` and alternate; an empty final ``Assistant:`` (the cue that ends HH prompts) is
    dropped, any other empty turn is an error. Raises ``DataError`` describing the problem.
    """
    if not isinstance(text, str):
        raise DataError(f"HH transcript must be text, got {_type_name(text)}")
    marks = list(_HH_MARKER.finditer(text))
    if not any(m.group(1) == "Human" for m in marks):
        raise DataError("HH transcript has no 'Human:' turn")
    if text[:marks[0].start()].strip():
        raise DataError("HH transcript has text before its first turn marker")
    if marks[0].group(1) != "Human":
        raise DataError("HH transcript must start with 'Human:' (it starts with 'Assistant:')")
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        turns.append((m.group(1), text[m.end():end].strip()))
    if turns[-1] == ("Assistant", "") and len(turns) > 1:
        turns.pop()
    messages = []
    for i, (speaker, content) in enumerate(turns, 1):
        if i > 1 and speaker == turns[i - 2][0]:
            raise DataError(f"HH transcript turns {i - 1} and {i} are both '{speaker}:' (turns must alternate)")
        if not content:
            raise DataError(f"HH transcript turn {i} ('{speaker}:') is empty")
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content})
    return messages


def _looks_hh(text: str) -> bool:
    return bool(_HH_HUMAN.search(text))


def _hh(text: str, name: str) -> list[dict]:
    try:
        return parse_hh(text)
    except DataError as e:
        raise _RowProblem(f"{name}: {e}") from None


def _get(row: dict, name: str) -> Any:
    if name not in row:
        raise _RowProblem(f"missing column '{name}'")
    if row[name] is None:
        raise _RowProblem(f"{name}: value is null")
    return row[name]


def _require_text(value: str, name: str) -> str:
    if not value.strip():
        raise _RowProblem(f"{name}: empty text")
    return value


def _json_list(value: str) -> Optional[list]:
    if not value.lstrip().startswith("["):
        return None
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded) else None


def _messages(value: Any, name: str, from_csv: bool = False) -> list[dict]:
    if from_csv and isinstance(value, str):
        decoded = _json_list(value)
        if decoded is None:
            raise _RowProblem(f"{name}: expected a JSON list of messages, got text that is not one")
        value = decoded
    if not isinstance(value, list):
        raise _RowProblem(f"{name}: expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _RowProblem(f"{name}: empty list of messages")
    pre = "" if name == "messages" else f"{name}: "
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise _RowProblem(f"{pre}message {i} is not an object (got {_type_name(m)})")
        role = m.get("role")
        if role is None:
            raise _RowProblem(f"{pre}message {i} has no role")
        if not isinstance(role, str):
            raise _RowProblem(f"{pre}message {i} role must be text, got {_type_name(role)}")
        if role not in ROLES:
            raise _RowProblem(f"{pre}message {i} has unknown role {role!r} (expected {', '.join(ROLES)})")
        content = m.get("content")
        if content is None:
            raise _RowProblem(f"{pre}message {i} has no content")
        if not isinstance(content, str):
            raise _RowProblem(f"{pre}message {i} content must be text, got {_type_name(content)}")
        if not content.strip():
            raise _RowProblem(f"{pre}message {i} ({role}) has empty content")
        if role == "system" and i > 1:
            raise _RowProblem(f"{pre}message {i} is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    return out


def _text_or_messages(value: Any, name: str, from_csv: bool) -> Any:
    if isinstance(value, str):
        if from_csv:
            decoded = _json_list(value)
            if decoded is not None:
                return _messages(decoded, name)
        return _require_text(value, name)
    if isinstance(value, list):
        return _messages(value, name)
    raise _RowProblem(f"{name}: expected text or a list of messages, got {_type_name(value)}")


def _prompt(value: Any, name: str, from_csv: bool, drop_replies: bool = False,
            text_ok: bool = True) -> list[dict]:
    """Messages ending with a user turn, from text (plain or HH) or a message list."""
    if not text_ok:
        value = _messages(value, name, from_csv)
    value = _text_or_messages(value, name, from_csv)
    if isinstance(value, str):
        msgs = _hh(value, name) if _looks_hh(value) else [{"role": "user", "content": value}]
    else:
        msgs = value
    if drop_replies:
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or not any(m["role"] == "user" for m in msgs):
            raise _RowProblem(f"{name}: has no user turn")
    if msgs[-1]["role"] != "user":
        raise _RowProblem(f"{name}: must end with a user turn (the last is '{msgs[-1]['role']}')")
    return msgs


def _same_turns(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _reply(value: Any, name: str, prompt: list[dict], from_csv: bool) -> list[dict]:
    """One assistant message, from text, a message list, or a full conversation repeating ``prompt``."""
    value = _text_or_messages(value, name, from_csv)
    if isinstance(value, str):
        if not _looks_hh(value):
            marks = list(_HH_MARKER.finditer(value))
            if len(marks) == 1 and marks[0].start() == 0 and marks[0].group(1) == "Assistant":
                value = _require_text(value[marks[0].end():].strip(), name)
            return [{"role": "assistant", "content": value}]
        value = _hh(value, name)
    # System messages are compared away: a prompt may carry one that the conversation repeats or not.
    convo = [m for m in value if m["role"] != "system"]
    turns = [m for m in prompt if m["role"] != "system"]
    if convo and convo[0]["role"] != "assistant":
        if not _same_turns(convo[:len(turns)], turns):
            raise _RowProblem(f"{name}: conversation does not start with the prompt")
        convo = convo[len(turns):]
    if len(convo) != 1 or convo[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in convo) or "nothing"
        raise _RowProblem(f"{name}: expected one assistant reply after the prompt, got {roles}")
    return convo


def _with_system(msgs: list[dict], system: Optional[str]) -> list[dict]:
    if system and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}] + msgs
    return msgs


def _missing(row: dict, expected: str) -> _RowProblem:
    names = ", ".join(sorted(map(str, row))[:10]) or "none"
    return _RowProblem(f"missing column: expected {expected} (the row has: {names})")


# ---------------------------------------------------------------------------------------------
# Row converters


def _sft_row(row: dict, from_csv: bool, system: Optional[str]) -> dict:
    if "messages" in row:
        msgs = _messages(_get(row, "messages"), "messages", from_csv)
        if msgs[-1]["role"] != "assistant":
            raise _RowProblem(f"conversation must end with an assistant turn "
                              f"(message {len(msgs)} is '{msgs[-1]['role']}')")
    elif "prompt" in row or "completion" in row:
        prompt = _prompt(_get(row, "prompt"), "prompt", from_csv)
        msgs = prompt + _reply(_get(row, "completion"), "completion", prompt, from_csv)
    elif "text" in row:
        text = _get(row, "text")
        if not isinstance(text, str):
            raise _RowProblem(f"text: expected an HH transcript, got {_type_name(text)}")
        _require_text(text, "text")
        if not _looks_hh(text):
            raise _RowProblem("text: not an HH transcript (no 'Human:' turn)")
        msgs = _hh(text, "text")
        if msgs[-1]["role"] != "assistant":
            raise _RowProblem("text: HH transcript must end with an 'Assistant:' turn")
    else:
        raise _missing(row, "'messages', 'prompt' + 'completion', or 'text'")
    if not any(m["role"] == "user" for m in msgs):
        raise _RowProblem("conversation has no user turn")
    return {"messages": _with_system(msgs, system)}


def _implicit_pair(chosen: Any, rejected: Any, from_csv: bool) -> tuple[list, list, list]:
    c = _text_or_messages(chosen, "chosen", from_csv)
    r = _text_or_messages(rejected, "rejected", from_csv)
    if isinstance(c, str) != isinstance(r, str):
        raise _RowProblem("chosen and rejected must both be text or both be message lists")
    if isinstance(c, str):
        for text, name in ((c, "chosen"), (r, "rejected")):
            if not _looks_hh(text):
                raise _RowProblem(f"missing column 'prompt' ({name} is plain text, not an HH transcript, "
                                  f"so the prompt cannot be derived from it)")
        c, r = _hh(c, "chosen"), _hh(r, "rejected")
    for msgs, name in ((c, "chosen"), (r, "rejected")):
        if msgs[-1]["role"] != "assistant":
            raise _RowProblem(f"{name}: must end with an assistant turn (the last is '{msgs[-1]['role']}')")
    if not _same_turns(c[:-1], r[:-1]):
        i = next((i for i, (x, y) in enumerate(zip(c, r)) if not _same_turns([x], [y])), min(len(c), len(r)))
        raise _RowProblem(f"chosen and rejected differ before their final assistant turn (at message {i + 1}), "
                          f"so they share no prompt")
    prompt = c[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise _RowProblem("the turns shared by chosen and rejected must end with a user turn")
    return prompt, [c[-1]], [r[-1]]


def _pair_row(row: dict, from_csv: bool, system: Optional[str]) -> dict:
    for name in ("chosen", "rejected"):
        if name not in row:
            raise _RowProblem(f"missing column '{name}'")
    if "prompt" in row:
        prompt = _prompt(_get(row, "prompt"), "prompt", from_csv)
        chosen = _reply(_get(row, "chosen"), "chosen", prompt, from_csv)
        rejected = _reply(_get(row, "rejected"), "rejected", prompt, from_csv)
    else:
        prompt, chosen, rejected = _implicit_pair(_get(row, "chosen"), _get(row, "rejected"), from_csv)
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise _RowProblem("chosen and rejected are identical")
    return {"prompt": _with_system(prompt, system), "chosen": chosen, "rejected": rejected}


def _prompt_row(row: dict, from_csv: bool, system: Optional[str]) -> dict:
    if "prompt" in row:
        msgs = _prompt(_get(row, "prompt"), "prompt", from_csv, drop_replies=True)
    elif "messages" in row:
        msgs = _prompt(_get(row, "messages"), "messages", from_csv, drop_replies=True, text_ok=False)
    elif "text" in row:
        msgs = _prompt(_get(row, "text"), "text", from_csv, drop_replies=True)
    else:
        raise _missing(row, "'prompt', 'messages', or 'text'")
    return {"prompt": _with_system(msgs, system)}


# ---------------------------------------------------------------------------------------------
# Loaders


def _load(source: Any, used: tuple[str, ...], convert: Callable[[dict, bool, Optional[str]], dict],
          columns: Optional[dict], skip_invalid: bool, max_rows: int, split: str,
          system_prompt: Optional[str]) -> tuple[list[dict], LoadReport]:
    source = str(source)
    mapping = {}
    for canon, col in (columns or {}).items():
        if canon not in CANONICAL_COLUMNS:
            raise DataError(f"columns: unknown canonical column '{canon}' "
                            f"(expected one of {', '.join(CANONICAL_COLUMNS)})")
        if not isinstance(col, str) or not col:
            raise DataError(f"columns.{canon}: expected a column name, got {col!r}")
        if canon in used:
            mapping[canon] = col
    if not isinstance(max_rows, int) or max_rows < 0:
        raise DataError(f"max_rows must be a non-negative integer (0 = all), got {max_rows!r}")
    system = system_prompt if system_prompt and system_prompt.strip() else None

    kind, raw_rows = _open(source, split)
    report = LoadReport(source)
    rows: list[dict] = []
    with contextlib.closing(raw_rows):
        for n, raw in raw_rows:
            report.total += 1
            try:
                if isinstance(raw, _Unreadable):
                    raise _RowProblem(raw.problem)
                if mapping:
                    view = {k: v for k, v in raw.items() if k not in mapping and k not in mapping.values()}
                    for canon, col in mapping.items():
                        if col not in raw:
                            raise _RowProblem(f"missing column '{col}' (mapped to '{canon}')")
                        view[canon] = raw[col]
                    raw = view
                rows.append(convert(raw, kind == "csv", system))
            except _RowProblem as e:
                if not skip_invalid:
                    raise DataError(f"{source} row {n}: {e}") from None
                report.skipped += 1
                if len(report.problems) < MAX_PROBLEMS:
                    report.problems.append(f"row {n}: {e}")
                continue
            report.kept += 1
            if max_rows and report.kept >= max_rows:
                break
    if not rows:
        if not report.total:
            raise DataError(f"{source}: no rows (the source is empty)")
        raise DataError(f"{source}: no valid rows ({report.total} read, all invalid; first problem: "
                        f"{report.problems[0]})")
    return rows, report


def loader_options(dc) -> dict:
    """The keyword arguments every loader takes, from a ``pipeline.config.DataConfig``."""
    return dict(columns=dc.columns, skip_invalid=dc.skip_invalid, max_rows=dc.max_rows, split=dc.split,
                system_prompt=dc.system_prompt)


def load_sft(source: str, columns: Optional[dict] = None, skip_invalid: bool = False, max_rows: int = 0,
             split: str = "train", system_prompt: Optional[str] = None) -> tuple[list[dict], LoadReport]:
    """Load SFT conversations as ``{"messages": [...]}`` rows ending with an assistant turn.

    Per row (after the column mapping), the first present of: ``messages`` (a message list);
    ``prompt`` + ``completion`` (each text or a message list; prompt text becomes one user message,
    or the turns of an HH transcript; completion text becomes one assistant message); ``text`` (an HH
    transcript ending with an ``Assistant:`` turn). ``system_prompt`` is prepended to conversations
    without a system message. ``max_rows`` caps the rows kept. Returns ``(rows, LoadReport)``.
    """
    return _load(source, ("messages", "prompt", "completion", "text"), _sft_row, columns, skip_invalid,
                 max_rows, split, system_prompt)


def load_pairs(source: str, columns: Optional[dict] = None, skip_invalid: bool = False, max_rows: int = 0,
               split: str = "train", system_prompt: Optional[str] = None) -> tuple[list[dict], LoadReport]:
    """Load preference pairs as trl's conversational format with an explicit prompt.

    Rows are ``{"prompt": [... ending with a user turn], "chosen": [{"role": "assistant", ...}],
    "rejected": [{"role": "assistant", ...}]}``. With a ``prompt`` column, chosen/rejected are text or
    message lists (either the reply alone or a conversation that repeats the prompt). Without one,
    chosen/rejected are both full conversations (message lists or HH transcripts, multi-turn allowed)
    that must share every turn but the final assistant one, which becomes the reply. Identical
    replies are invalid. ``system_prompt`` is prepended to prompts without a system message.
    """
    return _load(source, ("prompt", "chosen", "rejected"), _pair_row, columns, skip_invalid, max_rows,
                 split, system_prompt)


def load_prompts(source: str, columns: Optional[dict] = None, skip_invalid: bool = False,
                 max_rows: int = 0, split: str = "train",
                 system_prompt: Optional[str] = None) -> tuple[list[dict], LoadReport]:
    """Load PPO prompts as ``{"prompt": [... ending with a user turn]}`` rows.

    Per row, the first present of: ``prompt`` (text, an HH transcript, or a message list);
    ``messages`` (a message list); ``text`` (an HH transcript or plain text). Trailing assistant turns
    are dropped, so full conversations serve as prompts. ``system_prompt`` is prepended to prompts
    without a system message.
    """
    return _load(source, ("prompt", "messages", "text"), _prompt_row, columns, skip_invalid, max_rows,
                 split, system_prompt)


def data_hash(source: str, split: str = "train") -> str:
    """sha256 hex digest identifying a data source, for run metadata.

    Local file: sha256 of its bytes. Hub id: sha256 of ``f"hub:{id}:{split}"`` only; the dataset's
    fingerprint is left out because getting it means downloading and preparing the dataset, so the
    hash names the request (id and split), not a revision of its content.
    """
    source = str(source)
    local = _resolve(source)
    if local is None:
        return hashlib.sha256(f"hub:{source}:{split}".encode()).hexdigest()
    h = hashlib.sha256()
    with open(local[1], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
