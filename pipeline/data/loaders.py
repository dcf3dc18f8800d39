"""Loading and validating the pipeline's data: SFT conversations, preference pairs and PPO prompts.

Sources
    A local ``.jsonl`` (or ``.ndjson``), ``.json``, ``.csv`` or ``.parquet`` file, or a hub dataset id
    read with ``datasets.load_dataset(id, split=split)``. A source that does not exist locally is taken
    for a hub id only if it looks like one (``name`` or ``owner/name``); anything that looks like a path
    (a data-file extension such as ``.jsonl``, more than one ``/``, a leading ``/``, ``.`` or ``~``)
    raises ``DataError`` naming the missing path.

Formats
    What a row means (Alpaca, ShareGPT, chosen/rejected, PKU-SafeRLHF, UltraFeedback, HelpSteer,
    Nectar...) is pipeline/data/formats.py: detected per row from its columns, or forced with ``format``.

Row numbers (used in every error message as ``<source> row N: <problem>``)
    jsonl: the 1-based line number (blank lines are skipped but still counted).
    csv: the line on which the record starts; the header is line 1, so the first record is row 2.
    json, parquet, hub: the 1-based position of the row.
    ``LoadReport.row_numbers`` gives the source row of every returned row.

Canonical messages
    ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; other keys are dropped,
    content is kept verbatim but must not be empty or whitespace only (except a preference pair's
    reply), and only the first message may be a system message.

Column mapping
    ``columns={"prompt": "question"}`` reads the file's ``question`` column as ``prompt``. A mapped
    column that a row lacks is reported as a missing column for that row (``response``, ``score``
    and ``rank`` are also renamed inside ``completions`` objects, so they may be absent at the top).
    Entries for canonical names a loader does not use are ignored, so one mapping can serve all
    three loaders.

CSV cells are strings; a message-list or ``completions`` field may hold a JSON-encoded list.
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
from typing import Any, Iterator, Optional

from pipeline.data import formats
from pipeline.data.formats import FORMATS, EmptyTarget, RowProblem, type_name

__all__ = ["DataError", "EmptyTargetError", "LoadReport", "parse_hh", "read_rows", "load_sft", "load_pairs",
           "load_prompts", "data_hash"]

FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SFT_COLUMNS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "response_0", "response_1", "better_response_id", "completions",
                "response", "score", "rank")
PROMPT_COLUMNS = ("prompt", "messages", "conversations", "instruction", "input", "text", "chosen")
CANONICAL_COLUMNS = tuple(dict.fromkeys(SFT_COLUMNS + PAIR_COLUMNS + PROMPT_COLUMNS))
MAX_PROBLEMS = 10
SKIP_HINT = "to skip such rows and count them instead, set data.skip_invalid=true"

# Suffixes that mark a string as a file path even though it is not in FILE_TYPES.
_PATH_SUFFIXES = {".txt", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".arrow", ".yaml", ".yml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class DataError(ValueError):
    """A data problem; the message names the source and, for a bad row, ``row N`` and the problem."""


class EmptyTargetError(DataError):
    """An SFT row whose assistant reply is empty: nothing to train on."""


@dataclass
class _Unreadable:
    """A row the reader could not turn into an object (bad JSON line, too many CSV cells)."""
    problem: str


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class LoadReport:
    """What a loader read from one source.

    ``total`` source rows were examined, ``kept`` canonical rows are returned (a scored or ranked row
    can give several pairs, or none), ``skipped`` rows were invalid (only with ``skip_invalid=True``);
    ``problems`` holds the first ten as ``"row N: <problem>"``. ``formats`` counts the valid rows of
    each format; ``empty_responses`` the returned pairs with an empty chosen or rejected reply;
    ``no_pair`` the prompts whose responses formed no pair (tied, within the score margin, or one
    response); ``joined_rows`` the valid rows in which consecutive turns of one role were joined into
    one (pipeline/data/formats.py ``join_same_role``); ``row_numbers`` the source row of each returned row (for one-response-per-row layouts,
    the row of the pair's chosen response).
    """
    source: str
    total: int = 0
    kept: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    empty_responses: int = 0
    no_pair: int = 0
    pairing: str = ""
    joined_rows: int = 0
    row_numbers: list[int] = field(default_factory=list, repr=False)

    def row_name(self, i: int) -> str:
        """``"<source> row N"`` for the ``i``-th returned row."""
        return f"{self.source} row {self.row_numbers[i]}"

    def summary(self) -> str:
        """One line, plus one indented line per recorded problem."""
        kinds = ", ".join(f"{k} {v}" for k, v in self.formats.items()) if len(self.formats) > 1 else \
            next(iter(self.formats), "")
        if any(name in ("scored", "ranked") for name in self.formats):
            text = f"{self.source}: {self.kept} pairs from {self.total} rows (format {kinds}; {self.pairing})"
        else:
            text = f"{self.source}: kept {self.kept} of {self.total} rows" + (f" (format {kinds})" if kinds else "")
        if self.skipped:
            text += f", skipped {self.skipped} invalid"
        if self.no_pair:
            text += f", {_count(self.no_pair, 'prompt')} formed no pair (one response, or all tied within the margin)"
        if self.empty_responses:
            text += f"; {_count(self.empty_responses, 'pair')} with an empty response (kept: a valid preference)"
        if self.joined_rows:
            text += (f"; {_count(self.joined_rows, 'row')} had consecutive turns of one role, joined into one "
                     "turn (blank-line separated)")
        lines = [text] + [f"  {p}" for p in self.problems]
        if self.skipped > len(self.problems):
            lines.append(f"  ... and {self.skipped - len(self.problems)} more")
        return "\n".join(lines)

    def manifest(self) -> dict:
        """The counts a stage records in its manifest."""
        return {"rows": self.kept, "source_rows": self.total, "skipped": self.skipped, "formats": self.formats,
                "empty_responses": self.empty_responses, "no_pair": self.no_pair,
                "joined_rows": self.joined_rows}


# ---------------------------------------------------------------------------------------------
# Sources and raw rows


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
                    f"expected a JSON object, got {type_name(obj)}")
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
        what = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type_name(data)
        raise DataError(f'{source}: expected a JSON list of objects or {{"data": [...]}}, got {what}')
    for n, obj in enumerate(data, 1):
        yield n, obj if isinstance(obj, dict) else _Unreadable(f"expected a JSON object, got {type_name(obj)}")


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
# Loaders


def parse_hh(text: str, keep_open_reply: bool = False) -> list[dict]:
    """pipeline.data.formats.parse_hh, raising ``DataError``."""
    try:
        return formats.parse_hh(text, keep_open_reply)
    except ValueError as e:
        raise DataError(str(e)) from None


def _column_map(columns: Optional[dict], used: tuple[str, ...]) -> dict[str, str]:
    mapping = {}
    for canon, col in (columns or {}).items():
        if canon not in CANONICAL_COLUMNS:
            raise DataError(f"columns: unknown canonical column '{canon}' "
                            f"(expected one of {', '.join(CANONICAL_COLUMNS)})")
        if not isinstance(col, str) or not col:
            raise DataError(f"columns.{canon}: expected a column name, got {col!r}")
        if canon in used:
            mapping[canon] = col
    return mapping


def _renamed(raw: dict, mapping: dict[str, str]) -> dict:
    """The row with mapped columns under their canonical names (the mapped-over originals hidden)."""
    view = {k: v for k, v in raw.items() if k not in mapping and k not in mapping.values()}
    for canon, col in mapping.items():
        if col in raw:
            view[canon] = raw[col]
        elif canon not in formats.NESTED_COLUMNS:
            raise RowProblem(f"missing column '{col}' (mapped to '{canon}')")
    return view


def _fixed_format(format: str, kind: str) -> Optional[formats.Format]:
    """The format ``format`` forces on a loader of ``kind``; None to detect per row. A format of the
    other kind leaves detection on: one ``data.format`` serves the SFT and the pair sources."""
    if format not in formats.FORMAT_NAMES:
        raise DataError(f"format: unknown format {format!r} (expected one of {', '.join(formats.FORMAT_NAMES)})")
    fmt = FORMATS.get(format)
    return fmt if fmt is not None and fmt.kind == kind else None


def _load(source: Any, kind: str, columns: Optional[dict], skip_invalid: bool, max_rows: int, split: str,
          system_prompt: Optional[str], format: str = "auto", pairs_from: str = "best_worst",
          score_margin: float = 0.0) -> tuple[list[dict], LoadReport]:
    source = str(source)
    used = {"sft": SFT_COLUMNS, "pairs": PAIR_COLUMNS, "prompts": PROMPT_COLUMNS}[kind]
    mapping = _column_map(columns, used)
    if not isinstance(max_rows, int) or max_rows < 0:
        raise DataError(f"max_rows must be a non-negative integer (0 = all), got {max_rows!r}")
    if pairs_from not in formats.PAIRS_FROM:
        raise DataError(f"pairs_from: expected one of {', '.join(formats.PAIRS_FROM)}, got {pairs_from!r}")
    if not isinstance(score_margin, (int, float)) or not score_margin >= 0:
        raise DataError(f"score_margin: expected a number >= 0, got {score_margin!r}")
    fixed = _fixed_format(format, kind)
    system = system_prompt if system_prompt and system_prompt.strip() else None

    file_kind, raw_rows = _open(source, split)
    ctx = formats.RowContext(from_csv=file_kind == "csv", system=system, pairs_from=pairs_from,
                             score_margin=float(score_margin),
                             columns={k: v for k, v in mapping.items() if k in formats.NESTED_COLUMNS})
    report = LoadReport(source, pairing=f"pairs_from={pairs_from}, score_margin={score_margin:g}" if kind == "pairs" else "")
    rows: list[dict] = []
    groups: dict[str, tuple[list[dict], list[tuple[list[dict], float, int]]]] = {}

    def keep(new: list[tuple[dict, int]]) -> None:
        for row, n in new[:max_rows - len(rows) if max_rows else None]:
            rows.append(row)
            report.row_numbers.append(n)
            if "chosen" in row and not (row["chosen"][0]["content"].strip() and row["rejected"][0]["content"].strip()):
                report.empty_responses += 1

    with contextlib.closing(raw_rows):
        for n, raw in raw_rows:
            report.total += 1
            try:
                if isinstance(raw, _Unreadable):
                    raise RowProblem(raw.problem)
                row = _renamed(raw, mapping) if mapping else raw
                with formats.joined_turns() as joins:
                    if kind == "prompts":
                        name, out = None, formats.prompt_row(row, ctx)
                    else:
                        fmt = fixed or formats.detect(row, kind, ctx)
                        name, out = fmt.name, fmt.convert(row, ctx)
            except RowProblem as e:
                if not skip_invalid:
                    error = EmptyTargetError if isinstance(e, EmptyTarget) else DataError
                    raise error(f"{source} row {n}: {e} ({SKIP_HINT})") from None
                report.skipped += 1
                if len(report.problems) < MAX_PROBLEMS:
                    report.problems.append(f"row {n}: {e}")
                continue
            if name is not None:
                report.formats[name] = report.formats.get(name, 0) + 1
            report.joined_rows += joins[0] > 0
            if isinstance(out, formats.Group):
                groups.setdefault(out.key, (out.prompt, []))[1].append((out.reply, out.score, n))
                continue
            if not out:
                report.no_pair += 1
            keep([(r, n) for r in out])
            if max_rows and len(rows) >= max_rows:
                break
    # One-response-per-row layouts: each prompt's responses, gathered over the whole source, form its pairs.
    for prompt, items in groups.values():
        pairs = formats.scored_pairs(prompt, [i[0] for i in items], [i[1] for i in items], ctx, ctx.score_margin)
        if not pairs:
            report.no_pair += 1
        keep([(pair, items[chosen][2]) for pair, chosen in pairs])
    report.kept = len(rows)
    if not rows:
        if not report.total:
            raise DataError(f"{source}: no rows (the source is empty)")
        if report.no_pair and not report.skipped:
            raise DataError(f"{source}: no pairs ({report.total} rows read; {report.no_pair} prompts formed no pair: "
                            f"one response each, or all tied within score_margin={score_margin:g})")
        raise DataError(f"{source}: no valid rows ({report.total} read, all invalid; first problem: "
                        f"{report.problems[0] if report.problems else 'none recorded'})")
    return rows, report


def loader_options(dc) -> dict:
    """The keyword arguments every loader takes, from a ``pipeline.config.DataConfig``."""
    return dict(columns=dc.columns, skip_invalid=dc.skip_invalid, max_rows=dc.max_rows, split=dc.split,
                system_prompt=dc.system_prompt, format=dc.format, pairs_from=dc.pairs_from,
                score_margin=dc.score_margin)


def load_sft(source: str, columns: Optional[dict] = None, skip_invalid: bool = False, max_rows: int = 0,
             split: str = "train", system_prompt: Optional[str] = None, format: str = "auto",
             **pair_options) -> tuple[list[dict], LoadReport]:
    """Load SFT conversations as ``{"messages": [...]}`` rows ending with a non-empty assistant turn.

    Per row (after the column mapping), the first format whose columns it has (pipeline/data/formats.py):
    ``messages``; ``conversations`` (ShareGPT); ``prompt`` + ``completion`` (each text or a message
    list; prompt text becomes one user message, or the turns of an HH transcript); ``instruction`` (+
    ``input``) + ``output`` (Alpaca, one user turn); ``text`` (an HH transcript ending with an
    ``Assistant:`` turn). ``format`` names an SFT format to force it. An empty target raises
    ``EmptyTargetError``. ``system_prompt`` is prepended to conversations without a system message.
    ``max_rows`` caps the rows kept. ``pair_options`` (``pairs_from``, ``score_margin``) are accepted
    and unused, so that ``loader_options`` serves every loader. Returns ``(rows, LoadReport)``.
    """
    return _load(source, "sft", columns, skip_invalid, max_rows, split, system_prompt, format)


def load_pairs(source: str, columns: Optional[dict] = None, skip_invalid: bool = False, max_rows: int = 0,
               split: str = "train", system_prompt: Optional[str] = None, format: str = "auto",
               pairs_from: str = "best_worst", score_margin: float = 0.0) -> tuple[list[dict], LoadReport]:
    """Load preference pairs as trl's conversational format with an explicit prompt.

    Rows are ``{"prompt": [... ending with a user turn], "chosen": [{"role": "assistant", ...}],
    "rejected": [{"role": "assistant", ...}]}``; a reply may be empty (counted in the report). Formats
    (pipeline/data/formats.py): ``chosen``/``rejected`` with a ``prompt`` (replies as text, message lists,
    or conversations repeating the prompt) or without one (two conversations or HH transcripts sharing
    every turn but the last); ``response_0``/``response_1``/``better_response_id``; ``completions``
    with a ``rank`` or a ``score`` each, or one ``response`` + ``score`` per row grouped by prompt.
    Scored and ranked responses give pairs by ``pairs_from`` ("best_worst": the best against the
    worst; "all": every two) whose scores differ by more than ``score_margin``. Identical replies
    are invalid. ``system_prompt`` is prepended to prompts without a system message.
    """
    return _load(source, "pairs", columns, skip_invalid, max_rows, split, system_prompt, format, pairs_from,
                 score_margin)


def load_prompts(source: str, columns: Optional[dict] = None, skip_invalid: bool = False,
                 max_rows: int = 0, split: str = "train", system_prompt: Optional[str] = None,
                 **format_options) -> tuple[list[dict], LoadReport]:
    """Load PPO prompts as ``{"prompt": [... ending with a user turn]}`` rows.

    Per row, the first present of: ``prompt`` (text, an HH transcript, or a message list);
    ``messages`` (a message list); ``conversations`` (ShareGPT); ``instruction`` (+ ``input``, Alpaca);
    ``text`` (an HH transcript or plain text); ``chosen`` (an HH transcript or conversation, as in a pair
    file without a prompt column). Trailing assistant turns are dropped, so full conversations serve as
    prompts. ``system_prompt`` is prepended to prompts without a system
    message. Prompts are always detected: ``format_options`` (``format``, ``pairs_from``,
    ``score_margin``) are accepted and unused, so that ``loader_options`` serves every loader.
    """
    return _load(source, "prompts", columns, skip_invalid, max_rows, split, system_prompt)


def manifest_entry(source: str, report: LoadReport, split: str = "train", lengths=None) -> dict:
    """What a stage's manifest records about one data source: where, its hash, the load counts and,
    with a ``pipeline.data.lengths.LengthReport``, what happened to rows over the token limit."""
    entry = {"source": source, "sha256": data_hash(source, split), **report.manifest()}
    if lengths is not None:
        entry["long_rows"] = lengths.manifest()
    return entry


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
