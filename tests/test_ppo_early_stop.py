"""ppo.early_stop end to end on the tiny config: a monitor whose per-step values this module scripts
makes the smoothed peak, the stop step and the manifest's record numbers worked by hand.

No SFT or reward stage: the policy starts from the base (ppo.sft_adapter="", reference base) and
optimises response length, so each run is a few seconds. The monitor is reached by dotted path into
this module (``<module>:scripted``); it is called once per step and returns the step's scripted value
for every response, so ``ppo/monitor/held_out`` of step t is ``SCRIPT[t - 1]`` exactly.
"""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.artifacts.outputs import ArtifactError
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.stages import ppo

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")

# Monitor value per step. Window 2 smoothed: 1, 2, 4, 6, 6.5, 5, 3, 1.5, 0.5, 0, 0, 0 -> peak at step 5
# (6.5); with patience 3 the watch says stop once t - 5 >= 3, at step 8.
SCRIPT = [1.0, 3.0, 5.0, 7.0, 6.0, 4.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]
SMOOTHED = [1.0, 2.0, 4.0, 6.0, 6.5, 5.0, 3.0, 1.5, 0.5, 0.0, 0.0, 0.0]
BEST_STEP = [1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5]
STATE = {"calls": 0, "interrupt_at": None}


def scripted(prompts, responses):
    """The monitor: ``SCRIPT[n]`` for every response on its n-th call (0-based), 0 past the script (eval
    scores the monitors too); on call number ``interrupt_at`` (1-based) it raises KeyboardInterrupt, as a
    run killed in that step."""
    STATE["calls"] += 1
    if STATE["calls"] == STATE["interrupt_at"]:
        raise KeyboardInterrupt
    return [SCRIPT[STATE["calls"] - 1] if STATE["calls"] <= len(SCRIPT) else 0.0] * len(responses)


def chars(prompts, responses):
    """The optimised proxy: response length."""
    return [float(len(r)) for r in responses]


def reset(calls=0, interrupt_at=None):
    STATE.update(calls=calls, interrupt_at=interrupt_at)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores a second OpenMP thread only waits (tests/test_ppo.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _overrides(mode: str, save_every: int) -> list[str]:
    return [f"data.prompts_train={REPO / 'data' / 'prompts_train.jsonl'}", "model.compute_dtype=float32",
            "ppo.sft_adapter=", "ppo.reference=base", f"ppo.rewards=[{{name: '{__name__}:chars'}}]",
            f"ppo.monitor=[{{name: '{__name__}:scripted', id: held_out}}]", f"ppo.steps={len(SCRIPT)}",
            "ppo.ppo_epochs=1", "ppo.sample_every=0", f"ppo.save_every={save_every}",
            f"ppo.early_stop={mode}", "ppo.early_stop_monitor=held_out", "ppo.early_stop_window=2",
            "ppo.early_stop_patience=3"]


def _ppo(run: Path, mode: str, save_every: int = 2, flags=()):
    return CliRunner().invoke(main, ["ppo", "--config", CONFIG, "--run-dir", str(run), *flags,
                                     *_overrides(mode, save_every)])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "ppo" / "checkpoints").iterdir() if p.name.startswith("step-"))


def _check_stopped_run(run: Path, save_every: int) -> None:
    """The outputs of the run that stops at step 8: rows 1..8 with the hand-worked smoothing, the
    final checkpoint at step 8, and the manifest's record."""
    rows = _rows(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["ppo/monitor/held_out"] for r in rows] == SCRIPT[:8]
    assert [r["ppo/early_stop/smoothed"] for r in rows] == SMOOTHED[:8]
    assert [r["ppo/early_stop/best_step"] for r in rows] == BEST_STEP[:8]
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 8 and manifest["final_checkpoint"] == "step-000008"
    # checkpoints every save_every steps, then the final one; the one nearest step 5 is step 4 both for
    # {2, 4, 6, 8} (4 and 6 are both 1 away: the earlier wins) and for {4, 8}
    assert _checkpoints(run) == [f"step-{s:06d}" for s in range(save_every, 9, save_every)]
    assert manifest["early_stop"] == {"mode": "stop", "monitor": "held_out", "window": 2, "patience": 3,
                                      "min_delta": 0.0, "best_step": 5, "best_value": 6.5,
                                      "best_checkpoint": "step-000004", "stopped_at": 8}
    assert not (run / "ppo.work").exists()


def test_stop_ends_the_run_at_the_hand_computed_step_and_eval_reads_it(tmp_path):
    run = tmp_path / "run"
    reset()
    r = _ppo(run, "stop")
    assert r.exit_code == 0, r.output
    assert STATE["calls"] == 8  # no step after the stop was scored
    assert ("[ppo] early stop after step 8 of 12: ppo/monitor/held_out (trailing mean over 2 steps) peaked at "
            "step 5 (6.5)") in r.output and "nearest checkpoint step-000004" in r.output
    _check_stopped_run(run, save_every=2)
    # the stopped run is a complete ppo output: eval puts its checkpoints on the curves
    r = CliRunner().invoke(main, ["eval", "--config", CONFIG, "--run-dir", str(run), *_overrides("stop", 2),
                                  "eval.forgetting="])
    assert r.exit_code == 0, r.output
    evaluated = (run / "eval" / "curves.csv").read_text()
    assert all(f"step-{s:06d}" in evaluated for s in (2, 4, 6, 8)) and "step-000010" not in evaluated
    points = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]["points"]
    assert all("monitor/held_out_mean" in p for p in points if p["kind"] == "ppo")  # eval watched it too
    for p in points:  # with its per-prompt means, which average to its mean
        if p["kind"] == "ppo":
            by_prompt = p["monitor/held_out_by_prompt"]
            assert sum(by_prompt) / len(by_prompt) == pytest.approx(p["monitor/held_out_mean"], abs=1e-12)


