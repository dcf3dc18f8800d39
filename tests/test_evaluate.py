"""Evaluation: KL estimators against exact KL, best-of-n KL, win rates, and `rlhf eval` end to end."""
import csv
import json
import math
import re
import shutil

import pytest
import torch

from pipeline.evaluation.curves import CSV_COLUMNS
from pipeline.evaluation.stats import (
    bon_kl,
    exact_kl,
    mean_se,
    sequence_kl,
    wilson_interval,
    win_rate,
)

# ---------------------------------------------------------------------------------------------
# Pure helpers


def _sampled_kl_terms(estimator: str, n: int = 200_000):
    """Per-token KL estimates for tokens sampled from p, as length-1 sequences; and the exact KL."""
    g = torch.Generator().manual_seed(123)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    tokens = torch.multinomial(p, n, replacement=True, generator=g)
    logp, logq = p.log()[tokens].unsqueeze(1), q.log()[tokens].unsqueeze(1)
    per_seq = sequence_kl(logp, logq, torch.ones_like(logp, dtype=torch.bool), estimator)
    return per_seq, exact_kl(p, q)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_estimator_sample_mean_matches_exact_kl(estimator):
    per_seq, exact = _sampled_kl_terms(estimator)
    mean, se = mean_se(per_seq.tolist())
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(1.0) + 0.15 * math.log(0.75)
                                  + 0.1 * math.log(0.5) + 0.05 * math.log(0.25))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    if estimator == "k3":
        assert bool((per_seq >= 0).all())  # never negative per token
    else:
        assert bool((per_seq < 0).any())  # k1 is unbiased but negative on some tokens


def test_sequence_kl_sums_real_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, float("-inf")], [-0.1, -3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    k1 = sequence_kl(logp, ref, mask, "k1")
    assert k1.tolist() == pytest.approx([0.5 - 1.0, 0.0])  # padding (inf/nan) contributes exactly 0
    k3 = sequence_kl(logp, ref, mask, "k3")
    d1, d2 = -0.5, 1.0  # ref - logp
    assert k3.tolist() == pytest.approx([(math.exp(d1) - 1 - d1) + (math.exp(d2) - 1 - d2), 0.0])
    assert k3[1].item() == 0.0


def test_exact_kl_hand_computed():
    assert exact_kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert exact_kl([0.3, 0.7], [0.3, 0.7]) == 0.0
    assert exact_kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))  # p=0 terms are 0
    assert exact_kl([0.5, 0.5], [1.0, 0.0]) == math.inf


def test_bon_kl_by_hand():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(0.1931471805599453, abs=1e-15)  # log 2 - 1/2
    assert bon_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert bon_kl(16) == pytest.approx(2.772588722239781 - 0.9375)
    with pytest.raises(ValueError):
        bon_kl(0)


def test_mean_se_hand_computed():
    mean, se = mean_se([1, 2, 3, 4])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3 / 4))  # 0.6455
    assert mean_se([2.0, 2.0, 2.0]) == (2.0, 0.0)
    m, s = mean_se([3.0])
    assert m == 3.0 and math.isnan(s)


