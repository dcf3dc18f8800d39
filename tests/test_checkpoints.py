"""Kill-safety machinery without a model: safe state files, refused pickles, checkpoint folders, write
failures, the stage lock and signal handling (pipeline/artifacts/checkpoints.py, pipeline/artifacts/guard.py)."""
import errno
import json
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
from helpers import Payload

from pipeline.artifacts import checkpoints, guard, outputs
from pipeline.artifacts.checkpoints import (
    Checkpoints,
    StageWork,
    load_state,
    save_state,
)
from pipeline.artifacts.outputs import ArtifactError, WriteError


def _tiny_optimizer_state() -> dict:
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p, torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))  # nan == nan here


def test_state_round_trips_exactly_without_pickle(tmp_path):
    """Optimizer state (int keys, 0-dim step tensors, tuples), RNG states (numpy uint32 array, Python's
    625-int tuple), bf16 tensors, nan and '$'-keys come back equal in type and value."""
    state = {"optimizer": _tiny_optimizer_state(), "rng": checkpoints.rng_state(), "step": 7, "lr": 3e-6,
             "nan": float("nan"), "half": torch.ones(2, dtype=torch.bfloat16) / 3, "$odd": {1: (2, "x")},
             "nothing": None, "order": [3, 1, 2]}
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    assert _equal(load_state(tmp_path), state)
    # and the RNG state restores the generators: the next draws repeat
    checkpoints.set_rng_state(load_state(tmp_path)["rng"])
    first = (torch.rand(2), random.random(), np.random.rand())
    checkpoints.set_rng_state(state["rng"])
    assert _equal((torch.rand(2), random.random(), np.random.rand()), first)


def test_rng_state_carries_each_cuda_devices_generator(tmp_path, monkeypatch):
    """On a GPU, sampling draws from the device's generator: a resumed PPO run repeated the CPU stream but
    not the CUDA one and diverged at its first step (KL 0.280 uninterrupted, -0.109 resumed, H200). The
    CUDA side is faked here (CI has no GPU): its states must be saved, survive the file, and come back."""
    devices = {0: torch.tensor([1, 2, 3], dtype=torch.uint8), 1: torch.tensor([4, 5], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [devices[0].clone(), devices[1].clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.__setitem__(i, s))
    save_state(tmp_path, {"rng": checkpoints.rng_state()})
    checkpoints.set_rng_state(load_state(tmp_path)["rng"])
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], devices[i]) for i in devices)
    # a state saved where CUDA was not in use leaves the device generators alone
    restored.clear()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    checkpoints.set_rng_state(checkpoints.rng_state())
    assert restored == {}


def test_state_refuses_objects_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match=r"state.f: a checkpoint holds numbers.*not builtin_function"):
        save_state(tmp_path, {"f": len})


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """The check below could not fail if the payload were inert: plain pickle does run it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_a_crafted_legacy_checkpoint_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "value_head": Payload(marker)}, tmp_path / checkpoints.LEGACY_STATE)
    with pytest.raises(ArtifactError) as e:
        load_state(tmp_path)
    assert str(tmp_path / "trainer_state.pt") in str(e.value) and "was refused" in str(e.value)
    assert "Unsupported global: GLOBAL io.open" in str(e.value) and "Nothing in it was executed" in str(e.value)
    assert not marker.exists()


def test_an_older_checkpoint_with_tensors_and_rng_loads_weights_only(tmp_path):
    """What earlier versions wrote with torch.save (value head, optimizer, numpy/Python RNG states)."""
    state = {"value_head": {"weight": torch.randn(1, 4)}, "optimizer": _tiny_optimizer_state(),
             "rng": checkpoints.rng_state(), "step": 2, "epoch": 0, "cursor": 8}
    torch.save(state, tmp_path / checkpoints.LEGACY_STATE)
    assert _equal(load_state(tmp_path), state)


def test_a_pickle_in_place_of_a_safetensors_file_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    save_state(tmp_path, {"w": torch.ones(2)})
    (tmp_path / "state.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ArtifactError, match="state.safetensors is not a readable safetensors file"):
        load_state(tmp_path)
    assert not marker.exists()


def test_trainer_checkpoint_pickles_are_checked_by_name(tmp_path):
    """SFT checkpoints hold transformers' optimizer.pt / rng_state.pth: checked before the Trainer reads them."""
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               tmp_path / "rng_state.pth")
    torch.save(_tiny_optimizer_state(), tmp_path / "optimizer.pt")
    checkpoints.check_pickled_files(tmp_path)  # what transformers writes passes
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(ArtifactError, match="optimizer.pt was refused"):
        checkpoints.check_pickled_files(tmp_path)
    assert not marker.exists()


