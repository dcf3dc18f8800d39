"""Single reward model against reward ensembles on the over-optimisation demo, at the same SFT model,
reward stage and PPO budget, on one eval plot (`make overopt-compare`):

1. RUN/sft: the default run's SFT adapter (a link; `make sft` first).
2. RUN/reward: five reward members trained together (configs/overopt_ensemble.yaml, reward.ensemble 5).
3. One PPO run per arm and seed under RUN/arms/<arm>-s<seed>, each optimising
   single: member 0 alone (exactly a one-model reward model); mean / min / uwo: members 0-3 combined;
   every arm watches member 4 (held out) and the gold parts, and marks the held-out member's peak.
4. One `rlhf eval` over all arms (eval.runs), then benchmarks/overopt_report.py's reading of it and
   each stage's wall time, into RUN/compare.txt.

Stages already finished are kept, so a stopped comparison continues where it was.

    python benchmarks/overopt_compare.py --run runs/overopt-compare --seeds 42 43
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/overopt_ensemble.yaml"
OPTIMISED = [0, 1, 2, 3]


def arm_rewards(arm: str, uwo_lambda: float) -> str:
    """The ppo.rewards override of an arm (YAML)."""
    members = [0] if arm == "single" else OPTIMISED
    aggregate = "mean" if arm == "single" else arm
    return json.dumps([{"name": "reward_model", "args": {"path": "{run_dir}/reward", "members": members,
                                                           "aggregate": aggregate, "uwo_lambda": uwo_lambda}}])


def rlhf(args: list[str], log: Path) -> float:
    """Run `rlhf ARGS`, output to ``log``; returns its wall time; stops the comparison if it fails."""
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                               cwd=REPO)
    if code:
        sys.exit(f"rlhf {' '.join(args[:1])} failed ({code}); see {log}")
    return time.time() - t0


def link(target: Path, at: Path) -> None:
    if not at.exists() and not at.is_symlink():
        at.symlink_to(target.resolve(), target_is_directory=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/overopt-compare", help="the comparison's folder")
    ap.add_argument("--from", dest="src", default="runs/default", help="a run whose sft/ is reused")
    ap.add_argument("--arms", nargs="+", default=["single", "mean", "min", "uwo"],
                    choices=["single", "mean", "min", "uwo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42], help="ppo.seed of each run per arm")
    ap.add_argument("--uwo-lambda", type=float, default=0.5, help="lambda of the uwo arm (Coste et al. 2023)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every stage")
    args = ap.parse_args()
    run, src = (REPO / args.run).resolve(), REPO / args.src
    if not (src / "sft" / "manifest.json").is_file():
        sys.exit(f"{src}/sft not found: run `make sft` (or pass --from RUN with a finished SFT stage)")
    run.mkdir(parents=True, exist_ok=True)
    link(src / "sft", run / "sft")
    times: dict[str, float] = {}
    base = ["--config", CONFIG]
    if not (run / "reward" / "manifest.json").is_file():
        times["reward (5 members)"] = rlhf(["reward", *base, "--run-dir", str(run), *args.overrides],
                                           run / "reward.log")
    arms = []
    for arm in args.arms:
        for seed in args.seeds:
            d = run / "arms" / f"{arm}-s{seed}"
            d.mkdir(parents=True, exist_ok=True)
            link(run / "sft", d / "sft")
            link(run / "reward", d / "reward")
            arms.append(d)
            if not (d / "ppo" / "manifest.json").is_file():
                resume = ["--resume"] if (d / "ppo.work").exists() else []
                times[f"ppo {d.name}"] = rlhf(["ppo", *base, "--run-dir", str(d), *resume, f"ppo.seed={seed}",
                                               f"ppo.rewards={arm_rewards(arm, args.uwo_lambda)}", *args.overrides],
                                              d / "ppo.log")
    runs = json.dumps([str(d) for d in arms[1:]])
    times["eval"] = rlhf(["eval", *base, "--run-dir", str(arms[0]), "--overwrite", f"eval.runs={runs}",
                          *args.overrides], run / "eval.log")
    report = subprocess.run([sys.executable, str(REPO / "benchmarks" / "overopt_report.py"), str(arms[0])],
                            capture_output=True, text=True, cwd=REPO).stdout
    lines = [report.rstrip(), "", "wall time:"] + [f"  {k}: {v / 60:.1f} min" for k, v in times.items()]
    (run / "compare.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"curves: {arms[0] / 'eval' / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
