"""`rlhf score`: run any reward configuration over a jsonl of prompt/response pairs."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import yaml

from pipeline.config import ConfigError, PipelineConfig, substitute_run_dir
from pipeline.data.loaders import DataError, read_rows


def _prompt_messages(value, source: str, row: int) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise DataError(f"{source} row {row}: 'prompt' must be text or a list of messages")


def run_score(cfg: PipelineConfig, run_dir: str | Path, input_path: str, output_path: str = "-",
              rewards_yaml: Optional[str] = None, batch_size: int = 16) -> list[dict]:
    from tqdm.auto import tqdm

    from pipeline.models.reward_model import load_reward_scorer
    from reward.registry import build_reward

    specs = cfg.ppo.rewards
    if rewards_yaml:
        try:
            specs = yaml.safe_load(rewards_yaml)
        except yaml.YAMLError as e:
            raise ConfigError(f"--rewards is not valid YAML: {e}") from None
    reward_fn = build_reward(substitute_run_dir(specs, run_dir),
                             context={"load_reward_model": lambda path, **kw: load_reward_scorer(path, **kw)})

    prompts, responses = [], []
    for row_no, row in read_rows(input_path):
        for key in ("prompt", "response"):
            if key not in row:
                raise DataError(f"{input_path} row {row_no}: missing '{key}'")
        if not isinstance(row["response"], str):
            raise DataError(f"{input_path} row {row_no}: 'response' must be text")
        prompts.append(_prompt_messages(row["prompt"], input_path, row_no))
        responses.append(row["response"])

    out_rows = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="score", disable=len(prompts) <= batch_size):
        p, r = prompts[s:s + batch_size], responses[s:s + batch_size]
        result = reward_fn([m[-1]["content"] for m in p], r, prompt_messages=p)
        for i in range(len(p)):
            out_rows.append({"prompt": p[i][-1]["content"], "response": r[i], "score": result.total[i],
                             "components": {k: v[i] for k, v in {**result.components, **result.details}.items()}})
    text = "".join(json.dumps(row) + "\n" for row in out_rows)
    if output_path == "-":
        sys.stdout.write(text)
    else:
        Path(output_path).write_text(text)
        print(f"[score] {len(out_rows)} rows -> {output_path}", file=sys.stderr)
    return out_rows
