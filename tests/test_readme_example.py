"""The README's "Write your own reward" example, executed exactly as written."""
import json
import re
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import main
from reward.registry import build_reward

REPO = Path(__file__).resolve().parents[1]


def _example_code() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- reward-example:start -->\s*```python\n(.*?)```\s*<!-- reward-example:end -->", text, re.S)
    assert block, "README lost its reward example markers"
    return block.group(1)


def test_readme_reward_example_runs(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(_example_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward([{"name": "my_rewards:politeness", "weight": 0.5}, {"name": "sentiment", "weight": 0.0}])
    result = reward(["Hi", "Hi", "Hi"], ["Thank you, please come again!", "No.", "please please thank you, glad to help"])
    assert result.components["my_rewards:politeness"] == [2.0, 0.0, 2.0]
    assert result.total == [1.0, 0.0, 1.0]  # 0.5 * politeness + 0 * sentiment

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi", "response": "Thank you!"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Hey"}], "response": "Go away."}) + "\n")
    out = tmp_path / "scores.jsonl"
    r = CliRunner().invoke(main, ["score", "--config", str(REPO / "configs/tiny.yaml"), "--input", str(rows),
                                  "--output", str(out), "--rewards", '[{name: "my_rewards:politeness"}]'])
    assert r.exit_code == 0, r.output
    scored = [json.loads(line) for line in out.read_text().split("\n") if line.strip()]
    assert [s["score"] for s in scored] == [1.0, 0.0]
    assert scored[1]["prompt"] == "Hey"


def test_score_command_reports_bad_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    r = CliRunner().invoke(main, ["score", "--input", str(rows), "--rewards", "[{name: sentiment}]"])
    assert r.exit_code != 0
    assert "rows.jsonl row 1: missing 'response'" in r.output
