"""Fast tests for pipeline/datagen.py: prompt construction, noisy labelling, and --quick mode."""
from __future__ import annotations

import json
import math
import random

import pytest

from pipeline import datagen


def _words(text: str) -> int:
    return len(text.split())


def test_prompt_pool_is_deduplicated_and_short():
    pool = datagen.prompt_pool()
    assert len(pool) >= 600
    keys = [" ".join(p.lower().split()) for p in pool]
    assert len(set(keys)) == len(keys)
    assert all(0 < _words(p) < 25 for p in pool)
    assert all(p[0].isupper() and p.rstrip()[-1] in ".?!" for p in pool)
    assert datagen.prompt_pool() == pool


def test_build_prompts_deterministic_splits():
    a = datagen.build_prompts(0)
    assert {k: len(v) for k, v in a.items()} == {"train": 300, "tune": 50, "reward": 302, "reward_eval": 90,
                                                "eval": 100}
    everything = [p for k in datagen.SPLIT_NAMES for p in a[k]]
    assert len(set(everything)) == 842  # disjoint splits
    assert datagen.build_prompts(0) == a
    b = datagen.build_prompts(1)
    assert b["train"] != a["train"]
    assert sorted(datagen.build_prompts(0, {"train": 3, "reward": 2, "eval": 1})["train"]) \
        == sorted(datagen.build_prompts(0, {"train": 3, "reward": 2, "eval": 1})["train"])
    with pytest.raises(ValueError):
        datagen.build_prompts(0, {"train": 10_000, "reward": 0, "eval": 0})


def test_derive_seed_is_stable():
    assert datagen.derive_seed(0, "x") == datagen.derive_seed(0, "x")
    assert datagen.derive_seed(0, "x") != datagen.derive_seed(1, "x")
    assert 0 <= datagen.derive_seed(123, "pairs/round0/7") < 2 ** 31


def _synthetic_items(n: int, seed: int = 0):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        ga, gb = round(rng.uniform(-1, 1), 4), round(rng.uniform(-1, 1), 4)
        items.append((f"p{i}", f"a{i}", f"b{i}", ga, gb))
    return items


def test_label_pair_orientation():
    row = datagen.label_pair("p", "good", "bad", 0.8, -0.2, flip=False)
    assert row == {"prompt": "p", "chosen": "good", "rejected": "bad", "gold_chosen": 0.8,
                   "gold_rejected": -0.2, "flipped": False}
    row = datagen.label_pair("p", "bad", "good", -0.2, 0.8, flip=True)
    assert (row["chosen"], row["rejected"], row["gold_chosen"], row["gold_rejected"], row["flipped"]) \
        == ("bad", "good", -0.2, 0.8, True)


def test_label_pair_records_styles_with_the_response():
    # b has the higher gold, so it is chosen; the flip swaps text, gold and style together
    row = datagen.label_pair("p", "meh", "yay", 0.1, 0.9, "dry", "upbeat", flip=False)
    assert (row["chosen"], row["style_chosen"], row["rejected"], row["style_rejected"]) == ("yay", "upbeat", "meh", "dry")
    row = datagen.label_pair("p", "meh", "yay", 0.1, 0.9, "dry", "upbeat", flip=True)
    assert (row["chosen"], row["gold_chosen"], row["style_chosen"]) == ("meh", 0.1, "dry")


def test_pair_candidates_gap_empty_and_identical():
    golds = [0.9, 0.5, None, 0.45, 0.85]
    texts = ["a", "b", "", "c", "A "]
    # |0.9-0.5|=0.4 ok; (0,2) empty; |0.9-0.45|=0.45 ok; (0,4) same text; |0.5-0.45|=0.05 < 0.1;
    # |0.5-0.85|=0.35 ok; |0.45-0.85|=0.4 ok
    assert datagen.pair_candidates(golds, texts, 0.1) == [(0, 1), (0, 3), (1, 4), (3, 4)]
    assert datagen.pair_candidates(golds, texts, 0.04) == [(0, 1), (0, 3), (1, 3), (1, 4), (3, 4)]
    assert datagen.pair_candidates(golds, texts, 0.41) == [(0, 3)]


def test_label_noise_deterministic_and_rate():
    items = _synthetic_items(5000)
    rows = datagen.label_pairs(items, 0.2, seed=0)
    assert rows == datagen.label_pairs(items, 0.2, seed=0)
    assert rows != datagen.label_pairs(items, 0.2, seed=1)
    rate = sum(r["flipped"] for r in rows) / len(rows)
    assert abs(rate - 0.2) < 0.03  # binomial sd ~0.006
    for r in rows:
        if r["gold_chosen"] != r["gold_rejected"]:
            # the gold-correct orientation is recoverable from `flipped`
            assert (r["gold_chosen"] > r["gold_rejected"]) == (not r["flipped"])
    assert not any(r["flipped"] for r in datagen.label_pairs(items, 0.0, seed=0))
    assert all(r["flipped"] for r in datagen.label_pairs(items, 1.0, seed=0))
    with pytest.raises(ValueError):
        datagen.label_pairs(items, 1.5, seed=0)


