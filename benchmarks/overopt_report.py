"""Over-optimisation read off a finished eval: for each series, where gold peaks along KL and how far it
falls after (with its standard error), the same for the proxy and every watched signal (a held-out
reward-model member, the ensemble's disagreement), and the Gao et al. 2022 fit's predicted peak. For
`make overopt-compare`'s arms (series named <arm>-s<seed>), each ensemble arm against the single model:
its fall as a share of single's, and its last gold's lead with a standard error paired over prompts.

    python benchmarks/overopt_report.py runs/overopt          # or RUN/eval
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.curves import rl_series, watched_keys  # noqa: E402
from pipeline.evaluation.overopt import arms_of, compare_arms, comparison_lines, report_lines  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    path = path / "eval" if (path / "eval" / "manifest.json").is_file() else path
    metrics = json.loads((path / "manifest.json").read_text())["metrics"]
    points = metrics["points"]
    series = rl_series(points)
    print("\n".join(report_lines(points, metrics.get("fits") or {}, series, watched_keys(points))))
    arms = arms_of(series)
    if "single" in arms and len(arms) > 1:  # make overopt-compare's arms: each ensemble against the single model
        print("\n".join(["", *comparison_lines(compare_arms(points, arms))]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