def test_weights_only_loads_forces_every_torch_load(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "x.pt")
    with checkpoints.weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "x.pt", weights_only=False)  # as an older library would call it
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ---------------------------------------------------------------------------------------------
# Checkpoint folders and write failures


def _write(value):
    return lambda folder: save_state(folder, {"v": value})


def test_checkpoints_keep_the_newest_and_latest_names_the_last_complete(tmp_path):
    ck = Checkpoints(tmp_path, "x", keep=2)
    for step in (1, 2, 3):
        ck.save(step, _write(step))
    assert [s for s, _ in ck.all()] == [2, 3] and ck.latest().name == "step-000003"
    (tmp_path / ".step-000004.tmp").mkdir()  # a write that was killed: never taken for a checkpoint
    (tmp_path / "latest").write_text("step-000009")  # a stale marker: the newest complete one wins
    assert ck.latest().name == "step-000003" and load_state(ck.latest())["v"] == 3


def _fail_renames_of(monkeypatch, suffix: str, error: OSError) -> None:
    """os.replace raises ``error`` for a source ending in ``suffix`` (a rename the file system refuses)."""
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(suffix):
            raise error
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)


def test_a_failing_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = Checkpoints(tmp_path, "x")
    ck.save(1, _write(1))
    _fail_renames_of(monkeypatch, ".step-000002.tmp", OSError(errno.EIO, "Input/output error"))
    with pytest.raises(WriteError) as e:
        ck.save(2, _write(2))
    assert "writing checkpoint step-000002" in str(e.value) and "Input/output error" in str(e.value)
    assert "step-000001 is intact" in str(e.value) and "--resume" in str(e.value)
    assert ck.latest().name == "step-000001" and load_state(ck.latest())["v"] == 1


def test_a_full_disk_while_writing_keeps_the_previous_checkpoint(tmp_path):
    ck = Checkpoints(tmp_path, "x")
    ck.save(1, _write(1))

    def fills_the_disk(folder):
        (folder / "state.safetensors").write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"No space left on device\); the previous checkpoint .*step-000001 is intact"):
        ck.save(2, fills_the_disk)
    assert ck.latest().name == "step-000001" and load_state(ck.latest())["v"] == 1
    assert not (tmp_path / ".step-000002.tmp").exists()


def test_a_failing_final_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')
    stage = StageWork(tmp_path, "sft")
    stage.start(overwrite=True)
    (stage.work / "manifest.json").write_text('{"new": true}')
    _fail_renames_of(monkeypatch, "sft.work", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(WriteError) as e:
        stage.publish()
    assert f"{out} is as it was" in str(e.value) and f"complete in {stage.work}" in str(e.value)
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    assert json.loads((stage.work / "manifest.json").read_text()) == {"new": True}
    monkeypatch.undo()
    # --resume finishes the job: the complete work folder is published without running the stage again
    again = StageWork(tmp_path, "sft")
    assert again.start(overwrite=True, resume=True) is None and again.finished
    again.publish()
    assert json.loads((out / "manifest.json").read_text()) == {"new": True} and not stage.work.exists()


def test_stage_work_refusal_rules(tmp_path):
    stage = StageWork(tmp_path, "reward")
    with pytest.raises(ArtifactError, match="--resume: no checkpoint"):
        stage.start(resume=True)
    assert stage.start() is None
    stage.checkpoints.save(3, _write(3))
    with pytest.raises(ArtifactError, match="unfinished run; pass --resume to continue it or --overwrite"):
        stage.start()
    assert stage.start(resume=True).name == "step-000003"
    assert stage.start(overwrite=True) is None and stage.checkpoints.latest() is None  # started over
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="already holds a complete reward output; pass --overwrite"):
        stage.start()