def test_tidy_trims_truncated_responses_only():
    text = "Start with a short walk every morning. It clears your head and sets the"
    assert datagen.tidy(text, ended=False) == ("Start with a short walk every morning.", True)
    assert datagen.tidy(text, ended=True) == (text, False)
    # a list marker is not a sentence end; too little left means keep as is
    assert datagen.tidy("Sure! Here is a plan: 1. Wake up 2. Stretch", ended=False)[1] is False
    assert datagen.tidy("", ended=False) == ("", False)


def test_quick_mode_writes_all_files(tmp_path):
    out = tmp_path / "data"
    argv = ["--quick", "--out", str(out), "--model", "embedded:tiny-random-llama", "--max-new-tokens", "8",
            "--seed", "3", "--batch-size", "8", "--threads", "1",  # 1 thread: steady on shared cores
            "--min-gap", "0"]  # the random model's text almost always has gold 0: pairs of any gap
    assert datagen.main(argv) == 0
    rows = {}
    for name in datagen.FILES:
        path = out / name
        assert path.is_file(), name
        rows[name] = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        assert rows[name], f"{name} is empty"
    sizes = datagen.QUICK_SPLITS
    assert len(rows["prompts_train.jsonl"]) == sizes["train"]
    assert len(rows["prompts_eval.jsonl"]) == sizes["eval"]
    for r in rows["prompts_train.jsonl"] + rows["prompts_eval.jsonl"]:
        assert set(r) == {"prompt"} and r["prompt"]
    train_prompts = [r["prompt"] for r in rows["prompts_train.jsonl"]]
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for r in rows[name]:
            assert set(r) == {"messages", "gold"}
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert assistant["content"].strip()
            assert -1.0 <= r["gold"] <= 1.0
    assert [r["messages"][0]["content"] for r in rows["sft_train.jsonl"]] == train_prompts
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl"):
        for r in rows[name]:
            assert set(r) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped",
                              "style_chosen", "style_rejected"}
            assert {r["style_chosen"], r["style_rejected"]} <= set(datagen.STYLES)
            assert r["style_chosen"] != r["style_rejected"]
            assert r["style_chosen"] in datagen.STYLES
            assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]
            assert isinstance(r["flipped"], bool)
            assert all(math.isfinite(r[k]) and -1 <= r[k] <= 1 for k in ("gold_chosen", "gold_rejected"))
            if r["gold_chosen"] != r["gold_rejected"]:
                assert (r["gold_chosen"] > r["gold_rejected"]) == (not r["flipped"])
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "--quick" in readme and "Apache-2.0" in readme
    # same seed, same files (generation is seeded per batch)
    again = tmp_path / "again"
    datagen.main(argv[:2] + [str(again)] + argv[3:])
    for name in datagen.FILES:
        assert (again / name).read_text() == (out / name).read_text(), name
    _check_with_loaders(out)


def _check_with_loaders(folder):
    from pipeline.data import loaders
    for name, loader in (("prompts_train.jsonl", loaders.load_prompts), ("prompts_tune.jsonl", loaders.load_prompts),
                         ("prompts_eval.jsonl", loaders.load_prompts),
                         ("sft_train.jsonl", loaders.load_sft), ("sft_eval.jsonl", loaders.load_sft),
                         ("pairs_train.jsonl", loaders.load_pairs), ("pairs_eval.jsonl", loaders.load_pairs)):
        rows, report = loader(str(folder / name))
        assert report.skipped == 0 and len(rows) == report.total, name


def test_committed_data_is_valid():
    """The shipped data/ (python -m pipeline.datagen --seed 0): counts, row format, loaders."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "data"
    rows = {n: [json.loads(line) for line in (folder / n).read_text(encoding="utf-8").split("\n") if line.strip()]
            for n in datagen.FILES}
    expected = {"prompts_train.jsonl": 300, "prompts_tune.jsonl": 50, "prompts_eval.jsonl": 100,
                "sft_train.jsonl": 300, "sft_eval.jsonl": 40}
    assert {n: len(rows[n]) for n in expected} == expected
    # the floor: at least 2,000 training and 300 held-out preference pairs
    assert len(rows["pairs_train.jsonl"]) >= 2000 and len(rows["pairs_eval.jsonl"]) >= 300
    splits = datagen.build_prompts(0)
    for name in ("train", "tune", "eval"):
        assert [r["prompt"] for r in rows[f"prompts_{name}.jsonl"]] == splits[name]
    assert {r["prompt"] for r in rows["pairs_train.jsonl"]} <= set(splits["train"] + splits["reward"])
    assert {r["prompt"] for r in rows["pairs_eval.jsonl"]} <= set(splits["reward_eval"])
    for r in rows["pairs_train.jsonl"] + rows["pairs_eval.jsonl"]:
        assert abs(r["gold_chosen"] - r["gold_rejected"]) >= 0.1
        assert (r["gold_chosen"] > r["gold_rejected"]) == (not r["flipped"])
    _check_with_loaders(folder)
