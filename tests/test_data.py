"""Tests for pipeline/data/loaders.py: every accepted format, every rejection, and the exact rows produced."""
import csv
import hashlib
import json

import pytest
from helpers import A, S, U

from pipeline.data import loaders
from pipeline.data.loaders import (
    DataError,
    LoadReport,
    data_hash,
    load_pairs,
    load_prompts,
    load_sft,
    parse_hh,
    read_rows,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, header, records):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(records)
    return str(path)


def write_parquet(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


HH_SFT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Great."
HH_SFT_MESSAGES = [U("Hi there"), A("Hello!"), U("How are you?"), A("Great.")]


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """A test that reaches the hub by mistake fails at once instead of retrying the network."""
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError(f"unexpected hub load: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", fail)


# ---------------------------------------------------------------------------------------------
# parse_hh


def test_parse_hh_multi_turn_strips_each_turn():
    assert parse_hh(HH_SFT) == HH_SFT_MESSAGES
    # No leading blank line, extra spaces and inner newlines: turn text is stripped, inner text kept.
    assert parse_hh("Human:   a\nb  \n\nAssistant:  c ") == [U("a\nb"), A("c")]


def test_parse_hh_drops_the_open_assistant_cue_of_a_prompt():
    assert parse_hh("\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:") == [U("q1"), A("a1"), U("q2")]


@pytest.mark.parametrize("text, problem", [
    ("Hello there", "has no 'Human:' turn"),
    ("\n\nAssistant: hi", "has no 'Human:' turn"),
    ("\n\nAssistant: hi\n\nHuman: yo", "must start with 'Human:'"),
    ("preamble\n\nHuman: hi\n\nAssistant: yo", "text before its first turn marker"),
    ("\n\nHuman:  \n\nAssistant: b", "turn 1 ('Human:') is empty"),
    ("\n\nHuman: a\n\nAssistant:\n\nHuman: c", "turn 2 ('Assistant:') is empty"),
])
def test_parse_hh_rejects_malformed_transcripts(text, problem):
    with pytest.raises(DataError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_hh(text)


# ---------------------------------------------------------------------------------------------
# read_rows


def test_read_rows_jsonl_row_numbers_are_line_numbers(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\n{"a": 3}\n')
    assert read_rows(str(p)) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]
    assert read_rows(str(p), max_rows=2) == [(1, {"a": 1}), (4, {"a": 2})]


def test_read_rows_json_list_and_data_wrapper(tmp_path):
    p1, p2 = tmp_path / "l.json", tmp_path / "d.json"
    p1.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    p2.write_text(json.dumps({"data": [{"a": 1}, {"a": 2}], "version": 3}))
    assert read_rows(str(p1)) == read_rows(str(p2)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_read_rows_json_file_holding_json_lines(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_rows(str(p)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_read_rows_json_wrong_top_level(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"rows": [{"a": 1}]}))
    with pytest.raises(DataError, match=r'o\.json: expected a JSON list of objects or \{"data"'):
        read_rows(str(p))


def test_read_rows_csv_values_are_strings_and_rows_are_start_lines(tmp_path):
    p = write_csv(tmp_path / "r.csv", ["prompt", "n"], [["one", 1], ["two\nlines", 2], ["three", 3]])
    # Header is line 1; the second record spans lines 3-4, so the third starts on line 5.
    assert read_rows(p) == [(2, {"prompt": "one", "n": "1"}), (3, {"prompt": "two\nlines", "n": "2"}),
                            (5, {"prompt": "three", "n": "3"})]


def test_read_rows_parquet(tmp_path):
    p = write_parquet(tmp_path / "r.parquet", [{"a": 1, "m": [U("x")]}, {"a": 2, "m": [A("y")]}])
    assert read_rows(p) == [(1, {"a": 1, "m": [U("x")]}), (2, {"a": 2, "m": [A("y")]})]


def test_read_rows_reports_unreadable_rows(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": \n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: invalid JSON"):
        read_rows(str(p))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: expected a JSON object, got list"):
        read_rows(str(p))


# ---------------------------------------------------------------------------------------------
# load_sft


def test_sft_messages_jsonl_drops_extra_keys(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "Hi", "name": "bob"}, {"role": "assistant", "content": " Yo "}],
         "id": 7},
        {"messages": [S("Be brief."), U("q"), A("a"), U("q2"), A("a2")]},
    ])
    rows, report = load_sft(p)
    assert rows == [{"messages": [U("Hi"), A(" Yo ")]},
                    {"messages": [S("Be brief."), U("q"), A("a"), U("q2"), A("a2")]}]
    assert report == LoadReport(source=p, total=2, kept=2, skipped=0, problems=[], formats={"messages": 2},
                                row_numbers=[1, 2])


