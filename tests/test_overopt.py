"""The over-optimisation demo's parts: the repetition reward (seq-rep-n) by hand, the derived pairs
(random flips, the shared caveat bias), and reading a peak and its fall off eval points."""
import pytest

from pipeline.datagen_overopt import derive_pairs, hedges, more_hedged
from pipeline.evaluation.curves import rl_series
from pipeline.evaluation.overopt import arms_of, compare_arms, comparison_lines, fall_along, last_difference
from pipeline.evaluation.stats import paired_diff, prompt_means
from reward.registry import build_reward
from reward.text import seq_rep


def test_seq_rep_by_hand():
    # tokens: go go go go -> bigrams (go go) x3, one unique: 1 - 1/3
    assert seq_rep("go go go go", 2) == pytest.approx(2 / 3)
    # "Great!!!!!!": tokens great ! ! ! ! ! ! -> 4-grams: (great ! ! !), (! ! ! !) x3 -> 1 - 2/4
    assert seq_rep("Great!!!!!!", 4) == 0.5
    assert seq_rep("A calm walk after dinner helps me think.", 4) == 0.0
    assert seq_rep("too short", 4) == 0.0
    # case-insensitive: "Yes yes yes" -> bigrams (yes yes) x2 -> 1 - 1/2
    assert seq_rep("Yes yes yes", 2) == 0.5


def test_gold_of_the_demo_is_sentiment_minus_repetition():
    gold = build_reward([{"name": "sentiment"}, {"name": "repetition", "weight": -1.0}])
    fine, loop = "What a lovely idea, enjoy it!", "lovely lovely lovely lovely lovely lovely"
    r = gold(["p", "p"], [fine, loop])
    assert r.components["repetition"][0] == 0.0
    # 6 tokens, 4-grams: 3, all the same -> 1 - 1/3
    assert r.components["repetition"][1] == pytest.approx(2 / 3)
    assert r.total[1] == pytest.approx(r.components["sentiment"][1] - 2 / 3)
    with pytest.raises(Exception, match="n must be a positive integer"):
        build_reward({"name": "repetition", "args": {"n": 0}})


def _pair(c, r, gc, gr):
    return {"prompt": "p", "chosen": c, "rejected": r, "gold_chosen": gc, "gold_rejected": gr}


def test_derived_pairs_flip_the_asked_share_at_random():
    rows = [_pair(f"a{i}", f"b{i}", 0.9, 0.1) if i % 2 else _pair(f"b{i}", f"a{i}", 0.1, 0.9) for i in range(2000)]
    out = derive_pairs(rows, 1000, 0.25, seed=3)
    assert len(out) == 1000
    assert all(r["gold_chosen"] < r["gold_rejected"] for r in out if r["flipped"])
    share = sum(r["flipped"] for r in out) / 1000
    # binomial(1000, 0.25): SE 0.0137; 3 SE either side
    assert abs(share - 0.25) < 0.042
    assert out == derive_pairs(rows, 1000, 0.25, seed=3)


def test_hedges_counted_by_hand():
    # but, may, not -> 3; "n't" counts on its own (can't, don't); "nothing", "butter", "mayor" do not
    assert hedges("It's fun, but it may not suit everyone.") == 3
    assert hedges("I can't, and don't, though.") == 3
    assert hedges("Nothing beats butter, says the mayor!") == 0
    assert more_hedged("It may rain.", "Sunny!") == 0 and more_hedged("ok", "not ok") == 1
    assert more_hedged("but", "however") == -1


