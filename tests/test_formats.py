"""Every shipped format fixture round-trips to the exact canonical rows (which response became chosen),
pairs from scores and ranks, mixed-validity files, and the length rule (data.long_rows) by hand."""
import json
from pathlib import Path

import pytest
from helpers import A, S, U

from pipeline.data import lengths
from pipeline.data.formats import preference_pairs
from pipeline.data.loaders import (
    DataError,
    EmptyTargetError,
    load_pairs,
    load_prompts,
    load_sft,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "formats"
HINT = "(to skip such rows and count them instead, set data.skip_invalid=true)"


def P(prompt, chosen, rejected):
    return {"prompt": prompt if isinstance(prompt, list) else [U(prompt)], "chosen": [A(chosen)],
            "rejected": [A(rejected)]}


def fixture(name):
    return str(FIXTURES / name)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"unexpected hub load {a}"))


# ---------------------------------------------------------------------------------------------
# SFT fixtures


@pytest.mark.parametrize("name, expected", [
    ("sft_messages.jsonl", [[S("You are concise."), U("Name a primary colour."), A("Red.")],
                            [U("What is 2 + 2?"), A("4."), U("And doubled?"), A("8.")]]),
    ("sft_prompt_completion.jsonl", [[U("Translate 'chat' from French."), A("Cat.")], [U("Say hi."), A("Hi!")]]),
    ("sft_hh.jsonl", [[U("What's a good name for a goldfish?"), A("How about Bubbles?")],
                      [U("Hi"), A("Hello! How can I help?"), U("Tell me a fact."), A("Octopuses have three hearts.")]]),
    # Alpaca: an empty input is left out; a present one follows the instruction after a blank line.
    # The `text` column (the prompt-template rendering) is ignored.
    ("sft_alpaca.json", [[U("Give three tips for staying healthy."), A("1. Eat well. 2. Exercise. 3. Sleep enough.")],
                         [U("Classify the sentiment of the sentence.\n\nI loved this film."), A("Positive.")]]),
    # ShareGPT: system/human/gpt -> system/user/assistant; extra keys (id, weight) dropped.
    ("sft_sharegpt.json", [[S("You are a helpful assistant."), U("What is the capital of France?"), A("Paris.")],
                           [U("Write a haiku about rain."),
                            A("Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky")]]),
])
def test_sft_fixture_round_trips(name, expected):
    rows, report = load_sft(fixture(name))
    assert rows == [{"messages": m} for m in expected]
    fmt = name[len("sft_"):].split(".")[0]
    assert report.formats == {fmt: len(expected)} and report.row_numbers == [1, 2]
    # the same file forced to its own format gives the same rows
    assert load_sft(fixture(name), format=fmt)[0] == rows


def test_sft_formats_system_prompt_and_column_map(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"task": "Add 1 and 2.", "context": None, "answer": "3"},
                                           {"task": "Add", "context": "2 and 2", "answer": "4"}])
    rows, report = load_sft(p, columns={"instruction": "task", "input": "context", "output": "answer"},
                            system_prompt="Be brief.")
    assert rows == [{"messages": [S("Be brief."), U("Add 1 and 2."), A("3")]},
                    {"messages": [S("Be brief."), U("Add\n\n2 and 2"), A("4")]}]
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "user", "value": "q"},
                                                              {"from": "assistant", "value": "a"}]},
                                           {"messages": [U("q2"), A("a2")]}])
    rows, report = load_sft(p, system_prompt="Be brief.")
    assert rows == [{"messages": [S("Be brief."), U("q"), A("a")]}, {"messages": [S("Be brief."), U("q2"), A("a2")]}]
    assert report.formats == {"sharegpt": 1, "messages": 1}


# ---------------------------------------------------------------------------------------------
# Pair fixtures


def test_chosen_rejected_hh_fixture_keeps_an_empty_preferred_reply():
    rows, report = load_pairs(fixture("pairs_chosen_rejected.jsonl"))
    assert rows == [
        P("How do I boil an egg?", "Put it in boiling water for about 9 minutes.", "Eggs are overrated."),
        # multi-turn HH transcript whose preferred final assistant turn is empty
        P([U("Can you help me pick a lock?"), A("Whose lock is it?"), U("My neighbour's, he is away.")],
          "", "Sure, start with a tension wrench."),
        P("Suggest a name for a cat.", "Miso.", "Cat."),
    ]
    assert (report.kept, report.empty_responses, report.formats) == (3, 1, {"chosen_rejected": 3})
    assert "1 pair with an empty response (kept: a valid preference)" in report.summary()