def test_sft_prompt_completion_text_and_messages(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "What is 2+2?", "completion": "4"},
        {"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "completion": [A("a2")]},
        {"prompt": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:", "completion": "a2"},
    ])
    rows, _ = load_sft(p)
    assert rows == [{"messages": [U("What is 2+2?"), A("4")]},
                    {"messages": [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")]},
                    {"messages": [U("q1"), A("a1"), U("q2"), A("a2")]}]


def test_sft_hh_text_multi_turn(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"text": HH_SFT}])
    rows, _ = load_sft(p)
    assert rows == [{"messages": HH_SFT_MESSAGES}]


def test_sft_formats_are_detected_per_row(tmp_path):
    p = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "\n\nHuman: a\n\nAssistant: b"},
        {"prompt": "c", "completion": "d"},
        {"messages": [U("e"), A("f")]},
    ])
    rows, _ = load_sft(p)
    assert [r["messages"] for r in rows] == [[U("a"), A("b")], [U("c"), A("d")], [U("e"), A("f")]]


def test_sft_json_csv_parquet(tmp_path):
    expected = [{"messages": [U("q1"), A("a1")]}, {"messages": [U("q2"), A("a2")]}]
    j = tmp_path / "sft.json"
    j.write_text(json.dumps({"data": [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}]}))
    c = write_csv(tmp_path / "sft.csv", ["prompt", "completion"], [["q1", "a1"], ["q2", "a2"]])
    c2 = write_csv(tmp_path / "msgs.csv", ["messages"],
                   [[json.dumps([U("q1"), A("a1")])], [json.dumps([U("q2"), A("a2")])]])
    pq = write_parquet(tmp_path / "sft.parquet", [{"messages": [U("q1"), A("a1")]}, {"messages": [U("q2"), A("a2")]}])
    pq2 = write_parquet(tmp_path / "pc.parquet", [{"prompt": "q1", "completion": "a1"},
                                                  {"prompt": "q2", "completion": "a2"}])
    for source in (str(j), c, c2, pq, pq2):
        rows, report = load_sft(source)
        assert rows == expected, source
        assert (report.total, report.kept, report.skipped) == (2, 2, 0)


def test_sft_column_mapping(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "prompt": "ignored"}])
    rows, _ = load_sft(p, columns={"prompt": "question", "completion": "answer"})
    assert rows == [{"messages": [U("q"), A("a")]}]
    # Entries for columns this loader does not use (chosen) are ignored.
    rows, _ = load_sft(p, columns={"prompt": "question", "completion": "answer", "chosen": "x"})
    assert rows == [{"messages": [U("q"), A("a")]}]


def test_column_mapping_names_a_missing_column(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "reply": "a"}])
    with pytest.raises(DataError, match=r"qa\.jsonl row 2: missing column 'answer' \(mapped to 'completion'\)"):
        load_sft(p, columns={"prompt": "question", "completion": "answer"})


def test_column_mapping_unknown_canonical_name(tmp_path):
    p = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="columns: unknown canonical column 'answer'"):
        load_sft(p, columns={"answer": "answer"})


def test_sft_system_prompt_prepended_only_when_missing(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "q", "completion": "a"},
        {"messages": [S("own"), U("q"), A("a")]},
    ])
    rows, _ = load_sft(p, system_prompt="Be kind.")
    assert rows == [{"messages": [S("Be kind."), U("q"), A("a")]}, {"messages": [S("own"), U("q"), A("a")]}]