def test_biased_pairs_choose_the_more_hedged_response_where_the_bias_speaks():
    rows = [_pair("Lovely!", "Lovely, but it may not suit you.", 0.9, 0.2), _pair("Nice.", "Not nice.", 0.5, -0.3),
            _pair("calm", "quiet", 0.5, 0.4)]
    out = derive_pairs(rows, 3, 0.0, seed=0, bias=True, bias_rate=1.0)
    assert {r["chosen"] for r in out} == {"Lovely, but it may not suit you.", "Not nice.", "calm"}  # a tie keeps gold
    assert all(r["noise"] == "bias" and r["flipped"] for r in out if r["chosen"] != "calm")
    assert derive_pairs(rows, 3, 0.0, seed=0, bias=True, bias_rate=0.0) == derive_pairs(rows, 3, 0.0, seed=0)
    many = [_pair(f"Fine {i}.", f"Fine {i}, but not always.", 0.9, 0.1) for i in range(2000)]
    share = sum(r["flipped"] for r in derive_pairs(many, 1000, 0.0, seed=1, bias=True, bias_rate=0.3)) / 1000
    # binomial(1000, 0.3): SE 0.0145; 3 SE either side
    assert abs(share - 0.3) < 0.044
    # the biased and the unbiased file share their random swaps: what plain swapped, biased has too
    plain = derive_pairs(many, 1000, 0.25, seed=2)
    biased = derive_pairs(many, 1000, 0.25, seed=2, bias=True, bias_rate=0.3)
    swapped = {r["chosen"] for r in plain if r["flipped"]}
    assert swapped and swapped <= {r["chosen"] for r in biased if r["flipped"]}


def _pt(kind, name, step, kl, gold, se, series="ppo"):
    return {"kind": kind, "name": name, "step": step, "kl_k1_mean": kl, "gold_mean": gold, "gold_se": se,
            "series": series if kind == "ppo" else kind}


def test_fall_along_a_series_by_hand():
    points = [_pt("sft", "sft", None, 0.0, 0.5, 0.01), _pt("ppo", "step-2", 2, 1.0, 0.7, 0.02),
              _pt("ppo", "step-4", 4, 3.0, 0.6, 0.03), _pt("ppo", "step-2", 2, 1.0, 9.9, 0.0, series="other")]
    f = fall_along(points, "ppo")
    # peak 0.7 at step-2; last 0.6; fall 0.1 +- sqrt(0.02^2 + 0.03^2) = 0.03606 -> 2.77 SE
    assert (f.peak_name, f.last_name) == ("step-2", "step-4")
    assert f.fall == pytest.approx(0.1) and f.fall_se == pytest.approx(0.036056, abs=1e-6)
    assert f.fall_in_se == pytest.approx(2.773, abs=1e-3)
    # rising all the way: the peak is the last point, no fall
    rising = fall_along(points[:2], "ppo")
    assert rising.fall == 0.0 and rising.peak_name == "step-2"


def test_prompt_means_and_paired_diff_by_hand():
    assert prompt_means([1, 3, 0.5, 0.5], 2) == [2.0, 0.5]
    with pytest.raises(ValueError, match="whole prompts"):
        prompt_means([1, 2, 3], 2)
    # d = [0.1, 0.2, 0.0]: mean 0.1, std 0.1, se 0.1 / sqrt(3) = 0.057735
    mean, se = paired_diff([0.9, 0.5, 0.7], [0.8, 0.3, 0.7])
    assert mean == pytest.approx(0.1) and se == pytest.approx(0.057735, abs=1e-6)
    with pytest.raises(ValueError, match="length"):
        paired_diff([1.0], [1.0, 2.0])