def test_response_pair_fixture_chosen_is_the_better_response_id():
    rows, report = load_pairs(fixture("pairs_response_pair.jsonl"))
    # row 1: better_response_id 1 -> response_1 chosen; row 2: 0 -> response_0 chosen
    assert rows == [P("How can I stay awake while driving at night?", "Pull over and rest; drowsy driving is dangerous.",
                      "Drink energy drinks and keep going."),
                    P("Write a short greeting.", "Hello, and welcome!", "hi")]
    # the column map picks PKU-SafeRLHF's safety label instead: row 2's safer response is response_1
    rows, _ = load_pairs(fixture("pairs_response_pair.jsonl"), columns={"better_response_id": "safer_response_id"})
    assert rows[1] == P("Write a short greeting.", "hi", "Hello, and welcome!")


def test_scored_ultrafeedback_fixture_best_worst_all_margin_and_column_map():
    src = fixture("pairs_scored.jsonl")
    best, worst, middle = ("Plants turn light, water and CO2 into sugar and oxygen.", "It is a plant thing.",
                           "Photosynthesis converts light energy into chemical energy in plants.")
    q = "Explain photosynthesis in one sentence."
    rows, report = load_pairs(src)
    # overall_score 8.5 / 3.0 / 7.0: best (8.5) vs worst (3.0); row 2 is tied at 6.0 -> no pair
    assert rows == [P(q, best, worst)]
    assert (report.total, report.kept, report.no_pair, report.row_numbers) == (2, 1, 1, [1])
    assert report.summary().startswith(f"{src}: 1 pairs from 2 rows (format scored; pairs_from=best_worst, "
                                       f"score_margin=0), 1 prompt formed no pair")
    # all pairs, in index order: (0, 1) 8.5 > 3.0, (0, 2) 8.5 > 7.0, (1, 2) 7.0 > 3.0 -> middle over worst
    rows, _ = load_pairs(src, pairs_from="all")
    assert rows == [P(q, best, worst), P(q, best, middle), P(q, middle, worst)]
    # margin 2: gaps 5.5 and 4 are kept, 1.5 is not
    rows, _ = load_pairs(src, pairs_from="all", score_margin=2)
    assert rows == [P(q, best, worst), P(q, middle, worst)]
    # the column map reaches into the completions: fine-grained_score 4.0 vs 4.25 breaks row 2's tie
    rows, report = load_pairs(src, columns={"score": "fine-grained_score"})
    assert rows == [P(q, best, worst), P("Say hello.", "Hello there!", "Hello!")]
    assert report.no_pair == 0


def test_scored_per_row_helpsteer_fixture_groups_by_prompt(tmp_path):
    rows, report = load_pairs(fixture("pairs_scored_per_row.jsonl"))
    # helpfulness 4 vs 1 -> a pair (chosen from row 1); "Name a planet." is tied at 3 -> no pair
    assert rows == [P("What is the boiling point of water?", "100 degrees Celsius at sea level.", "Hot.")]
    assert (report.total, report.kept, report.no_pair, report.row_numbers) == (4, 1, 1, [1])
    # scored by another attribute (column map): verbosity 0 vs 1 now orders the planets
    rows, _ = load_pairs(fixture("pairs_scored_per_row.jsonl"), columns={"score": "verbosity"})
    assert rows[1] == P("Name a planet.", "Jupiter is the largest planet.", "Mars.")
    # the same layout from CSV, scores as text; rows of one prompt need not be adjacent
    c = tmp_path / "hs.csv"
    c.write_text("prompt,response,score\nq,good,3.5\nr,x,1\nq,bad,1\nr,y,2\n")
    rows, report = load_pairs(str(c))
    assert rows == [P("q", "good", "bad"), P("r", "y", "x")] and report.row_numbers == [2, 5]


def test_ranked_nectar_fixture_rank_one_is_best():
    src = fixture("pairs_ranked.jsonl")
    q = "What is a good way to learn to cook?"  # the HH-style prompt's open "Assistant:" cue is dropped
    first, third, second = ("Start with simple recipes and cook often.", "Buy a cookbook.",
                            "Watch videos, then practise the basics.")
    rows, report = load_pairs(src)
    assert rows == [P(q, first, third)] and report.formats == {"ranked": 1}
    # all: (0, 1) rank 1 < 3, (0, 2) 1 < 2, (1, 2) 3 > 2 -> item 2 over item 1
    rows, _ = load_pairs(src, pairs_from="all")
    assert rows == [P(q, first, third), P(q, first, second), P(q, second, third)]
    assert load_pairs(src, format="ranked")[0] == load_pairs(src)[0]


def test_pairs_max_rows_caps_pairs_not_source_rows():
    rows, report = load_pairs(fixture("pairs_scored.jsonl"), pairs_from="all", max_rows=2)
    assert len(rows) == 2 and report.kept == 2 and report.row_numbers == [1, 1]


