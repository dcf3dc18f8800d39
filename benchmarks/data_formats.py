"""Load time of 10,000 rows per data format (pipeline/data/loaders.py + pipeline/data/formats.py).

    OMP_NUM_THREADS=1 python benchmarks/data_formats.py [--rows 10000] [--repeats 5]

Writes synthetic jsonl files shaped like each format's fixture (tests/fixtures/formats/) into a temp
folder, then loads each one ``--repeats`` times, the formats interleaved within a repeat so that drift
on a shared machine spreads over all of them. Prints one line per format:
``RESULT format=<name> rows=<source rows> out=<canonical rows> mean_s=<s> se_s=<s>`` (SE of the mean
over repeats), and the output rows per second.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("sunny beach friends music coffee garden river mountain city train book dinner morning story "
         "happy quiet bright gentle quick careful warm simple").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_rows(fmt: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` source rows of ``fmt``, with prompts of ~12 words and replies of ~30."""
    p, r = (lambda: _text(rng, 12)), (lambda: _text(rng, 30))
    if fmt == "messages":
        return [{"messages": [{"role": "user", "content": p()}, {"role": "assistant", "content": r()}]}
                for _ in range(n)]
    if fmt == "alpaca":
        return [{"instruction": p(), "input": p() if i % 2 else "", "output": r()} for i in range(n)]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": p()},
                                   {"from": "gpt", "value": r()}]} for _ in range(n)]
    if fmt == "chosen_rejected (HH)":
        rows = []
        for _ in range(n):
            shared = f"\n\nHuman: {p()}\n\nAssistant: {r()}\n\nHuman: {p()}\n\nAssistant:"
            rows.append({"chosen": f"{shared} {r()}", "rejected": f"{shared} {r()}"})
        return rows
    if fmt == "response_pair":
        return [{"prompt": p(), "response_0": r(), "response_1": r(), "better_response_id": i % 2,
                 "safer_response_id": 1 - i % 2} for i in range(n)]
    if fmt == "scored (UltraFeedback, 4 per row)":
        return [{"instruction": p(), "completions": [{"response": r(), "overall_score": float(rng.randint(1, 10)),
                                                      "model": "m"} for _ in range(4)]} for _ in range(n)]
    if fmt == "scored (HelpSteer, 1 per row)":
        prompts = [p() for _ in range(n // 2)]
        return [{"prompt": prompts[i // 2], "response": r(), "helpfulness": rng.randint(0, 4),
                 "correctness": rng.randint(0, 4)} for i in range(n)]
    if fmt == "ranked (Nectar, 7 per row)":
        return [{"prompt": f"Human: {p()}\n\nAssistant:", "answers": [
            {"answer": r(), "model": "m", "rank": float(k)} for k in rng.sample(range(1, 8), 7)]} for _ in range(n)]
    raise ValueError(fmt)


FORMATS = ("messages", "alpaca", "sharegpt", "chosen_rejected (HH)", "response_pair",
           "scored (UltraFeedback, 4 per row)", "scored (HelpSteer, 1 per row)", "ranked (Nectar, 7 per row)")
SFT = ("messages", "alpaca", "sharegpt")


def main() -> None:
    from pipeline.data import loaders

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for i, fmt in enumerate(FORMATS):
            files[fmt] = Path(tmp) / f"{i}.jsonl"
            files[fmt].write_text("".join(json.dumps(row) + "\n" for row in make_rows(fmt, args.rows, rng)))
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        out_rows: dict[str, int] = {}
        for _ in range(args.repeats):
            for fmt in FORMATS:
                load = loaders.load_sft if fmt in SFT else loaders.load_pairs
                t = time.perf_counter()
                rows, report = load(str(files[fmt]))
                times[fmt].append(time.perf_counter() - t)
                out_rows[fmt] = len(rows)
        for fmt in FORMATS:
            ts = times[fmt]
            mean = statistics.mean(ts)
            se = statistics.stdev(ts) / len(ts) ** 0.5 if len(ts) > 1 else float("nan")
            print(f"RESULT format={fmt!r} rows={args.rows} out={out_rows[fmt]} mean_s={mean:.3f} se_s={se:.3f} "
                  f"({out_rows[fmt] / mean:,.0f} canonical rows/s, {args.rows / mean:,.0f} source rows/s)", flush=True)


if __name__ == "__main__":
    main()
