"""Rule-based built-in rewards on the response text: sentiment, length, regex, keyword, repetition."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

__all__ = ["KeywordReward", "LengthReward", "RegexReward", "RepetitionReward", "SentimentReward", "seq_rep"]


def _weights(arg_name: str, value) -> dict[str, float]:
    """``{item: weight}`` from a mapping, or weight 1 for each item of a list."""
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = dict.fromkeys(value, 1.0)
    else:
        raise TypeError(f"{arg_name} must be a mapping {{text: weight}} or a list of strings, "
                        f"got {type(value).__name__}")
    if not items:
        raise ValueError(f"{arg_name} is empty")
    out = {}
    for key, weight in items.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{arg_name} entries must be non-empty strings, got {key!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight):
            raise TypeError(f"{arg_name}[{key!r}] must be a finite number, got {weight!r}")
        out[key] = float(weight)
    return out


class SentimentReward:
    """VADER compound sentiment of the response, in [-1, 1] (vaderSentiment, offline)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts, responses, **info) -> list[float]:
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


class LengthReward:
    """Closeness of the response length to a target: ``-abs(length - target) / scale``.

    Args:
        target: the wanted length (>= 0).
        unit: ``"words"`` (``len(response.split())``) or ``"tokens"``: ``len(response_ids[i])``
            when the host passes ``response_ids``, else the count from ``tokenizer`` in info
            (without special tokens); neither is an error.
        scale: divisor, default ``target``; so by default the score is 0 at the target and
            -1 at twice (or zero times) the target.
    """

    def __init__(self, target: int, unit: str = "words", scale: float | None = None):
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a non-negative integer, got {target!r}")
        if unit not in ("words", "tokens"):
            raise ValueError(f"unit must be 'words' or 'tokens', got {unit!r}")
        scale = target if scale is None else scale
        if not scale > 0:
            raise ValueError(f"scale must be positive (it defaults to target), got {scale!r}")
        self.target = target
        self.unit = unit
        self.scale = float(scale)

    def _lengths(self, responses, info) -> list[int]:
        if self.unit == "words":
            return [len(r.split()) for r in responses]
        if info.get("response_ids") is not None:
            return [len(ids) for ids in info["response_ids"]]
        if info.get("tokenizer") is not None:
            tok = info["tokenizer"]
            return [len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses]
        raise ValueError("unit='tokens' needs response_ids or a tokenizer from the host; "
                         "none was passed (use unit='words' outside the rlhf host)")

    def __call__(self, prompts, responses, **info) -> list[float]:
        return [-abs(n - self.target) / self.scale for n in self._lengths(responses, info)]


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE,
          "a": re.ASCII}


class RegexReward:
    """Sum of the weights of the patterns found (``re.search``) in the response.

    Args:
        patterns: ``{pattern: weight}``, or a list of patterns (weight 1 each).
        flags: letters from ``imsxa`` (ignorecase, multiline, dotall, verbose, ascii).
    """

    def __init__(self, patterns, flags: str = ""):
        unknown = sorted(set(flags) - set(_FLAGS))
        if unknown:
            raise ValueError(f"unknown regex flags {unknown}; valid: {''.join(_FLAGS)}")
        combined = 0
        for letter in flags:
            combined |= _FLAGS[letter]
        self._rules = []
        for pattern, weight in _weights("patterns", patterns).items():
            try:
                self._rules.append((re.compile(pattern, combined), weight))
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc

    def __call__(self, prompts, responses, **info) -> list[float]:
        return [sum((w for rx, w in self._rules if rx.search(r)), 0.0) for r in responses]


class KeywordReward:
    """Sum of the weights of the keywords present in the response.

    Presence, not counts: a keyword that occurs three times adds its weight once.

    Args:
        keywords: ``{keyword: weight}``, or a list of keywords (weight 1 each).
        case_sensitive: default False.
        whole_word: default True: the keyword must not be preceded or followed by a word
            character, so "cat" does not match "category" (a keyword may itself contain spaces
            or punctuation, e.g. "thank you" or "c++").
    """

    def __init__(self, keywords, case_sensitive: bool = False, whole_word: bool = True):
        flags = 0 if case_sensitive else re.IGNORECASE
        self._rules = []
        for keyword, weight in _weights("keywords", keywords).items():
            pattern = re.escape(keyword)
            if whole_word:
                pattern = rf"(?<!\w){pattern}(?!\w)"
            self._rules.append((re.compile(pattern, flags), weight))

    def __call__(self, prompts, responses, **info) -> list[float]:
        return [sum((w for rx, w in self._rules if rx.search(r)), 0.0) for r in responses]


_TOKEN = re.compile(r"\w+|[^\w\s]")


def seq_rep(text: str, n: int) -> float:
    """seq-rep-n of Welleck et al. 2019 ("Neural text generation with unlikelihood training", sec. 5):
    the share of the text's n-grams that repeat an earlier one, ``1 - unique / total``, over lower-cased
    word and punctuation tokens (each punctuation mark a token). 0 for fewer than n tokens.
    "go go go go" with n=2: bigrams (go go) x3, unique 1 -> 1 - 1/3 = 0.667."""
    tokens = _TOKEN.findall(text.lower())
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class RepetitionReward:
    """How much of the response repeats itself: seq-rep-n (:func:`seq_rep`), in [0, 1); 0 for text
    with no repeated n-gram. Weighted negatively it penalises degenerate loops ("great great great",
    "!!!!!") the way a reader would, without judging what the text says.

    Args:
        n: n-gram length, default 4 (Welleck et al. 2019 report seq-rep-4).
    """

    def __init__(self, n: int = 4):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n = n

    def __call__(self, prompts, responses, **info) -> list[float]:
        return [seq_rep(r, self.n) for r in responses]