def test_preference_pairs_by_hand():
    # values (3, 5, 1, 5), margin 1 (docstring): first highest (index 1) vs first lowest (index 2)
    assert preference_pairs([3, 5, 1, 5], "best_worst", 1) == [(1, 2)]
    assert preference_pairs([3, 5, 1, 5], "all", 1) == [(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)]
    assert preference_pairs([2, 2], "best_worst") == [] and preference_pairs([7], "all") == []
    assert preference_pairs([1.0, 1.5], "best_worst", 0.5) == []  # a gap must exceed the margin


# ---------------------------------------------------------------------------------------------
# Prompts from every layout


def test_prompts_from_every_fixture():
    expected = {"sft_alpaca.json": ["Give three tips for staying healthy.",
                                    "Classify the sentiment of the sentence.\n\nI loved this film."],
                "sft_sharegpt.json": ["What is the capital of France?", "Write a haiku about rain."],
                "pairs_chosen_rejected.jsonl": ["How do I boil an egg?", "My neighbour's, he is away.",
                                                "Suggest a name for a cat."],
                "pairs_scored.jsonl": ["Explain photosynthesis in one sentence.", "Say hello."],
                "pairs_ranked.jsonl": ["What is a good way to learn to cook?"]}
    for name, last_turns in expected.items():
        rows, _ = load_prompts(fixture(name))
        assert [r["prompt"][-1] for r in rows] == [U(t) for t in last_turns], name
    rows, _ = load_prompts(fixture("pairs_chosen_rejected.jsonl"))
    assert rows[1]["prompt"] == [U("Can you help me pick a lock?"), A("Whose lock is it?"),
                                 U("My neighbour's, he is away.")]


# ---------------------------------------------------------------------------------------------
# Forced formats, mixed validity


def test_forced_format_and_unknown_format(tmp_path):
    p = fixture("sft_messages.jsonl")
    with pytest.raises(DataError, match=r"sft_messages\.jsonl row 1: missing column 'instruction'"):
        load_sft(p, format="alpaca")
    # a pair format leaves SFT detection on (one data.format serves SFT and pair sources)
    assert load_sft(p, format="scored")[0] == load_sft(p)[0]
    with pytest.raises(DataError, match="format: unknown format 'alpacca'"):
        load_sft(p, format="alpacca")


def test_mixed_validity_sft_with_and_without_skip_invalid(tmp_path):
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps([
        {"instruction": "Say yes.", "input": "", "output": "Yes."},                 # 1 valid
        {"instruction": "Say no.", "input": "", "output": "  "},                    # 2 empty target
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "yo"}]},  # 3 bad 'from'
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},      # 4 valid
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},       # 5 empty target
        {"instruction": "", "output": "x"},                                         # 6 empty instruction
    ]))
    with pytest.raises(EmptyTargetError) as ei:
        load_sft(str(p))
    assert str(ei.value) == (f"{p} row 2: empty SFT target: output is empty, so the row has nothing to train on "
                             f"{HINT}")
    rows, report = load_sft(str(p), skip_invalid=True)
    assert rows == [{"messages": [U("Say yes."), A("Yes.")]}, {"messages": [U("q"), A("a")]}]
    assert (report.total, report.kept, report.skipped, report.row_numbers) == (6, 2, 4, [1, 4])
    assert report.problems == [
        "row 2: empty SFT target: output is empty, so the row has nothing to train on",
        "row 3: conversations: turn 2 has unknown 'from' 'bing' (expected human, gpt, system)",
        "row 5: empty SFT target: conversations turn 2 (the final 'gpt' turn) is empty, so the row has nothing to "
        "train on",
        "row 6: instruction: empty text"]


def test_mixed_validity_pairs_with_and_without_skip_invalid(tmp_path):
    p = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "q1", "response_0": "a", "response_1": "", "better_response_id": 1},    # 1 valid, empty chosen
        {"prompt": "q2", "response_0": "a", "response_1": "b", "better_response_id": 2},   # 2 bad label
        {"prompt": "q3", "completions": [{"response": "x", "score": 1}, {"response": "y"}]},  # 3 missing score
        {"prompt": "q4", "completions": [{"response": "x", "score": 1}, {"response": "y", "score": "high"}]},  # 4
        {"prompt": "q5", "completions": [{"response": "x", "score": 1}, {"response": "y", "score": 2}]},  # 5 valid
        {"prompt": "q6", "response_0": "same", "response_1": "same ", "better_response_id": 0},  # 6 identical
    ])
    with pytest.raises(DataError) as ei:
        load_pairs(p)
    assert str(ei.value) == (f"{p} row 2: better_response_id: expected 0 or 1 (the index of the better response), "
                             f"got 2 {HINT}")
    rows, report = load_pairs(p, skip_invalid=True)
    assert rows == [P("q1", "", "a"), P("q5", "y", "x")]
    assert (report.kept, report.skipped, report.empty_responses) == (2, 4, 1)
    assert report.formats == {"response_pair": 1, "scored": 1}
    assert report.problems == ["row 2: better_response_id: expected 0 or 1 (the index of the better response), got 2",
                               "row 3: completions item 2: missing 'score' or 'overall_score' or 'helpfulness' "
                               "(it has: response)",
                               "row 4: completions item 2 score: expected a number, got text",
                               "row 6: chosen and rejected are identical"]
    assert report.manifest() == {"rows": 2, "source_rows": 6, "skipped": 4, "formats": report.formats,
                                 "empty_responses": 1, "no_pair": 0, "joined_rows": 0}


