"""pipeline/rl/early_stop.py against numbers worked by hand, and the config keys that drive it."""
import pytest

from pipeline.config import ConfigError, load_config, monitor_ids
from pipeline.rl.early_stop import (
    history_from_rows,
    nearest_step,
    peak_watch,
    trailing_means,
)


def test_trailing_means_average_the_last_window_values():
    # window 2: [1], [1, 3], [3, 5], [5, 4] -> 1, 2, 4, 4.5
    assert trailing_means([1, 3, 5, 4], 2) == [1.0, 2.0, 4.0, 4.5]
    # window 3 over fewer values takes what exists: [2], [2, 4], [2, 4, 9], [4, 9, 1]
    assert trailing_means([2, 4, 9, 1], 3) == [2.0, 3.0, 5.0, 14 / 3]
    # a window longer than the series is the running mean
    assert trailing_means([4, 0, 2], 10) == [4.0, 2.0, 2.0]


def test_window_one_is_the_raw_series():
    w = peak_watch([1, 5, 2, 3], window=1, patience=2)
    assert w.smoothed == [1.0, 5.0, 2.0, 3.0]
    # peak 5 at step 2; 4 - 2 = 2 steps since >= patience 2
    assert (w.best_step, w.best_value, w.stop) == (2, 5.0, True)


def test_docstring_example():
    # smoothed (window 2) [1, 2, 4, 4.5, 3, 2]: peak at step 4, 6 - 4 = 2 < patience 3
    w = peak_watch([1, 3, 5, 4, 2, 2], window=2, patience=3)
    assert w.smoothed == [1.0, 2.0, 4.0, 4.5, 3.0, 2.0]
    assert (w.best_step, w.best_value, w.stop) == (4, 4.5, False)
    # one more 2: smoothed (2 + 2) / 2 = 2 at step 7; 7 - 4 = 3 >= 3
    assert peak_watch([1, 3, 5, 4, 2, 2, 2], window=2, patience=3).stop
    # min_delta 0.5: 4.5 does not beat 4 by more than 0.5, so the peak stays at step 3; 6 - 3 = 3
    w = peak_watch([1, 3, 5, 4, 2, 2], window=2, patience=3, min_delta=0.5)
    assert (w.best_step, w.best_value, w.stop) == (3, 4.0, True)


def test_ties_keep_the_earliest_peak():
    # window 1: 3 at steps 2 and 4; the later 3 does not beat the first, so the peak is step 2
    w = peak_watch([1, 3, 2, 3], window=1, patience=5)
    assert (w.best_step, w.best_value) == (2, 3.0)
    # window 2: smoothed [2, 3, 3, 3]: the plateau's first step (2) is the peak; 4 - 2 = 2 == patience
    w = peak_watch([2, 4, 2, 4], window=2, patience=2)
    assert w.smoothed == [2.0, 3.0, 3.0, 3.0]
    assert (w.best_step, w.stop) == (2, True)


def test_min_delta_needs_a_strictly_larger_gain():
    # window 1, min_delta 1: 2 beats 1 by exactly 1 (not more): no new peak; 2.5 beats 1 by 1.5: new peak
    assert peak_watch([1, 2], window=1, patience=9, min_delta=1.0).best_step == 1
    assert peak_watch([1, 2, 2.5], window=1, patience=9, min_delta=1.0).best_step == 3
    # min_delta is measured from the best, not from the previous step: 1, 1.6, 2.2 each rise 0.6 < 1,
    # but 2.2 beats the best (1) by 1.2
    assert peak_watch([1, 1.6, 2.2], window=1, patience=9, min_delta=1.0).best_step == 3


def test_patience_is_reached_exactly():
    # window 1, peak 9 at step 2; patience 3 stops when len - 2 >= 3, i.e. at 5 values, not at 4
    assert not peak_watch([0, 9, 1, 1], window=1, patience=3).stop
    assert peak_watch([0, 9, 1, 1, 1], window=1, patience=3).stop
    # a new peak resets it: step 5 (10) is the best, 5 - 5 = 0
    w = peak_watch([0, 9, 1, 1, 10], window=1, patience=3)
    assert (w.best_step, w.stop) == (5, False)
    # a rising series never stops
    assert not peak_watch([1, 2, 3, 4, 5, 6], window=1, patience=1).stop