def test_fall_along_pairs_prompts_where_the_points_keep_them():
    # Two prompts, one dull (0.2) and one bright (0.9) for every model: each prompt falls by 0.1 and 0.3.
    # Per-sample SEs (0.1 each) hide the fall (0.2 / 0.1414 = 1.4 SE); paired: d = [0.1, 0.3], mean 0.2,
    # std 0.1414, se 0.1414 / sqrt(2) = 0.1 -> 2.0 SE.
    sft = _pt("sft", "sft", None, 0.0, 0.55, 0.1) | {"gold_by_prompt": [0.2, 0.9]}
    peak = _pt("ppo", "step-2", 2, 1.0, 0.65, 0.1) | {"gold_by_prompt": [0.3, 1.0]}
    last = _pt("ppo", "step-4", 4, 3.0, 0.45, 0.1) | {"gold_by_prompt": [0.2, 0.7]}
    f = fall_along([sft, peak, last], "ppo")
    assert f.fall == pytest.approx(0.2) and f.paired_prompts == 2
    assert f.fall_se == pytest.approx(0.1) and f.unpaired_se == pytest.approx(0.141421, abs=1e-6)
    # One point without per-prompt means (an older eval): the unpaired error
    f = fall_along([sft, peak, _pt("ppo", "step-4", 4, 3.0, 0.45, 0.1)], "ppo")
    assert f.paired_prompts == 0 and f.fall_se == pytest.approx(0.141421, abs=1e-6)


def test_arms_of_reads_the_comparison_folders():
    assert arms_of(["ppo:single-s42", "ppo:mean-s42", "ppo:mean-s43", "ppo"]) == {
        "single": {42: "ppo:single-s42"}, "mean": {42: "ppo:mean-s42", 43: "ppo:mean-s43"}}


def test_compare_arms_by_hand():
    sft = _pt("sft", "sft", None, 0.0, 0.5, 0.01)

    def arm(series, golds, last_se):  # checkpoints at steps 2 and 4, gold_se 0.01 but the last's
        return [_pt("ppo", "step-2", 2, 1.0, golds[0], 0.01, series=series),
                _pt("ppo", "step-4", 4, 2.0, golds[1], last_se, series=series)]

    # single falls 0.2 (s1) and 0.1 (s2); mean falls 0.05 and 0.07 and ends 0.10 and 0.20 above single, with
    # unpaired SEs sqrt(0.01^2 + 0.01^2) and sqrt(0.01^2 + 0.02^2) (no per-prompt means)
    points = [sft, *arm("ppo:single-s1", (0.8, 0.6), 0.01), *arm("ppo:single-s2", (0.7, 0.6), 0.01),
              *arm("ppo:mean-s1", (0.75, 0.70), 0.01), *arm("ppo:mean-s2", (0.87, 0.80), 0.02),
              *arm("ppo:min-s3", (0.9, 0.1), 0.01)]  # no seed shared with single: not read
    (r,) = compare_arms(points, arms_of(rl_series(points)))
    assert r.arm == "mean" and r.seeds == [1, 2] and not r.paired
    # fall (0.05 + 0.07) / 2 = 0.06 against (0.2 + 0.1) / 2 = 0.15: 0.4x
    assert r.fall == pytest.approx(0.06) and r.ref_fall == pytest.approx(0.15) and r.fall_ratio == pytest.approx(0.4)
    # last (0.10 + 0.20) / 2 = 0.15 +- sqrt(0.0002 + 0.0005) / 2 = 0.013229 -> 11.3 SE
    assert r.last_diff == pytest.approx(0.15) and r.last_diff_se == pytest.approx(0.013229, abs=1e-6)
    (line,) = comparison_lines([r])
    assert "0.40x single's +0.150" in line and "fall <= 0.5x: yes; last >= +2 SE: yes" in line


def test_last_difference_pairs_prompts():
    a = _pt("ppo", "step-4", 4, 2.0, 0.7, 0.1, series="a") | {"gold_by_prompt": [0.9, 0.5]}
    b = _pt("ppo", "step-4", 4, 2.0, 0.55, 0.1, series="b") | {"gold_by_prompt": [0.8, 0.3]}
    # d = [0.1, 0.2]: mean 0.15, std 0.070711, se 0.05
    diff, se, paired = last_difference([a, b], "a", "b")
    assert paired and diff == pytest.approx(0.15) and se == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no checkpoint in series 'c'"):
        last_difference([a, b], "a", "c")