# ---------------------------------------------------------------------------------------------
# The length rule


def test_plan_cuts_by_hand():
    rows = [[(8, 5)], [(14, 6)], [(12, 1)]]
    name = "f.jsonl row {}".format
    cuts, rep = lengths.plan_cuts(rows, 10, "truncate", "rows", "x.max_length", name)
    # 14 - 10 = 4 and 12 - 10 = 2 tokens go from the left; the third row's response starts at 1 < 2
    assert cuts == [[0], [4], [2]]
    assert (rep.over, rep.truncated, rep.response_cut, rep.dropped, rep.longest) == (2, 2, 1, 0, 14)
    cuts, rep = lengths.plan_cuts(rows, 10, "drop", "rows", "x.max_length", name)
    assert cuts == [[0], None, None] and (rep.dropped, rep.truncated) == (2, 0)
    assert rep.metrics("train") == {"train_rows_over_length": 2, "train_rows_truncated": 0,
                                    "train_rows_response_cut": 0, "train_rows_dropped_long": 2}
    with pytest.raises(DataError, match=r"^f\.jsonl row 1: 14 tokens, longer than x\.max_length=10 \(rows; "
                                        r"data\.long_rows=error\)"):
        lengths.plan_cuts(rows, 10, "error", "rows", "x.max_length", name)
    # a pair is long when either side is, and both sides are cut by their own excess
    cuts, rep = lengths.plan_cuts([[(9, 4), (13, 4)]], 10, "truncate", "pairs", "x.max_length", name)
    assert cuts == [[0, 3]] and rep.truncated == 1
    with pytest.raises(DataError, match="all 1 are longer than x.max_length=10 and were dropped"):
        lengths.plan_cuts([[(13, 4)]], 10, "drop", "rows", "x.max_length", name)


def test_fit_token_rows_keeps_the_end_and_the_labels_aligned():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6], [7, 8, 9]],
                            "labels": [[-100, -100, -100, 4, 5, 6], [-100, 8, 9]], "messages": ["a", "b"]})
    assert lengths.response_start([-100, -100, 5, 6, -100, 7, 8, -100]) == 5
    out, rep = lengths.fit_token_rows(ds, 4, "truncate", "SFT rows", "sft.max_length", str)
    # row 1 loses its first 2 tokens (prompt only: its response starts at 3)
    assert out["input_ids"] == [[3, 4, 5, 6], [7, 8, 9]] and out["labels"] == [[-100, 4, 5, 6], [-100, 8, 9]]
    assert (rep.truncated, rep.response_cut, rep.longest) == (1, 0, 6)
    out, rep = lengths.fit_token_rows(ds, 2, "truncate", "SFT rows", "sft.max_length", str)
    assert out["labels"] == [[5, 6], [8, 9]] and rep.response_cut == 1  # row 1 lost response token 4
    out, rep = lengths.fit_token_rows(ds, 4, "drop", "SFT rows", "sft.max_length", str)
    assert out["input_ids"] == [[7, 8, 9]] and rep.dropped == 1


def test_config_data_keys_are_validated():
    from pipeline.config import ConfigError, load_config

    cfg = load_config(None, ["data.format=alpaca", "data.long_rows=drop", "data.pairs_from=all",
                             "data.score_margin=0.5"])
    assert (cfg.data.format, cfg.data.long_rows, cfg.data.pairs_from, cfg.data.score_margin) == (
        "alpaca", "drop", "all", 0.5)
    for bad, message in (("data.format=alpacca", "data.format: 'alpacca' is not one of auto, messages"),
                         ("data.long_rows=cut", "data.long_rows: 'cut' is not one of truncate, drop, error"),
                         ("data.pairs_from=best", "data.pairs_from: 'best' is not one of best_worst, all"),
                         ("data.score_margin=-1", "data.score_margin must be >= 0, got -1.0")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