def test_gao_fits_recover_hand_made_curves_and_their_peaks():
    from pipeline.evaluation.curves import fit_gao, gao_curve, gao_peak

    # best-of-n form, alpha 1, beta 0.5: R(1) = 1 - 0.5 = 0.5, R(2) = 2 - 2 = 0, R(0.5) = 0.5 - 0.125 = 0.375
    a, b = fit_gao([0.0, 0.5, 1.0, 2.0], [0.0, 0.375, 0.5, 0.0], "bon")
    assert (a, b) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.5, abs=1e-12))
    # peak: d* = alpha / (2 beta) = 1, R* = alpha^2 / (4 beta) = 0.5
    assert gao_peak(1.0, 0.5, "bon") == (1.0, 0.5)
    # RL form, alpha 1, beta 0.5: R(1) = 1, R(e) = e (1 - 0.5) = 1.359141, R(e^2) = e^2 (1 - 1) = 0
    e = math.e
    a, b = fit_gao([1.0, e, e * e], [1.0, 0.5 * e, 0.0], "rl")
    assert (a, b) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.5, abs=1e-12))
    # peak: d* = exp(alpha / beta - 1) = e, R* = beta d* = 1.359141
    d, r = gao_peak(1.0, 0.5, "rl")
    assert d == pytest.approx(e) and r == pytest.approx(1.3591409142295225)
    assert gao_curve(e, 1.0, 0.5, "rl") == pytest.approx(r) and gao_curve(0.0, 1.0, 0.5, "rl") == 0.0
    # noisy points: least squares, not interpolation. Features [d, -d^2] at d = 1, 2 with R = 1, 1:
    # A = [[1, -1], [2, -4]]; A^T A = [[5, -9], [-9, 17]], A^T R = [3, -5]; det = 85 - 81 = 4;
    # alpha = (3 * 17 - (-5)(-9)) / 4 = 1.5, beta = (5 * (-5) - (-9) * 3) / 4 = 0.5
    assert fit_gao([1.0, 2.0], [1.0, 1.0], "bon") == (pytest.approx(1.5), pytest.approx(0.5))
    assert gao_peak(1.0, -0.1, "rl") is None and gao_peak(1.0, 0.0, "bon") is None  # still rising
    assert fit_gao([0.0, 1.0], [0.0, 1.0], "bon") is None  # one usable point


def test_a_fitted_peak_far_past_the_points_is_not_reported_as_a_prediction():
    from pipeline.evaluation.curves import curve_fits, gao_curve

    def points(alpha, beta, ds):
        return [{"kind": "sft", "name": "sft", "sqrt_kl": 0.0, "gold_mean": 0.5}] + [
            {"kind": "ppo", "name": f"step-{i}", "sqrt_kl": d, "gold_mean": 0.5 + gao_curve(d, alpha, beta, "rl")}
            for i, d in enumerate(ds)]

    # alpha 1, beta 0.5 through d = 1, 2, 3 (KL up to 9): peak at d* = e (KL 7.39), within reach
    near = curve_fits(points(1.0, 0.5, [1.0, 2.0, 3.0]))["ppo"]
    assert near["peak_kl"] == pytest.approx(math.e ** 2) and near["peak_beyond_kl"] is None
    # alpha 0.094, beta 0.007 (the RLOO fit of the default comparison) through KL up to 9:
    # d* = exp(0.094 / 0.007 - 1) = exp(12.43) = 2.5e5, KL 6.3e10 > 4 x 9: an extrapolation
    far = curve_fits(points(0.094, 0.007, [1.0, 2.0, 3.0]))["ppo"]
    assert far["peak_kl"] is None and far["peak_gold"] is None
    assert far["peak_beyond_kl"] == pytest.approx(math.exp(2 * (0.094 / 0.007 - 1)), rel=1e-6)
    assert far["max_kl"] == pytest.approx(9.0)


def test_proxy_per_nat_interpolates_best_of_n_at_the_same_kl():
    from pipeline.evaluation.curves import proxy_per_nat

    pts = [{"kind": "sft", "name": "sft", "kl_k1_mean": 0.0, "proxy_mean": 0.2},
           {"kind": "bon", "name": "n=1", "kl_k1_mean": 0.0, "proxy_mean": 0.2},
           {"kind": "bon", "name": "n=4", "kl_k1_mean": 0.6, "proxy_mean": 0.8},
           {"kind": "ppo", "name": "step-1", "kl_k1_mean": 0.3, "proxy_mean": 0.35},
           {"kind": "ppo", "name": "step-2", "kl_k1_mean": 2.0, "proxy_mean": 1.0}]
    out = proxy_per_nat(pts)
    # step-1: PPO (0.35 - 0.2) / 0.3 = 0.5; best-of-n at KL 0.3 is halfway: 0.2 + 0.5 * 0.6 = 0.5 -> 0.3 / 0.3 = 1
    assert out[0]["ppo_per_nat"] == pytest.approx(0.5) and out[0]["bon_per_nat"] == pytest.approx(1.0)
    # step-2: (1.0 - 0.2) / 2 = 0.4; KL 2 is beyond best-of-n's range
    assert out[1]["ppo_per_nat"] == pytest.approx(0.4) and out[1]["bon_per_nat"] is None