def test_sft_max_rows(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    rows, report = load_sft(p, max_rows=2)
    assert rows == [{"messages": [U("q0"), A("a0")]}, {"messages": [U("q1"), A("a1")]}]
    assert (report.total, report.kept) == (2, 2)


def test_max_rows_counts_kept_rows_when_skipping(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q0", "completion": ""},
                                             {"prompt": "q1", "completion": "a1"},
                                             {"prompt": "q2", "completion": "a2"},
                                             {"prompt": "q3", "completion": "a3"}])
    rows, report = load_sft(p, max_rows=2, skip_invalid=True)
    assert [r["messages"][0]["content"] for r in rows] == ["q1", "q2"]
    assert (report.total, report.kept, report.skipped) == (3, 2, 1)


# ---------------------------------------------------------------------------------------------
# Bad rows


def _error(tmp_path, loader, rows, name="bad.jsonl", **kw):
    p = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DataError) as ei:
        loader(p, **kw)
    return str(ei.value)


def test_unknown_role_message_is_exact(tmp_path):
    ok = {"messages": [U("q"), A("a")]}
    msg = _error(tmp_path, load_sft, [ok] * 16 + [{"messages": [U("q"), {"role": "bot", "content": "x"}]}],
                 name="sft_train.jsonl")
    assert msg == (f"{tmp_path / 'sft_train.jsonl'} row 17: message 2 has unknown role 'bot' "
                   f"(expected system, user, assistant) (to skip such rows and count them instead, set "
                   f"data.skip_invalid=true)")


