"""What a reward ensemble costs against one reward model, measured in one process on the same pairs
(issue 21: "the k = 4 reward stage at most 2x the single one's wall time, a PPO step at most 1.2x").

1. Training: the reward stage's own optimizer step (`pipeline.stages.reward.train_step`) on the
   configured batches of pairs, for reward.ensemble = 1 and = k, the same batches for both, alternating
   (so drift in the machine's speed hits both alike); mean and standard error over the timed steps.
2. Scoring, as PPO scores a rollout: ``--rollouts`` responses by one member and by k members combined
   (`EnsembleScorer`), on the same base; the PPO step ratio is (step + extra scoring) / step for a
   PPO step time you pass (``--ppo-step``, seconds; a run's mean ``time/step``).

    python benchmarks/reward_ensemble_cost.py --config configs/overopt.yaml --k 4 --steps 6 --ppo-step 30
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import load_config
from pipeline.stages import reward as rw


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def _net(cfg, pairs_rows, k: int):
    cfg.reward.ensemble = k
    net = rw.build_reward_model(cfg)
    train_rows, train_report, eval_rows, eval_report = pairs_rows
    pairs = rw.fit_pair_sets(net.tok, cfg, train_rows, train_report, [], None)
    if k > 1:
        net.weights = torch.stack([rw.ensemble.bootstrap_weights(len(pairs.train), cfg.reward.seed + m)
                                   for m in range(k)])
    return net, pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/overopt.yaml")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per arm (after one warm-up)")
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--ppo-step", type=float, default=0.0, help="seconds of one PPO step, for the step ratio")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    rows = rw.load_pair_rows(cfg.data)
    nets = {1: _net(cfg, rows, 1), args.k: _net(cfg, rows, args.k)}
    rc = cfg.reward
    steps_total = args.steps + 1
    times: dict[int, list[float]] = {1: [], args.k: []}
    state = {}
    for k, (net, pairs) in nets.items():
        opt = rw.build_optimizer(net.named, rc)
        progress = rw.Progress(torch.Generator().manual_seed(rc.seed),
                               torch.randperm(len(pairs.train), generator=torch.Generator().manual_seed(rc.seed)).tolist())
        perf = rw.Perf(net.shape, 1, 1, 1.0, members=k, split=net.split)
        state[k] = (net, pairs, opt, progress, perf)
    for step in range(steps_total):
        for k in (1, args.k):
            net, pairs, opt, progress, perf = state[k]
            net.peft_model.train()
            t0 = time.perf_counter()
            rw.train_step(net, opt, pairs.train, progress, rc, step, steps_total, 0, perf)
            if step:  # the first is a warm-up
                times[k].append(time.perf_counter() - t0)
    m1, s1 = _mean_se(times[1])
    mk, sk = _mean_se(times[args.k])
    print(f"reward training step ({rc.batch_size * rc.grad_accum} pairs): k=1 {m1:.2f} +- {s1:.2f} s, "
          f"k={args.k} {mk:.2f} +- {sk:.2f} s, ratio {mk / m1:.2f} (n={args.steps} each)")

    # scoring a rollout's worth of responses, one member vs k combined, on the k-member model
    net, pairs, *_ = state[args.k]
    net.peft_model.eval()
    single = rw.RewardModelScorer(net.peft_model, net.tok, net.heads[0].weight, net.heads[0].bias, adapter="default",
                                  max_length=rc.max_length, pooling=rc.pooling)
    members = rw.EnsembleScorer(net.peft_model, net.tok, [(a, h.weight, h.bias) for a, h in zip(net.adapters, net.heads)],
                                [0.0] * args.k, [1.0] * args.k, "mean", max_length=rc.max_length, pooling=rc.pooling)
    seqs = [p[0] for p in pairs.train[:args.rollouts]]
    score_times: dict[str, list[float]] = {"single": [], "ensemble": []}
    for rep in range(args.steps + 1):
        for name, scorer in (("single", single), ("ensemble", members)):
            t0 = time.perf_counter()
            scorer.score_ids(seqs)
            if rep:
                score_times[name].append(time.perf_counter() - t0)
    a, sa = _mean_se(score_times["single"])
    b, sb = _mean_se(score_times["ensemble"])
    print(f"scoring {args.rollouts} responses: 1 member {a:.3f} +- {sa:.3f} s, {args.k} members {b:.3f} +- {sb:.3f} s")
    if args.ppo_step > 0:
        print(f"PPO step of {args.ppo_step:.1f} s: with {args.k} members {(args.ppo_step + b - a) / args.ppo_step:.3f}x")


if __name__ == "__main__":
    main()