def test_smoothing_delays_the_peak():
    # raw peak at step 3 (8); window 3 means: 2, 2, 4, 14/3, 13/3, 2 -> smoothed peak at step 4
    w = peak_watch([2, 2, 8, 4, 1, 1], window=3, patience=2)
    assert w.smoothed[:2] == [2.0, 2.0] and w.smoothed[2] == 4.0
    assert w.smoothed[3] == pytest.approx(14 / 3) and w.smoothed[4] == pytest.approx(13 / 3)
    assert (w.best_step, w.stop) == (4, True)  # 6 - 4 = 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one value"):
        peak_watch([], window=1, patience=1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        peak_watch([1.0], window=0, patience=1)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        peak_watch([1.0], window=1, patience=0)


def test_nearest_step_prefers_the_earlier_on_a_tie():
    assert nearest_step([2, 4, 6], 5) == 4  # 4 and 6 are both 1 away
    assert nearest_step([2, 4, 6], 6) == 6
    assert nearest_step([3, 10], 7) == 10  # 4 vs 3 away
    assert nearest_step([], 3) is None


def test_history_from_rows_reads_steps_up_to_the_resume_step():
    rows = [{"step": 1, "ppo/monitor/gold": 0.5}, {"step": 2, "ppo/monitor/gold": 0.25},
            {"step": 3, "ppo/monitor/gold": 9.0}]
    assert history_from_rows(rows, "ppo/monitor/gold", 2) == [0.5, 0.25]  # step 3 is redone after a resume
    assert history_from_rows(list(reversed(rows)), "ppo/monitor/gold", 3) == [0.5, 0.25, 9.0]
    with pytest.raises(ValueError, match=r"no ppo/monitor/other logged for step\(s\) 1, 2"):
        history_from_rows(rows, "ppo/monitor/other", 2)
    with pytest.raises(ValueError, match=r"step\(s\) 4"):
        history_from_rows(rows, "ppo/monitor/gold", 4)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("specs", [
    ["sentiment"],
    [{"name": "sentiment", "id": "gold"}],
    ["sentiment", "sentiment", {"name": "sentiment", "id": "sentiment_2"}],  # the explicit id comes first
    [{"name": "sentiment", "id": "gold"}, {"name": "repetition", "weight": -1.0}],
])
def test_monitor_ids_match_the_registry(specs):
    """config.monitor_ids restates reward/registry.py's id rule without building rewards: they must agree."""
    from reward.registry import build_reward

    names = build_reward(specs).names
    assert monitor_ids(specs) == names + (["total"] if len(names) > 1 else [])


def test_monitor_ids_by_hand():
    # the explicit length_2 is taken first, so the second plain "length" becomes length_3
    assert monitor_ids(["length", "length", {"name": "length", "id": "length_2"}]) == \
        ["length", "length_3", "length_2", "total"]
    assert monitor_ids([]) == []


def test_early_stop_keys_load_and_default_off():
    pc = load_config(None).ppo
    assert (pc.early_stop, pc.early_stop_monitor, pc.early_stop_window, pc.early_stop_patience,
            pc.early_stop_min_delta) == ("off", "", 5, 10, 0.0)
    # YAML 1.1 reads a bare `off` as false: it still means off
    assert load_config(None, ["ppo.early_stop=off"]).ppo.early_stop == "off"
    pc = load_config(None, ["ppo.monitor=[{name: sentiment, id: gold}, length]", "ppo.early_stop=stop",
                            "ppo.early_stop_monitor=total", "ppo.early_stop_window=1",
                            "ppo.early_stop_patience=3", "ppo.early_stop_min_delta=0.01"]).ppo
    assert (pc.early_stop, pc.early_stop_monitor, pc.early_stop_window, pc.early_stop_patience,
            pc.early_stop_min_delta) == ("stop", "total", 1, 3, 0.01)


@pytest.mark.parametrize("overrides,message", [
    (["ppo.early_stop=halt"], "ppo.early_stop: 'halt' is not one of off, mark, stop"),
    (["ppo.early_stop=yes"], "ppo.early_stop: True (YAML reads yes/on/true as a boolean) is not one of off, mark, stop"),
    (["ppo.early_stop_window=0"], "ppo.early_stop_window must be >= 1, got 0"),
    (["ppo.early_stop_patience=0"], "ppo.early_stop_patience must be >= 1, got 0"),
    (["ppo.early_stop_min_delta=-0.1"], "ppo.early_stop_min_delta must be >= 0, got -0.1"),
    (["ppo.early_stop=mark", "ppo.monitor=[{name: sentiment, id: gold}]"],
     "ppo.early_stop=mark needs ppo.early_stop_monitor"),
    (["ppo.early_stop=stop", "ppo.monitor=[{name: sentiment, id: gold}, length]", "ppo.early_stop_monitor=sentiment"],
     "ppo.early_stop_monitor: 'sentiment' is not a ppo.monitor component; valid: gold, length, total"),
    (["ppo.early_stop=stop", "ppo.monitor=[{name: sentiment, id: gold}]", "ppo.early_stop_monitor=total"],
     "ppo.early_stop_monitor: 'total' is not a ppo.monitor component; valid: gold"),
    (["ppo.early_stop=mark", "ppo.monitor=[]", "ppo.early_stop_monitor=gold"],
     "ppo.early_stop_monitor: 'gold' is not a ppo.monitor component; ppo.monitor is empty"),
])
def test_bad_early_stop_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
