"""Best-of-n picking (pipeline/evaluation/bestofn.py) on hand-made scores."""
import math

import pytest

from pipeline.evaluation.bestofn import best_of_n
from pipeline.evaluation.stats import bon_kl


def test_best_of_n_groups_picks_and_pairs_by_hand():
    # 2 prompts x a pool of 4; the comparator has k=2 samples per prompt
    proxy = [0.1, 0.9, 0.5, 0.5,
             0.3, 0.2, 0.7, 0.1]
    gold = [1.0, 2.0, 3.0, 4.0,
            5.0, 6.0, 7.0, 8.0]
    comparator = [1.5, 3.5,
                  9.0, 6.5]
    out = best_of_n(proxy, gold, comparator, prompts=2, pool_size=4, k=2, ns=[2, 4, 1, 2])
    assert [b.n for b in out] == [1, 2, 4]  # distinct n, increasing

    n2 = out[1]
    # groups of 2: {0,1} {2,3} | {4,5} {6,7}; a tie (0.5, 0.5) goes to the first
    assert n2.picks == [(0, 0, 1), (0, 1, 2), (1, 0, 4), (1, 1, 6)]
    assert n2.kl == bon_kl(2)
    p = n2.point
    assert (p["kind"], p["name"], p["step"], p["n_samples"]) == ("bon", "n=2", None, 4)
    assert p["gold_mean"] == pytest.approx((2.0 + 3.0 + 5.0 + 7.0) / 4)
    assert p["proxy_mean"] == pytest.approx((0.9 + 0.5 + 0.3 + 0.7) / 4)
    # group g of prompt i against comparator sample g % k: 2>1.5, 3<3.5, 5<9, 7>6.5
    assert p["win_rate"] == pytest.approx(0.5)
    assert (p["kl_k1_mean"], p["kl_k1_se"], p["kl_k3_mean"]) == (bon_kl(2), 0.0, bon_kl(2))
    assert p["sqrt_kl"] == pytest.approx(math.sqrt(bon_kl(2)))

    n4 = out[2]  # one group per prompt, compared with sample 0
    assert n4.picks == [(0, 0, 1), (1, 0, 6)]
    assert n4.point["win_rate"] == pytest.approx(0.5)  # 2 > 1.5, 7 < 9

    n1 = out[0]  # every pool sample is its own pick; KL 0
    assert [r for _, _, r in n1.picks] == list(range(8))
    assert n1.point["kl_k1_mean"] == 0.0