@pytest.mark.parametrize("loader, row, problem", [
    # missing columns
    (load_sft, {"question": "q"}, "missing column: expected one of 'messages' (messages); 'conversations' "
                                  "(sharegpt); 'prompt' + 'completion' (prompt_completion); 'instruction' (+ 'input') "
                                  "+ 'output' (alpaca); 'text' (an HH transcript) (hh) (the row has: question)"),
    (load_sft, {"prompt": "q"}, "missing column 'completion'"),
    (load_pairs, {"prompt": "q", "chosen": "a"}, "missing column 'rejected'"),
    (load_prompts, {"query": "q"}, "missing column: expected 'prompt', 'messages', 'conversations', 'instruction', "
                                   "'text', or 'chosen'"),
    (load_prompts, {"chosen": "plain reply"}, "chosen: plain text, not an HH transcript or a conversation"),
    # empty text
    (load_sft, {"prompt": "q", "completion": "   "},
     "empty SFT target: completion is empty, so the row has nothing to train on"),
    (load_sft, {"messages": [U("q"), A(" \n")]},
     "empty SFT target: message 2 (the final assistant turn) is empty, so the row has nothing to train on"),
    (load_sft, {"messages": [U("q"), A(" "), U("q2"), A("a")]}, "message 2 (assistant) has empty content"),
    (load_pairs, {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt: empty text"),
    (load_prompts, {"prompt": "\t"}, "prompt: empty text"),
    # wrong types
    (load_sft, {"prompt": 5, "completion": "a"}, "prompt: expected text or a list of messages, got int"),
    (load_sft, {"messages": "hello"}, "messages: expected a list of messages, got text"),
    (load_sft, {"messages": [U("q"), {"role": "assistant", "content": 3}]}, "message 2 content must be text, got int"),
    (load_sft, {"messages": [U("q"), "a"]}, "message 2 is not an object (got text)"),
    (load_sft, {"messages": [{"content": "q"}, A("a")]}, "message 1 has no role"),
    (load_sft, {"prompt": None, "completion": "a"}, "prompt: value is null"),
    (load_pairs, {"prompt": "q", "chosen": ["a"], "rejected": "b"}, "chosen: message 1 is not an object"),
    # conversation structure
    (load_sft, {"messages": [U("q"), A("a"), U("q2")]},
     "conversation must end with an assistant turn (message 3 is 'user')"),
    (load_sft, {"messages": [U("q"), S("s"), A("a")]}, "message 2 is a system message"),
    (load_sft, {"messages": [S("s"), A("a")]}, "conversation has no user turn"),
    (load_sft, {"prompt": [U("q"), A("a")], "completion": "b"}, "prompt: must end with a user turn (the last is 'assistant')"),
    (load_pairs, {"prompt": "q", "chosen": [U("other"), A("a")], "rejected": "b"},
     "chosen: conversation does not start with the prompt"),
    (load_pairs, {"prompt": "q", "chosen": [A("a"), U("b"), A("c")], "rejected": "c"},
     "chosen: expected one assistant reply after the prompt, got assistant, user, assistant"),
    (load_pairs, {"prompt": "q", "chosen": "same", "rejected": "same "}, "chosen and rejected are identical"),
    (load_pairs, {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]}, "chosen and rejected are identical"),
    (load_pairs, {"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]},
     "chosen and rejected differ before their final assistant turn (at message 1)"),
    (load_pairs, {"chosen": "a", "rejected": "b"}, "missing column 'prompt' (chosen is plain text"),
    (load_pairs, {"chosen": [U("q"), A("a")], "rejected": "\n\nHuman: q\n\nAssistant: b"},
     "chosen and rejected must both be text or both be message lists"),
    (load_prompts, {"messages": [S("s"), A("a")]}, "messages: has no user turn"),
    # malformed HH transcripts
    (load_sft, {"text": "just some text"}, "text: not an HH transcript (no 'Human:' turn)"),
    (load_sft, {"text": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"},
     "text: HH transcript must end with an 'Assistant:' turn"),
    (load_pairs, {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nAssistant: b\n\nHuman: q"},
     "rejected: HH transcript must start with 'Human:'"),
    (load_pairs, {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q"},
     "rejected: must end with an assistant turn (the last is 'user')"),
    (load_pairs, {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: "},
     "chosen and rejected are identical"),
    (load_prompts, {"text": "\n\nHuman: \n\nAssistant: b\n\nHuman: c"}, "text: HH transcript turn 1 ('Human:') is empty"),
])
def test_bad_row_message_names_file_row_and_problem(tmp_path, loader, row, problem):
    # Row 3 follows a valid row and a blank line, so "row 3" is the line number, not the index.
    good = {load_sft: {"prompt": "q", "completion": "a"}, load_pairs: {"prompt": "q", "chosen": "a", "rejected": "b"},
            load_prompts: {"prompt": "q"}}[loader]
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as ei:
        loader(str(p))
    assert str(ei.value).startswith(f"{p} row 3: {problem}")
    # every row error says how to skip such rows
    assert str(ei.value).endswith("(to skip such rows and count them instead, set data.skip_invalid=true)")


def test_invalid_json_line_is_a_bad_row(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q", \n')
    with pytest.raises(DataError, match=r"sft\.jsonl row 2: invalid JSON"):
        load_sft(str(p))
    rows, report = load_sft(str(p), skip_invalid=True)
    assert len(rows) == 1 and report.problems[0].startswith("row 2: invalid JSON")


def test_csv_bad_row_uses_line_number(tmp_path):
    p = write_csv(tmp_path / "p.csv", ["prompt", "completion"], [["multi\nline", "a"], ["q", ""], ["q", "a", "extra"]])
    with pytest.raises(DataError, match=r"p\.csv row 4: empty SFT target: completion is empty"):
        load_sft(p)
    _, report = load_sft(p, skip_invalid=True)
    assert report.problems == ["row 4: empty SFT target: completion is empty, so the row has nothing to train on",
                               "row 5: has 3 cells but the header has 2 columns"]


# ---------------------------------------------------------------------------------------------
# skip_invalid, empty and missing sources


def test_skip_invalid_counts_and_reports(tmp_path):
    p = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "q1", "completion": "a1"},
        {"prompt": "q2"},
        {"prompt": "q3", "completion": "a3"},
        {"messages": [U("q4"), {"role": "bot", "content": "a4"}]},
        {"text": HH_SFT},
    ])
    rows, report = load_sft(p, skip_invalid=True)
    assert rows == [{"messages": [U("q1"), A("a1")]}, {"messages": [U("q3"), A("a3")]},
                    {"messages": HH_SFT_MESSAGES}]
    assert report == LoadReport(source=p, total=5, kept=3, skipped=2, problems=[
        "row 2: missing column 'completion'",
        "row 4: message 2 has unknown role 'bot' (expected system, user, assistant)"],
        formats={"prompt_completion": 2, "hh": 1}, row_numbers=[1, 3, 5])
    assert report.summary() == (
        f"{p}: kept 3 of 5 rows (format prompt_completion 2, hh 1), skipped 2 invalid\n"
        "  row 2: missing column 'completion'\n"
        "  row 4: message 2 has unknown role 'bot' (expected system, user, assistant)")
    assert load_sft(p, max_rows=1)[1].summary() == f"{p}: kept 1 of 1 rows (format prompt_completion)"


def test_skip_invalid_keeps_first_ten_problems(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}] * 12 + [{"prompt": "ok"}])
    rows, report = load_prompts(p, skip_invalid=True)
    assert rows == [{"prompt": [U("ok")]}]
    assert (report.total, report.kept, report.skipped) == (13, 1, 12)
    assert report.problems == [f"row {i}: prompt: empty text" for i in range(1, 11)]
    assert report.summary().endswith("  ... and 2 more")


def test_all_rows_invalid_is_an_error_even_when_skipping(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"x": 1}])
    with pytest.raises(DataError, match=r"p\.jsonl: no valid rows \(2 read, all invalid; first problem: row 1: "
                                        r"prompt: empty text\)"):
        load_prompts(p, skip_invalid=True)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e2.jsonl", "\n\n"), ("e.json", "[]"),
                                           ("e2.json", ""), ("e3.json", '{"data": []}'), ("e.csv", "prompt\n")])