def test_gold_at_equal_kl_reads_each_fit_within_its_own_points():
    from pipeline.evaluation.curves import gold_at_kl, series_title

    pts = [{"kind": "ppo", "series": "ppo", "kl_k1_mean": 2.0}, {"kind": "ppo", "series": "ppo", "kl_k1_mean": 0.7},
           {"kind": "ppo", "series": "rloo:sweep", "kl_k1_mean": 0.3}, {"kind": "bon", "kl_k1_mean": 0.5}]
    fits = {"ppo": {"form": "rl", "alpha": 1.0, "beta": 0.5, "gold_start": 0.2},
            "rloo:sweep": {"form": "rl", "alpha": 1.0, "beta": 0.5, "gold_start": 0.2},
            "bon": {"form": "bon", "alpha": 1.0, "beta": 0.5, "gold_start": 0.2}}
    out = gold_at_kl(pts, fits)
    # ppo reaches KL 2: levels 0.125 ... 2. At KL 1, d = 1: R = 1 (1 - 0.5 ln 1) = 1 -> 1.2;
    # at KL 0.25, d = 0.5: R = 0.5 (1 - 0.5 ln 0.5) = 0.5 * 1.3465736 = 0.6732868 -> 0.8732868
    assert sorted(out["ppo"]) == [0.125, 0.25, 0.5, 1.0, 2.0]
    assert out["ppo"][1.0] == pytest.approx(1.2) and out["ppo"][0.25] == pytest.approx(0.8732868)
    assert sorted(out["rloo:sweep"]) == [0.125, 0.25]  # its points stop at KL 0.3
    # best-of-n form at KL 0.5, d = 0.7071068: R = d (1 - 0.5 d) = 0.7071068 * 0.6464466 = 0.4571068 -> 0.6571068
    assert out["bon"][0.5] == pytest.approx(0.6571068)
    assert (series_title("ppo"), series_title("rloo:sweep")) == ("PPO", "RLOO (sweep)")


def test_win_rate_ties_count_half_and_wilson_interval():
    # pairs: win, tie, loss, win -> (2 + 0.5) / 4
    rate, lo, hi = win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    assert rate == 0.625
    # Wilson, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    assert (lo, hi) == pytest.approx((0.21943, 0.90810), abs=1e-5)
    assert win_rate([1, 1, 1], [1, 1, 1])[0] == 0.5
    # 0 wins out of 10: the classic Wilson upper bound z^2/(n + z^2) = 0.2775
    rate, lo, hi = win_rate([0] * 10, [1] * 10)
    assert rate == 0.0 and lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(0.5, 8) == pytest.approx((0.21522, 0.78478), abs=1e-5)
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


# ---------------------------------------------------------------------------------------------
# End to end: sft -> reward -> ppo -> eval through the CLI on the tiny config

PROMPTS = ["How do I keep my plants healthy?", "Tell me a fun fact about the ocean.",
           "Could you suggest a quick breakfast idea?", "What a lovely day, any plans?",
           "How was your day?", "Give me a tip for learning."]
GOOD = ["Water them regularly, they will be great!", "The ocean is wonderful and huge.",
        "Try oatmeal with fresh berries, lovely!", "Yes, a wonderful walk in the sun.",
        "Great, thank you so much!", "Practice a little every day, it is fun."]
BAD = ["This is terrible.", "I am sad about it.", "Nothing, it is awful.", "I hate this.", "Bad.",
       "Terrible idea."]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention on 2 shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_data")
    sft = _write_jsonl(tmp / "sft.jsonl", [{"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": g}]}
                                           for p, g in zip(PROMPTS, GOOD)])
    pairs = _write_jsonl(tmp / "pairs.jsonl", [{"prompt": p, "chosen": g, "rejected": b}
                                               for p, g, b in zip(PROMPTS, GOOD, BAD)])
    prompts = _write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return [f"data.sft_train={sft}", f"data.sft_eval={sft}", f"data.pairs_train={pairs}",
            f"data.pairs_eval={pairs}", f"data.prompts_train={prompts}", f"data.prompts_eval={prompts}",
            "sft.gold_eval_prompts=0", "sft.max_steps=2", "reward.max_steps=2",
            "eval.forgetting=data/general_text.jsonl"]