def test_resuming_with_changed_settings_says_which(tmp_path, capsys):
    config = {"sft": {"learning_rate": 2e-4, "lora": {"r": 16, "target_modules": ("q_proj",)}}, "seed": 1}
    stage = StageWork(tmp_path, "sft")
    stage.start(config=config)
    stage.checkpoints.save(1, _write(1))
    StageWork(tmp_path, "sft").start(resume=True, config=config)
    assert "note" not in capsys.readouterr().out  # the same settings (tuples saved as lists) say nothing
    changed = {"sft": {"learning_rate": 1e-4, "lora": {"r": 16, "target_modules": ("q_proj",)}}, "seed": 1}
    StageWork(tmp_path, "sft").start(resume=True, config=changed)
    assert "[sft] note: resuming with settings changed since the run started: sft.learning_rate: 0.0002 -> " \
           "0.0001" in capsys.readouterr().out


def test_metrics_of_a_resumed_run_drop_the_rows_after_the_checkpoint(tmp_path):
    log = outputs.MetricsLogger(tmp_path / "m.jsonl")
    for step in (0, 1, 2, 3):
        log.log({"step": step, "x": step})
    log.close()
    log = outputs.MetricsLogger(tmp_path / "m.jsonl", resume_step=2)
    log.log({"step": 3, "x": 30})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().split("\n") if line.strip()]
    assert [(r["step"], r["x"]) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 30)]


def test_truncating_a_log_keeps_rows_whose_text_holds_unicode_line_breaks(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+0085 and U+2028 inside strings (a tiny model sampled a
    response with U+0085); str.splitlines would cut such a row in two."""
    path = tmp_path / "s.jsonl"
    outputs.write_jsonl(path, [{"step": 1, "text": "a\u0085b"}, {"step": 2, "text": "c\u2028d"}])
    outputs.truncate_jsonl(path, 1)
    assert [json.loads(line) for line in path.read_text().split("\n") if line.strip()] == [{"step": 1, "text": "a\u0085b"}]


# ---------------------------------------------------------------------------------------------
# One writer per stage


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path):
    with guard.stage_lock(tmp_path, "ppo"):
        with pytest.raises(guard.LockedError) as e:
            guard.stage_lock(tmp_path, "ppo").acquire()
        assert f"pid {os.getpid()}" in str(e.value) and os.uname().nodename in str(e.value)
        assert str(tmp_path / "ppo") in str(e.value) and ".ppo.lock" in str(e.value)
        guard.stage_lock(tmp_path, "sft").acquire()  # another stage of the same run is free
    assert not (tmp_path / ".ppo.lock").exists()  # released cleanly: removed


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    pid = os.fork()
    if pid == 0:  # a child takes the lock and dies without releasing it
        guard.stage_lock(tmp_path, "sft").acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    assert json.loads((tmp_path / ".sft.lock").read_text())["pid"] == pid
    lock = guard.stage_lock(tmp_path, "sft")
    stale = lock.acquire()
    assert stale["pid"] == pid and f"took over {tmp_path / '.sft.lock'} from pid {pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / ".sft.lock").read_text())["pid"] == os.getpid()
    lock.release()


# ---------------------------------------------------------------------------------------------
# Signals


def test_a_signal_inside_a_loop_asks_it_to_stop_and_a_second_one_stops_at_once(capsys):
    with guard.stop_on_signals():
        guard.graceful_stop(True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.stop_requested() == "SIGTERM"
        assert "stopping after the current step" in capsys.readouterr().err
        with pytest.raises(guard.StopRequested) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.signal_name == "SIGINT"
    assert guard.stop_requested() is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_outside_a_loop_stops_at_once():
    with guard.stop_on_signals():
        with pytest.raises(guard.StopRequested):
            os.kill(os.getpid(), signal.SIGTERM)


def test_end_of_step_saves_on_schedule_and_on_a_stop():
    saved = []
    with guard.stop_on_signals():
        guard.graceful_stop(True)
        guard.end_of_step("x", 2, 5, 2, lambda: saved.append(2))  # every 2 steps
        guard.end_of_step("x", 3, 5, 2, lambda: saved.append(3))
        assert saved == [2]
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(guard.StopRequested, match="after step 3"):
            guard.end_of_step("x", 3, 5, 2, lambda: saved.append(3))
        assert saved == [2, 3]
        guard.end_of_step("x", 5, 5, 2, lambda: saved.append(5))  # the last step: the stage finishes
    assert saved == [2, 3]
