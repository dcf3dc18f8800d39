"""Over-optimisation read off a finished eval: for each series, where gold peaks along KL and how far it
falls after (with its standard error), the same for the proxy and every watched signal (a held-out
reward-model member, the ensemble's disagreement), and the Gao et al. 2022 fit's predicted peak.

    python benchmarks/overopt_report.py runs/overopt          # or RUN/eval
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.curves import rl_series, watched_keys  # noqa: E402
from pipeline.evaluation.overopt import report_lines  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    path = path / "eval" if (path / "eval" / "manifest.json").is_file() else path
    metrics = json.loads((path / "manifest.json").read_text())["metrics"]
    points = metrics["points"]
    print("\n".join(report_lines(points, metrics.get("fits") or {}, rl_series(points), watched_keys(points))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
