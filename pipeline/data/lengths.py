"""What a stage does with rows longer than its token limit (``data.long_rows``), and the counts it reports.

``truncate`` (the default) keeps a sequence's last ``max_length`` tokens: the start of the prompt goes
first, the prompt's end and the response stay; a response longer than the limit on its own loses its
start too (counted apart as ``response_cut``). ``drop`` leaves the row out. ``error`` stops at the first
such row, naming its file and row. One rule for every stage: SFT conversations (``sft.max_length``),
reward pairs in training and in held-out scoring (``reward.max_length``; a pair counts as long when
either of its two sequences is), PPO and eval prompts (``ppo.max_prompt_length``). trl's own rules
differ (SFTTrainer keeps a row's start, so the response goes first; RewardTrainer drops long pairs
and says so only in a progress-bar label), so trl is given untruncated rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

LONG_ROWS = ("truncate", "drop", "error")
IGNORE = -100  # label of a token without loss (transformers' convention)


@dataclass
class LengthReport:
    """How many of a stage's ``rows`` were longer than ``limit`` = ``max_length`` tokens and what was
    done about it (``policy``); ``longest`` is the longest sequence before fitting."""
    what: str
    limit: str
    max_length: int
    policy: str
    rows: int = 0
    over: int = 0
    truncated: int = 0
    response_cut: int = 0
    dropped: int = 0
    longest: int = 0

    def summary(self) -> str:
        text = f"{self.what}: {self.over} of {self.rows} longer than {self.limit}={self.max_length} tokens " \
               f"(longest {self.longest})"
        if self.truncated:
            text += f"; {self.truncated} truncated from the left (data.long_rows=truncate)"
            if self.response_cut:
                text += f", {self.response_cut} of them lost tokens of the response itself"
        if self.dropped:
            text += f"; {self.dropped} dropped (data.long_rows=drop)"
        return text

    def manifest(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "what"}

    def metrics(self, prefix: str) -> dict:
        """Flat metrics: ``<prefix>_rows_over_length``, ``_rows_truncated``, ``_rows_response_cut``, ``_rows_dropped_long``."""
        return {f"{prefix}_rows_over_length": self.over, f"{prefix}_rows_truncated": self.truncated,
                f"{prefix}_rows_response_cut": self.response_cut, f"{prefix}_rows_dropped_long": self.dropped}


def plan_cuts(rows: Sequence[Sequence[tuple[int, int]]], max_length: int, policy: str, what: str, limit: str,
              name_row: Callable[[int], str]) -> tuple[list[Optional[list[int]]], LengthReport]:
    """Per row, how many tokens to cut from the left of each of its sequences, or None for a dropped row.

    A row is one or more sequences ``(length, response_start)`` fitted together (a reward pair's chosen
    and rejected); ``response_start`` is the index of the first response token (the length for a
    prompt). With ``policy`` "error" the first long row raises ``pipeline.data.loaders.DataError`` naming it
    by ``name_row(index)``. Example, max_length 10, rows [[(8, 5)], [(14, 6)], [(12, 1)]]:
    truncate -> [[0], [4], [2]], 2 truncated, the third's response loses 2 - 1 = 1 token (response_cut
    1), longest 14; drop -> [[0], None, None], 2 dropped.
    """
    if policy not in LONG_ROWS:
        raise ValueError(f"policy must be one of {LONG_ROWS}, got {policy!r}")
    report = LengthReport(what, limit, max_length, policy, rows=len(rows))
    cuts: list[Optional[list[int]]] = []
    for i, seqs in enumerate(rows):
        longest = max(n for n, _ in seqs)
        report.longest = max(report.longest, longest)
        if longest <= max_length:
            cuts.append([0] * len(seqs))
            continue
        report.over += 1
        if policy == "error":
            from pipeline.data.loaders import DataError

            raise DataError(f"{name_row(i)}: {longest} tokens, longer than {limit}={max_length} ({what}; "
                            f"data.long_rows=error). Raise {limit}, or set data.long_rows=truncate to cut such rows "
                            f"from the left or data.long_rows=drop to leave them out")
        if policy == "drop":
            report.dropped += 1
            cuts.append(None)
            continue
        cut = [max(n - max_length, 0) for n, _ in seqs]
        report.truncated += 1
        report.response_cut += any(c > start for c, (_, start) in zip(cut, seqs))
        cuts.append(cut)
    if rows and report.dropped == len(rows):
        from pipeline.data.loaders import DataError

        raise DataError(f"{what}: all {len(rows)} are longer than {limit}={max_length} and were dropped "
                        f"(data.long_rows=drop); raise {limit} or set data.long_rows=truncate")
    return cuts, report


def response_start(labels: Sequence[int]) -> int:
    """Index where the last run of trained tokens (labels other than -100) starts: the final reply.
    E.g. labels (-100, -100, 5, 6, -100, 7, 8, -100) -> 5."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i


def fit_token_rows(dataset, max_length: int, policy: str, what: str, limit: str,
                   name_row: Callable[[int], str]):
    """A tokenized ``datasets.Dataset`` (``input_ids``, ``labels``, as trl's SFTTrainer prepares it)
    fitted to ``max_length`` by ``policy``; returns ``(dataset with input_ids and labels, LengthReport)``."""
    from datasets import Dataset

    ids, labels = dataset["input_ids"], dataset["labels"]
    cuts, report = plan_cuts([[(len(x), response_start(y))] for x, y in zip(ids, labels)], max_length, policy,
                             what, limit, name_row)
    kept = [(x[c[0]:], y[c[0]:]) for x, y, c in zip(ids, labels, cuts) if c is not None]
    return Dataset.from_dict({"input_ids": [k[0] for k in kept], "labels": [k[1] for k in kept]}), report


def fit_prompt_ids(encoded: Sequence[list[int]], max_length: int, policy: str, what: str, limit: str,
                   name_row: Callable[[int], str]) -> tuple[list[int], list[list[int]], LengthReport]:
    """Prompt token ids fitted to ``max_length``: ``(indices of the kept prompts, their ids, LengthReport)``."""
    cuts, report = plan_cuts([[(len(x), len(x))] for x in encoded], max_length, policy, what, limit, name_row)
    kept = [i for i, c in enumerate(cuts) if c is not None]
    return kept, [list(encoded[i][cuts[i][0]:]) for i in kept], report