def _cli(stage, run, *overrides):
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, [stage, "--config", "configs/tiny.yaml", "--run-dir", str(run), *overrides])


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, data_overrides, one_thread):
    run = tmp_path_factory.mktemp("eval_e2e") / "run"
    for stage in ("sft", "reward", "ppo", "eval"):
        result = _cli(stage, run, *data_overrides)
        assert result.exit_code == 0, (stage, result.output, result.exception)
    again = _cli("eval", run, *data_overrides)
    rows = list(csv.DictReader(open(run / "eval" / "curves.csv")))
    return run, rows, result.output, again


def _f(row, key):
    return float(row[key])


def test_eval_curves_csv_numbers_are_consistent(eval_run):
    run, rows, output, _ = eval_run
    assert list(rows[0]) == list(CSV_COLUMNS)
    by_name = {r["name"]: r for r in rows}
    assert [r["kind"] for r in rows] == ["base", "sft", "ppo", "ppo", "bon", "bon", "bon"]
    # tiny.yaml: ppo.steps=3, save_every=2 -> checkpoints at steps 2 and 3 (the final one)
    assert [r["name"] for r in rows if r["kind"] == "ppo"] == ["step-000002", "step-000003"]
    assert [int(r["step"]) for r in rows if r["kind"] == "ppo"] == [2, 3]
    prompts, spp = 4, 2  # tiny.yaml eval section
    for r in rows:
        if r["kind"] != "bon":
            assert int(r["n_samples"]) == prompts * spp
        assert _f(r, "win_lo") <= _f(r, "win_rate") <= _f(r, "win_hi")
        assert _f(r, "kl_k3_mean") >= 0.0  # k3 is never negative
        assert _f(r, "sqrt_kl") == math.sqrt(max(_f(r, "kl_k1_mean"), 0.0))
        for key in ("proxy_mean", "gold_mean", "kl_k1_mean"):
            assert math.isfinite(_f(r, key))

    # The reference is the SFT adapter (ppo.reference=sft): SFT's KL is exactly 0 with both estimators,
    # although it is computed (two forwards under separately switched adapter sets), not assumed.
    sft = by_name["sft"]
    assert _f(sft, "kl_k1_mean") == 0.0 and _f(sft, "kl_k3_mean") == 0.0 and _f(sft, "kl_k1_se") == 0.0
    assert _f(sft, "win_rate") == 0.5  # SFT against its own responses: all ties

    # The base (all adapters off) differs from the SFT model: a positive k3 estimate, and a finite k1.
    base = by_name["base"]
    assert _f(base, "kl_k3_mean") > 0.0
    assert _f(base, "kl_k1_se") > 0.0

    # best-of-n: analytic KL, exactly; groups of n out of max(best_of_n)=4 samples per prompt
    for n in (1, 2, 4):
        r = by_name[f"n={n}"]
        assert _f(r, "kl_k1_mean") == math.log(n) - (n - 1) / n
        assert _f(r, "kl_k3_mean") == math.log(n) - (n - 1) / n
        assert _f(r, "kl_k1_se") == 0.0
        assert int(r["n_samples"]) == prompts * (4 // n)
    # same pool: the best of each group of 4 is at least the mean of those 4 (n=1 averages all of them)
    assert _f(by_name["n=4"], "proxy_mean") >= _f(by_name["n=1"], "proxy_mean") - 1e-9

    # The forgetting check (eval.forgetting=data/general_text.jsonl, set in data_overrides): the base against itself
    # is exactly 0 (computed: a second forward with every adapter off); trained adapters move away from it.
    assert _f(base, "general_kl_to_base") == 0.0
    for r in rows:
        if r["kind"] == "bon":  # best-of-n is the SFT model's samples, no model of its own
            assert (r["general_nll"], r["general_ppl"], r["general_kl_to_base"]) == ("", "", "")
            continue
        assert _f(r, "general_ppl") == pytest.approx(math.exp(_f(r, "general_nll")), rel=1e-12)
        if r["kind"] != "base":
            assert _f(r, "general_kl_to_base") > 0.0 and _f(r, "general_nll") != _f(base, "general_nll")


def test_eval_outputs_manifest_summary_samples_and_png(eval_run):
    run, rows, output, again = eval_run
    out = run / "eval"
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (out / "summary.txt").read_text()
    assert "gold peaks at step-00000" in summary
    # which way PPO against best-of-n goes on a tiny random model is the samples' noise; that it is said is the test
    assert "Gao et al. 2022 fits" in summary
    assert re.search(r"(reached|did not reach) a higher gold than best-of-n", summary)
    assert set(json.loads((out / "manifest.json").read_text())["metrics"]["fits"]) <= {"ppo", "bon"}
    assert "gold peaks at" in output  # printed at the end
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval"
    points = manifest["metrics"]["points"]
    assert [p["name"] for p in points] == [r["name"] for r in rows]
    assert [p["gold_mean"] for p in points] == [float(r["gold_mean"]) for r in rows]
    # every sampled model keeps its per-prompt means (paired falls, pipeline/evaluation/overopt.py): one per
    # prompt, averaging to the point's mean (equal sample counts per prompt); best-of-n's picks keep none
    for p in points:
        if p["kind"] == "bon":
            assert "gold_by_prompt" not in p
            continue
        assert len(p["gold_by_prompt"]) == len(p["proxy_by_prompt"]) == 4
        assert sum(p["gold_by_prompt"]) / 4 == pytest.approx(p["gold_mean"], abs=1e-12)
        assert sum(p["proxy_by_prompt"]) / 4 == pytest.approx(p["proxy_mean"], abs=1e-12)
    assert set(manifest["adapters"]) == {"sft", "ppo:step-000002", "ppo:step-000003"}
    general = manifest["metrics"]["forgetting"]
    assert (general["source"], general["passages"]) == ("data/general_text.jsonl", 48)
    assert set(general["models"]) == {"base", "sft", "step-000002", "step-000003"}
    assert sum(general["models"]["sft"]["token_counts"]) == general["tokens"] == general["models"]["sft"]["tokens"]
    assert [p["general_nll"] for p in points] == [float(r["general_nll"]) if r["general_nll"] else None for r in rows]
    assert manifest["data"]["forgetting"]["rows"] == 48 and len(manifest["data"]["forgetting"]["sha256"]) == 64
    table = summary[summary.index("Forgetting check on data/general_text.jsonl (48 passages"):].splitlines()
    assert [line.split()[0] for line in table[3:7]] == ["base", "sft", "step-000002", "step-000003"]
    assert table[3].split()[1:] == [f"{general['models']['base']['nll']:.4f}", "+0.0000",
                                    f"{general['models']['base']['ppl']:.3f}", "0.0000"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().split("\n") if line.strip()]
    assert {s["name"] for s in samples} >= {"base", "sft", "step-000002", "step-000003", "n=4"}
    for s in samples:
        assert isinstance(s["response"], str) and math.isfinite(s["gold"]) and math.isfinite(s["proxy"])
        if s["name"] == "sft":
            assert s["kl_k1"] == 0.0 and s["kl_k3"] == 0.0
    # a second eval refuses to overwrite a complete output
    assert again.exit_code != 0 and "already holds a complete eval output" in again.output


# ---------------------------------------------------------------------------------------------
# Several PPO-family runs on one plot (eval.runs)


def _linked_run(path, source):
    path.mkdir()
    for stage in ("sft", "reward"):
        (path / stage).symlink_to(source / stage, target_is_directory=True)
    return path


@pytest.fixture(scope="module")
def compare_runs(eval_run, data_overrides, tmp_path_factory, one_thread):
    """An RLOO run from eval_run's SFT and reward, evaluated alone, and one eval of both runs from a third
    folder that has no ppo/ of its own (eval.runs = [the PPO run folder, the RLOO ppo output folder])."""
    run = eval_run[0]
    tmp = tmp_path_factory.mktemp("compare")
    rloo = _linked_run(tmp / "rloo", run)
    for stage, extra in (("ppo", ["ppo.algorithm=rloo", "ppo.samples_per_prompt=2"]), ("eval", [])):
        r = _cli(stage, rloo, *data_overrides, *extra)
        assert r.exit_code == 0, (stage, r.output, r.exception)
    both = _linked_run(tmp / "both", run)
    r = _cli("eval", both, *data_overrides, f"eval.runs=[{run}, {rloo / 'ppo'}]")
    assert r.exit_code == 0, (r.output, r.exception)
    return run, rloo, both, r.output


def _csv(folder):
    return list(csv.DictReader(open(folder / "eval" / "curves.csv")))


def test_eval_runs_put_each_run_on_the_plot_as_its_own_series(compare_runs):
    run, rloo, both, output = compare_runs
    rows = _csv(both)
    assert [(r["kind"], r["series"], r["name"]) for r in rows] == [
        ("base", "base", "base"), ("sft", "sft", "sft"),
        ("ppo", "ppo", "ppo/step-000002"), ("ppo", "ppo", "ppo/step-000003"),
        ("ppo", "rloo", "rloo/step-000002"), ("ppo", "rloo", "rloo/step-000003"),
        ("bon", "bon", "n=1"), ("bon", "bon", "n=2"), ("bon", "bon", "n=4")]
    # Each series holds its own run's checkpoints: its numbers are exactly those of that run evaluated alone
    # (same adapters, same sampling seeds, same reference, proxy and gold), and base, SFT and best-of-n
    # are the same models as in either single-run eval.
    numbers = [c for c in CSV_COLUMNS if c not in ("kind", "name", "series")]
    alone = {("ppo", r["name"]): r for r in _csv(run)} | {("rloo", r["name"]): r for r in _csv(rloo)}
    for r in rows:
        key = (r["series"], r["name"].split("/")[-1]) if r["kind"] == "ppo" else ("ppo", r["name"])
        assert {c: r[c] for c in numbers} == {c: alone[key][c] for c in numbers}, r["name"]
    assert [r["series"] for r in _csv(run)] == ["base", "sft", "ppo", "ppo", "bon", "bon", "bon"]
    assert [r["series"] for r in _csv(rloo) if r["kind"] == "ppo"] == ["rloo", "rloo"]

    manifest = json.loads((both / "eval" / "manifest.json").read_text())
    series = manifest["metrics"]["series"]
    assert [(s["key"], s["title"], s["algorithm"], s["source"]) for s in series] == [
        ("ppo", "PPO", "ppo", "eval.runs[0]"), ("rloo", "RLOO", "rloo", "eval.runs[1]")]
    assert series[1]["samples_per_prompt"] == 2 and series[1]["path"] == str(rloo / "ppo")
    assert set(manifest["metrics"]["fits"]) <= {"ppo", "rloo", "bon"}
    assert {"ppo:ppo/step-000003", "ppo:rloo/step-000003"} <= set(manifest["adapters"])
    summary = (both / "eval" / "summary.txt").read_text()
    assert f"series: PPO = {run / 'ppo'} (eval.runs[0]); RLOO = {rloo / 'ppo'} (eval.runs[1])" in summary
    assert "among PPO checkpoints" in summary and "among RLOO checkpoints" in summary
    assert "RLOO reached a higher gold than best-of-n" in summary or "RLOO did not reach a higher" in summary
    png = (both / "eval" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no complete PPO output" in output and "and the runs in eval.runs" in output


def test_eval_runs_refuse_runs_that_do_not_share_the_start(compare_runs, data_overrides, tmp_path):
    """By name: a folder with no ppo output, and a run whose SFT adapter (by content hash) is another."""
    run, rloo, _, _ = compare_runs
    other = _linked_run(tmp_path / "other", run)
    r = _cli("eval", other, *data_overrides, f"eval.runs=[{rloo}, {tmp_path}]")
    assert r.exit_code != 0 and f"eval.runs[1]: {tmp_path} is neither a run folder" in r.output, r.output
    foreign = tmp_path / "foreign" / "ppo"
    foreign.parent.mkdir()
    shutil.copytree(rloo / "ppo", foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["adapters"]["sft"] = {"path": "/elsewhere/sft", "sha256": "f" * 64}
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    r = _cli("eval", other, *data_overrides, f"eval.runs=[{rloo}, {foreign.parent}]")
    assert r.exit_code != 0
    assert f"eval.runs[1]: the run in {foreign} started from /elsewhere/sft (sha256 ffffffffffff)" in r.output
    assert "must share the SFT model" in r.output and "Traceback" not in r.output


def test_eval_forgetting_empty_skips_it_and_a_missing_file_stops_first(eval_run, data_overrides, tmp_path):
    run = eval_run[0]
    missing = _cli("eval", _linked_run(tmp_path / "missing", run), *data_overrides, "eval.forgetting=nope.jsonl")
    assert missing.exit_code != 0 and "nope.jsonl: file not found" in missing.output
    assert "[model]" not in missing.output  # stopped before any model loaded
    skipped = _linked_run(tmp_path / "skipped", run)
    r = _cli("eval", skipped, *data_overrides, "eval.forgetting=")
    assert r.exit_code == 0, (r.output, r.exception)
    rows = _csv(skipped)
    assert [r_["kind"] for r_ in rows] == ["base", "sft", "bon", "bon", "bon"]
    assert all(r_[c] == "" for r_ in rows for c in ("general_nll", "general_ppl", "general_kl_to_base"))
    assert "Forgetting check" not in (skipped / "eval" / "summary.txt").read_text()
    assert "forgetting" not in json.loads((skipped / "eval" / "manifest.json").read_text())["metrics"]


def test_exact_cat_fusion_of_a_checkpoint_is_recognised():
    from pipeline.evaluation.runs import exact_copy_of

    ckpts = {"b" * 64: "step-000030", "c" * 64: "step-000015"}
    cat = {"method": "cat", "weights": [1.0, 1.0],
           "adapters": {"sft": {"sha256": "a" * 64}, "ppo": {"sha256": "b" * 64}}}
    assert exact_copy_of(cat, "a" * 64, ckpts) == "step-000030"
    assert exact_copy_of({**cat, "weights": [1.0, 0.5]}, "a" * 64, ckpts) is None  # weighted: another model
    assert exact_copy_of({**cat, "method": "learned", "weights": None}, "a" * 64, ckpts) is None
    assert exact_copy_of(cat, "d" * 64, ckpts) is None  # another SFT adapter
    assert exact_copy_of({**cat, "adapters": {"sft": {"sha256": "a" * 64}, "ppo": {"sha256": "e" * 64}}},
                         "a" * 64, ckpts) is None  # a PPO adapter this eval has no checkpoint of


def test_eval_phase_seconds_by_hand():
    from pipeline.stages.evaluate import phase_seconds

    got = phase_seconds([{"generate": 3, "kl": 1, "score": 2}, {"generate": 5, "kl": 1, "score": 2}],
                        {"generate": 4, "kl": 0.0, "score": 1}, 2.0, 25.0)
    # the docstring's example: 8 + 2 + 4 + 5 + 2 = 21 of 25 accounted for
    assert got == {"generate": 8, "kl": 2, "score": 4, "best_of_n": 5, "forgetting": 2, "other": 4, "total": 25}


def test_eval_kl_over_the_samplers_trunk_is_the_full_forwards(eval_run, data_overrides, tmp_path, monkeypatch,
                                                              one_thread):
    """A policy with LoRA on the top layer only, float32: eval's reference pass replays the layer below from
    the sampler (trunk.sampled_response_hidden, for every PPO checkpoint) and the curves' KL columns equal
    an eval whose reference runs every layer (trunk.SHARE_TRUNK off), to float round-off."""
    from pipeline.models import trunk

    run = _linked_run(tmp_path / "top1", eval_run[0])
    extra = ["ppo.lora.top_layers=1", "model.compute_dtype=float32", "eval.best_of_n=[]", "eval.forgetting="]
    r = _cli("ppo", run, *data_overrides, *extra)
    assert r.exit_code == 0, (r.output, r.exception)
    served = []
    real = trunk.sampled_response_hidden
    monkeypatch.setattr(trunk, "sampled_response_hidden", lambda *a, **k: served.append(real(*a, **k)) or served[-1])
    curves = {}
    for share in (True, False):
        monkeypatch.setattr(trunk, "SHARE_TRUNK", share)
        r = _cli("eval", run, *data_overrides, *extra, "--overwrite")
        assert r.exit_code == 0, (r.output, r.exception)
        curves[share] = {row["name"]: row for row in _csv(run)}
    assert len(served) == 2 and all(h is not None for h in served)  # the two checkpoints, the first eval only
    for name, row in curves[False].items():
        for key in ("kl_k1_mean", "kl_k3_mean", "proxy_mean", "gold_mean"):
            assert _f(curves[True][name], key) == pytest.approx(_f(row, key), rel=1e-4, abs=1e-5), (name, key)
    assert _f(curves[True]["step-000003"], "kl_k3_mean") > 0.0