def test_mark_runs_every_step_and_records_the_peak(tmp_path):
    run = tmp_path / "run"
    reset()
    r = _ppo(run, "mark")
    assert r.exit_code == 0, r.output
    rows = _rows(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["ppo/early_stop/smoothed"] for r in rows] == SMOOTHED
    assert [r["ppo/early_stop/best_step"] for r in rows] == BEST_STEP
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 12 and manifest["final_checkpoint"] == "step-000012"
    assert manifest["early_stop"] == {"mode": "mark", "monitor": "held_out", "window": 2, "patience": 3,
                                      "min_delta": 0.0, "best_step": 5, "best_value": 6.5,
                                      "best_checkpoint": "step-000004", "stopped_at": 12}
    assert "[ppo] early_stop=mark: ppo/monitor/held_out (trailing mean over 2 steps) peaked at step 5 (6.5)" \
        in r.output


def test_off_logs_no_early_stop_keys(tmp_path):
    run = tmp_path / "run"
    reset()
    r = _ppo(run, "off", save_every=0)
    assert r.exit_code == 0, r.output
    rows = _rows(run / "ppo" / "metrics.jsonl")
    assert len(rows) == 12 and not any(k.startswith("ppo/early_stop/") for r in rows for k in r)
    assert "early_stop" not in json.loads((run / "ppo" / "manifest.json").read_text())


def test_a_resumed_run_rebuilds_the_monitor_history_and_stops_where_an_uninterrupted_one_does(tmp_path):
    """Killed in step 7 (rows 1..6 logged, latest checkpoint step 4): the resume drops rows 5 and 6,
    rebuilds the history [1, 3, 5, 7] from metrics.jsonl and stops at step 8 as _check_stopped_run
    says. Without the rebuilt history the resumed watch would start over at step 5 (smoothed 6, not
    6.5) and log other best steps."""
    run = tmp_path / "run"
    reset(interrupt_at=7)
    r = _ppo(run, "stop", save_every=4)
    assert r.exit_code != 0 and STATE["calls"] == 7
    assert [r["step"] for r in _rows(run / "ppo.work" / "metrics.jsonl")] == list(range(1, 7))
    assert (run / "ppo.work" / "checkpoints" / "latest").read_text() == "step-000004"
    reset(calls=4)  # the monitor's script resumes at step 5, as the run does
    r = _ppo(run, "stop", save_every=4, flags=["--resume"])
    assert r.exit_code == 0, r.output
    assert STATE["calls"] == 8
    _check_stopped_run(run, save_every=4)


def test_a_run_killed_after_it_stopped_finishes_without_another_step(tmp_path, monkeypatch):
    """Killed after the stop step's final checkpoint, before the outputs: --resume rebuilds the history
    of steps 1..8, sees the watch already stopped, and writes the same outputs without scoring a step."""
    run = tmp_path / "run"
    real = ppo.write_outputs

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ppo, "write_outputs", killed)
    reset()
    r = _ppo(run, "stop")
    assert r.exit_code != 0 and STATE["calls"] == 8
    assert (run / "ppo.work" / "checkpoints" / "latest").read_text() == "step-000008"
    monkeypatch.setattr(ppo, "write_outputs", real)
    reset(calls=8)
    r = _ppo(run, "stop", flags=["--resume"])
    assert r.exit_code == 0, r.output
    assert STATE["calls"] == 8  # nothing scored after the resume
    _check_stopped_run(run, save_every=2)


def test_resuming_without_the_monitor_in_the_log_is_refused(tmp_path):
    """A run started without the watched monitor (here: logged under another id) cannot be resumed with
    early stopping: the decision would not be the one an uninterrupted run makes."""
    pc = load_config(CONFIG, _overrides("stop", 2)).ppo
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "ppo/monitor/gold": 1.0}) + "\n" for s in (1, 2, 3)))
    assert ppo.monitor_history(pc, metrics, 0) == []
    with pytest.raises(ArtifactError, match=r"--resume with ppo.early_stop=stop: .*metrics.jsonl: no "
                                            r"ppo/monitor/held_out logged for step\(s\) 1, 2; without it"):
        ppo.monitor_history(pc, metrics, 2)
    metrics.write_text("".join(json.dumps({"step": s, "ppo/monitor/held_out": SCRIPT[s - 1]}) + "\n"
                               for s in (1, 2, 3)))
    assert ppo.monitor_history(pc, metrics, 2) == [1.0, 3.0]


def test_a_monitor_id_the_built_monitors_do_not_log_is_refused_before_the_first_step():
    """check_watched holds run_ppo to the monitors as built (config.monitor_ids restates their rule)."""
    pc = load_config(CONFIG, _overrides("stop", 2)).ppo
    pc.early_stop_monitor = "total"  # logged only for a monitor of several components

    class OneMonitor:
        names = ("held_out",)

    with pytest.raises(ppo.PPOError, match=r"'total' is not logged by ppo.monitor \(it logs: held_out\)"):
        ppo.check_watched(pc, OneMonitor())
    with pytest.raises(ppo.PPOError, match=r"\(it logs: nothing\)"):
        ppo.check_watched(pc, None)
    OneMonitor.names = ("held_out", "gold")
    ppo.check_watched(pc, OneMonitor())