def test_empty_source_is_an_error(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    for loader in (load_sft, load_pairs, load_prompts):
        with pytest.raises(DataError, match=rf"{name}: no rows \(the source is empty\)"):
            loader(str(p))


@pytest.mark.parametrize("source", ["data/does_not_exist.jsonl", "nope.csv", "some/deep/folder/file",
                                    "./local_thing", "/abs/missing"])
def test_missing_local_file_is_not_a_hub_id(source):
    # The autouse _no_hub fixture would fail the test if this were sent to the hub.
    with pytest.raises(DataError, match=rf"^{source}: file not found"):
        load_sft(source)
    with pytest.raises(DataError, match="file not found"):
        data_hash(source)


def test_unsupported_file_type_and_directory(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type '\.txt'"):
        load_sft(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="is a directory"):
        load_sft(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# load_pairs


def test_pairs_explicit_prompt_text(tmp_path):
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Tell a joke", "chosen": "Knock knock", "rejected": "No."}])
    rows, _ = load_pairs(p)
    assert rows == [{"prompt": [U("Tell a joke")], "chosen": [A("Knock knock")], "rejected": [A("No.")]}]


def test_pairs_explicit_prompt_messages(tmp_path):
    p = write_jsonl(tmp_path / "pairs.jsonl", [
        # replies as assistant-only lists
        {"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]},
        # replies as full conversations repeating the prompt (ultrafeedback style)
        {"prompt": "q", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]},
        # replies as HH transcripts that repeat an HH prompt
        {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "\n\nHuman: q\n\nAssistant: good",
         "rejected": "\n\nAssistant: bad"},
    ])
    rows, _ = load_pairs(p)
    assert rows == [
        {"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]},
        {"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]},
        {"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]},
    ]


def test_pairs_implicit_prompt_from_message_lists(tmp_path):
    p = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": [S("sys"), U("q1"), A("a1"), U("q2"), A("good")],
         "rejected": [S("sys"), U("q1"), A("a1"), U("q2"), A("bad")]},
    ])
    rows, _ = load_pairs(p)
    assert rows == [{"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]}]


def test_pairs_hh_multi_turn_implicit_prompt(tmp_path):
    shared = "\n\nHuman: What's a good pet?\n\nAssistant: A dog or a cat.\n\nHuman: Which is easier?"
    p = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": shared + "\n\nAssistant: A cat, usually.", "rejected": shared + "\n\nAssistant: Whatever."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! ", "rejected": "\n\nHuman: Hi \n\nAssistant: Go away."},
    ])
    rows, report = load_pairs(p)
    assert rows == [
        {"prompt": [U("What's a good pet?"), A("A dog or a cat."), U("Which is easier?")],
         "chosen": [A("A cat, usually.")], "rejected": [A("Whatever.")]},
        {"prompt": [U("Hi")], "chosen": [A("Hello!")], "rejected": [A("Go away.")]},
    ]
    assert (report.total, report.kept) == (2, 2)


def test_pairs_hh_differing_history_is_invalid(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
         "rejected": "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e"},
    ])
    with pytest.raises(DataError, match=r"hh\.jsonl row 1: chosen and rejected differ before their final "
                                        r"assistant turn \(at message 2\)"):
        load_pairs(p)


