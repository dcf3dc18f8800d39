"""Stages on user data: an HH transcript with an empty final assistant turn trains through the reward
stage, and every stage fits long rows by data.long_rows and reports the counts (tiny config)."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import A, U

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
HH_PAIRS = str(REPO / "tests" / "fixtures" / "formats" / "pairs_chosen_rejected.jsonl")


@pytest.fixture(scope="module", autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _invoke(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r


def _long(n_words: int) -> str:
    return " ".join(["Tell me about the sunny beach."] * n_words)


def test_reward_stage_trains_on_hh_with_an_empty_reply_and_drops_long_held_out_pairs(tmp_path, tiny_path):
    from pipeline.models.loading import load_tokenizer
    from pipeline.models.reward_model import encode_conversation

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Is it sunny?", "chosen": "Yes, lovely!", "rejected": "No."},
        {"prompt": _long(60), "chosen": "Great!", "rejected": "Bad."},  # ~1,000 tokens: over reward.max_length
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
    ]))
    run = tmp_path / "run"
    r = _invoke("reward", "--config", CONFIG, "--run-dir", str(run), "model.compute_dtype=float32",
                f"data.pairs_train={HH_PAIRS}", f"data.pairs_eval={held_out}", "data.long_rows=drop",
                "data.sft_eval=")
    assert "1 pair with an empty response (kept: a valid preference)" in r.output
    assert "reward held-out pairs: 1 of 3 longer than reward.max_length=256 tokens" in r.output
    manifest = json.loads((run / "reward" / "manifest.json").read_text())
    train, held = manifest["data"]["train"], manifest["data"]["eval"]
    assert (train["rows"], train["empty_responses"], train["formats"]) == (3, 1, {"chosen_rejected": 3})
    assert (train["long_rows"]["over"], train["long_rows"]["policy"]) == (0, "drop")
    assert (held["rows"], held["empty_responses"], held["long_rows"]["dropped"]) == (3, 1, 2 - 1)
    m = manifest["metrics"]
    assert m["eval_rows_dropped_long"] == 1 and m["eval_accuracy_n"] == 2 and m["train_rows_dropped_long"] == 0
    assert torch.isfinite(torch.tensor(m["train_loss"]))
    # an empty reply still has tokens for the head to pool: the chat template's end of turn
    tok = load_tokenizer(tiny_path)
    ids, start, _ = encode_conversation(tok, [U("Hi")], "", None)
    assert 0 < start < len(ids)


def test_sft_truncates_from_the_left_through_trl_and_reports_it(tmp_path):
    from trl import SFTTrainer

    from pipeline.models.embedded import resolve_model_path
    from pipeline.models.loading import load_tokenizer

    rows = [{"messages": [U(_long(30) if i % 3 == 0 else "Hi"), A(f"Sure {i}!")]} for i in range(6)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}
    original = SFTTrainer.train

    def train(self, *a, **k):
        seen["train"] = self.train_dataset
        return original(self, *a, **k)

    SFTTrainer.train = train
    try:
        r = _invoke("sft", "--config", CONFIG, "--run-dir", str(tmp_path / "run"), "model.compute_dtype=float32",
                    f"data.sft_train={src}", f"data.sft_eval={src}", "sft.max_length=128", "sft.gold_eval_prompts=0")
    finally:
        SFTTrainer.train = original
    tok = load_tokenizer(resolve_model_path("embedded:tiny-random-llama"))
    ds = seen["train"]
    lengths = []
    for row, ids, labels in zip(rows, ds["input_ids"], ds["labels"]):
        full = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        lengths.append(len(full))
        # what trl trains on is the row's last 128 tokens: the prompt's start went, the reply stayed
        assert ids == full[-128:]
        reply = tok.encode(row["messages"][-1]["content"], add_special_tokens=False)
        trained = [t for t in labels if t != -100]
        assert any(trained[i:i + len(reply)] == reply for i in range(len(trained)))
    long_rows = sum(n > 128 for n in lengths)
    assert 0 < long_rows < 6
    assert f"SFT train rows: {long_rows} of 6 longer than sft.max_length=128 tokens" in r.output
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["data"]["train"]["long_rows"]["truncated"] == long_rows
    assert manifest["metrics"]["train_rows_truncated"] == manifest["metrics"]["eval_rows_truncated"] == long_rows
    last = json.loads((tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sft/train_rows_truncated"] == long_rows and last["sft/train_rows_response_cut"] == 0


def test_fit_prompts_cuts_drops_or_refuses(tiny_path):
    from pipeline.data.loaders import DataError, LoadReport
    from pipeline.models.loading import load_tokenizer
    from pipeline.rl import rollout

    tok = load_tokenizer(tiny_path)
    rows = [{"prompt": [U("Hi")]}, {"prompt": [U(_long(20))]}]
    report = LoadReport("p.jsonl", row_numbers=[1, 3])
    full = [rollout.prompt_ids(tok, r["prompt"]) for r in rows]
    limit = len(full[0]) + 5
    kept, ids, rep = rollout.fit_prompts(tok, rows, report, limit, "truncate", "PPO prompts")
    # the long prompt keeps its last tokens: its end and the generation prompt
    assert kept == rows and ids == [full[0], full[1][-limit:]] and rep.truncated == 1
    kept, ids, rep = rollout.fit_prompts(tok, rows, report, limit, "drop", "PPO prompts")
    assert kept == rows[:1] and ids == full[:1] and rep.dropped == 1
    with pytest.raises(DataError, match=rf"^p\.jsonl row 3: {len(full[1])} tokens, longer than "
                                        rf"ppo\.max_prompt_length={limit}"):
        rollout.fit_prompts(tok, rows, report, limit, "error", "PPO prompts")