def test_pairs_json_csv_parquet_and_mapping(tmp_path):
    expected = [{"prompt": [U("q")], "chosen": [A("yes")], "rejected": [A("no")]}]
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "q", "chosen": "yes", "rejected": "no"}]))
    c = write_csv(tmp_path / "p.csv", ["question", "good", "bad"], [["q", "yes", "no"]])
    c2 = write_csv(tmp_path / "hh.csv", ["chosen", "rejected"],
                   [["\n\nHuman: q\n\nAssistant: yes", "\n\nHuman: q\n\nAssistant: no"]])
    pq = write_parquet(tmp_path / "p.parquet", [{"chosen": [U("q"), A("yes")], "rejected": [U("q"), A("no")]}])
    assert load_pairs(str(j))[0] == expected
    assert load_pairs(c, columns={"prompt": "question", "chosen": "good", "rejected": "bad",
                                  "completion": "unused"})[0] == expected
    assert load_pairs(c2)[0] == expected
    assert load_pairs(pq)[0] == expected


def test_pairs_system_prompt_goes_into_prompt(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    rows, _ = load_pairs(p, system_prompt="Be kind.")
    assert rows == [{"prompt": [S("Be kind."), U("q")], "chosen": [A("yes")], "rejected": [A("no")]}]


def test_pairs_skip_invalid_real_hh_quirks(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q"},
    ])
    rows, report = load_pairs(p, skip_invalid=True)
    # row 3: an empty final assistant turn is an empty (preferred) response, a valid pair
    assert rows == [{"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]},
                    {"prompt": [U("q")], "chosen": [A("")], "rejected": [A("b")]}]
    assert (report.kept, report.empty_responses, report.row_numbers) == (2, 1, [2, 3])
    assert report.problems == ["row 1: chosen and rejected are identical",
                               "row 4: rejected: must end with an assistant turn (the last is 'user')"]


# ---------------------------------------------------------------------------------------------
# load_prompts


def test_prompts_every_format(tmp_path):
    p = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Write a haiku"},
        {"prompt": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"},
        {"prompt": [S("sys"), U("q")]},
        {"messages": [U("q1"), A("a1"), U("q2"), A("a2")]},
        {"text": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: a2"},
        {"text": "The movie was"},
    ])
    rows, report = load_prompts(p)
    assert rows == [
        {"prompt": [U("Write a haiku")]},
        {"prompt": [U("q1"), A("a1"), U("q2")]},
        {"prompt": [S("sys"), U("q")]},
        {"prompt": [U("q1"), A("a1"), U("q2")]},
        {"prompt": [U("q1"), A("a1"), U("q2")]},
        {"prompt": [U("The movie was")]},
    ]
    assert (report.total, report.kept, report.skipped) == (6, 6, 0)


def test_prompts_csv_parquet_mapping_system_prompt_max_rows(tmp_path):
    c = write_csv(tmp_path / "p.csv", ["id", "question"], [["1", "q1"], ["2", "q2"], ["3", "q3"]])
    rows, report = load_prompts(c, columns={"prompt": "question"}, system_prompt="sys", max_rows=2)
    assert rows == [{"prompt": [S("sys"), U("q1")]}, {"prompt": [S("sys"), U("q2")]}]
    assert (report.total, report.kept) == (2, 2)
    pq = write_parquet(tmp_path / "p.parquet", [{"messages": [S("own"), U("q"), A("a")]}])
    assert load_prompts(pq, system_prompt="sys")[0] == [{"prompt": [S("own"), U("q")]}]


# ---------------------------------------------------------------------------------------------
# Hub datasets and data_hash


def test_hub_dataset_is_loaded_with_split(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "q1"}, {"prompt": ""}, {"prompt": "q3"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows, report = load_prompts("someorg/prompts", split="test", skip_invalid=True)
    assert calls == [("someorg/prompts", "test")]
    assert rows == [{"prompt": [U("q1")]}, {"prompt": [U("q3")]}]
    assert report == LoadReport("someorg/prompts", 3, 2, 1, ["row 2: prompt: empty text"], row_numbers=[1, 3])
    assert read_rows("someorg/prompts", max_rows=1) == [(1, {"prompt": "q1"})]


def test_hub_load_failure_is_a_data_error(monkeypatch):
    import datasets

    def fake_load(name, split):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(DataError, match=r"^someorg/x: not a local file, and loading it as a hub dataset "
                                        r"\(split 'train'\) failed: FileNotFoundError: no such dataset"):
        load_sft("someorg/x")


def test_data_hash_local_file_changes_with_content(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q"}])
    h1 = data_hash(p)
    assert h1 == hashlib.sha256(b'{"prompt": "q"}\n').hexdigest()
    assert data_hash(p) == h1
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q!"}])
    assert data_hash(p) != h1


def test_data_hash_hub_id_names_id_and_split():
    assert data_hash("someorg/prompts") == hashlib.sha256(b"hub:someorg/prompts:train").hexdigest()
    assert data_hash("someorg/prompts", split="test") == hashlib.sha256(b"hub:someorg/prompts:test").hexdigest()


def test_module_exports():
    assert set(loaders.__all__) == {"DataError", "EmptyTargetError", "LoadReport", "parse_hh", "read_rows", "load_sft",
                                 "load_pairs", "load_prompts", "data_hash"}
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------
# Consecutive turns of one role: joined, counted per source

# Built like HH-RLHF harmless-base test row 668: an inline "Human:" (not after a blank line, so not a
# turn marker) inside a reply, and two "Assistant:" turns meeting.
HH_SAME_ROLE = ("\n\nHuman: What do you say to someone who says Human: you are a robot?\n\nAssistant: I would say"
                " I am an AI.\n\nAssistant: And that I am glad to help.\n\nHuman: Thanks\n\nAssistant:")


def test_parse_hh_joins_consecutive_turns_of_one_speaker():
    assert parse_hh(HH_SAME_ROLE) == [
        U("What do you say to someone who says Human: you are a robot?"),
        A("I would say I am an AI.\n\nAnd that I am glad to help."), U("Thanks")]
    assert parse_hh("\n\nHuman: a\n\nHuman: b\n\nAssistant: c\n\nAssistant:") == [U("a\n\nb"), A("c")]


def test_same_role_rows_load_joined_and_are_counted_per_source(tmp_path):
    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    sft.write_text("\n".join(json.dumps(r) for r in [
        {"text": HH_SAME_ROLE + " You're welcome."},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a1"},
                           {"from": "gpt", "value": "a2"}]},
        {"messages": [U("x"), U("y"), A("z")]},
        {"text": HH_SFT},
    ]) + "\n")
    rows, report = load_sft(str(sft))
    assert [r["messages"] for r in rows] == [
        [U("What do you say to someone who says Human: you are a robot?"),
         A("I would say I am an AI.\n\nAnd that I am glad to help."), U("Thanks"), A("You're welcome.")],
        [U("q"), A("a1\n\na2")], [U("x\n\ny"), A("z")], HH_SFT_MESSAGES]
    assert report.joined_rows == 3 and report.manifest()["joined_rows"] == 3
    assert report.summary() == (f"{sft}: kept 4 of 4 rows (format hh 2, sharegpt 1, messages 1); 3 rows had "
                                "consecutive turns of one role, joined into one turn (blank-line separated)")
    # An HH pair whose shared prompt holds the meeting turns: one row, joined once in the count.
    pairs.write_text(json.dumps({"chosen": HH_SAME_ROLE + " Welcome!", "rejected": HH_SAME_ROLE + " Go away."}) + "\n")
    rows, report = load_pairs(str(pairs))
    assert rows[0]["prompt"][1] == A("I would say I am an AI.\n\nAnd that I am glad to help.")
    assert rows[0]["chosen"] == [A("Welcome!")] and report.joined_rows == 1
