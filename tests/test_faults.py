"""Fault injection on the tiny config: each stage is killed with SIGKILL at several points (and stopped
once with SIGTERM or SIGINT), resumed each time, and its final artifacts compared with those of an
uninterrupted run. Also run alone by `make test-faults`.

Every run is a real process forked from this one (the libraries are already imported, so a run costs
its stage's time, not 8 s of imports) and dies by the signal at a fault-injection point
(``RLHF_FAILPOINTS``, pipeline/artifacts/guard.py): after a checkpoint is written but before it is renamed
into place, after a step before its checkpoint, and after the manifest before the final rename.
"""
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import Payload

pytestmark = pytest.mark.faults  # the soak is also marked soak: `make test-faults` only

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
# Logged numbers that measure time, not training.
TIMING = ("time/", "_seconds", "_per_second", "_runtime", "_time", "mfu", "tokens_per_s", "peak_flops")
DURATIONS: dict[str, float] = {}  # of each stage's uninterrupted run, for the soak's random kill moments
STAGE_ARGS = {
    # 5 steps of 4 rows over 16 rows: the resumed data order crosses an epoch boundary.
    "sft": ["sft.max_steps=5", "sft.save_steps=2", "sft.keep_checkpoints=1", "sft.logging_steps=1"],
    "reward": ["reward.max_steps=5", "reward.save_steps=2", "reward.keep_checkpoints=1", "reward.logging_steps=2"],
    "ppo": ["ppo.steps=4", "ppo.save_every=1", "ppo.ppo_epochs=1"],
}


@pytest.fixture(scope="module", autouse=True)
def _forkable():
    """Import everything the stages import and load the tiny model once, so that a forked run starts
    warm; one thread (a child must not inherit a busy OpenMP team) and no tqdm monitor thread."""
    from accelerate import Accelerator  # noqa: F401
    from datasets import Dataset  # noqa: F401
    from peft import get_peft_model  # noqa: F401
    from tqdm import tqdm
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    import pipeline.cli  # noqa: F401
    import pipeline.stages.ppo  # noqa: F401
    import pipeline.stages.reward  # noqa: F401
    import pipeline.stages.sft  # noqa: F401
    from pipeline.config import load_config
    from pipeline.models import loading

    n, interval = torch.get_num_threads(), tqdm.monitor_interval
    torch.set_num_threads(1)
    tqdm.monitor_interval = 0
    model_cfg = load_config(CONFIG).model
    loading.load_base(model_cfg)
    loading.load_base(model_cfg, kind="seqcls", num_labels=1)
    yield
    torch.set_num_threads(n)
    tqdm.monitor_interval = interval


def run_cli(args: list[str], log: Path, failpoints: str = "", kill_after: Optional[float] = None) -> int:
    """`rlhf ARGS` in a forked child; returns its exit code, or -signal if a signal ended it.
    ``kill_after``: SIGKILL the child that many seconds after the fork unless it has ended by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # not pytest's capture
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.environ["RLHF_FAILPOINTS"] = failpoints
            from pipeline.cli import main

            main.main(args=args, prog_name="rlhf")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    done, status = 0, 0
    deadline = time.monotonic() + kill_after if kill_after is not None else None
    while deadline is not None and not done:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    if not done:
        _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Stage:
    """Runs of one stage into one run folder, with the stage's fault-test settings."""

    def __init__(self, name: str, run: Path, logs: Path):
        self.name, self.run, self.logs = name, run, logs
        self.count = 0

    def __call__(self, *flags: str, failpoints: str = "", kill_after: Optional[float] = None) -> tuple[int, str]:
        self.count += 1
        log = self.logs / f"{self.run.name}-{self.name}-{self.count}.log"
        args = [self.name, "--config", CONFIG, "--run-dir", str(self.run), *STAGE_ARGS[self.name], *flags]
        t0 = time.time()
        code = run_cli(args, log, failpoints, kill_after)
        self.seconds = time.time() - t0
        print(f"{self.name} {' '.join(flags)} {failpoints}: exit {code} in {self.seconds:.1f}s")
        return code, log.read_text() if log.exists() else ""


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
            for line in path.read_text().split("\n") if line.strip()]


def assert_same_artifacts(got: Path, want: Path, stage: str) -> None:
    """Bit-identical weights and the same logged numbers (timings aside) as the uninterrupted run."""
    from safetensors.torch import load_file

    weights = ["adapter_model.safetensors"] + (["value_head.safetensors"] if stage == "ppo" else [])
    for name in weights:
        a, b = load_file(str(got / name)), load_file(str(want / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{stage}: {name} differs"
    assert _rows(got / "metrics.jsonl") == _rows(want / "metrics.jsonl"), f"{stage}: metrics.jsonl differs"
    metrics = [{k: v for k, v in json.loads((d / "manifest.json").read_text())["metrics"].items()
                if not any(t in k for t in TIMING)} for d in (got, want)]
    assert metrics[0] == metrics[1], f"{stage}: manifest metrics differ"
    for extra in ("gold_samples.jsonl", "samples.jsonl"):
        if (want / extra).exists():
            assert _rows(got / extra) == _rows(want / extra), f"{stage}: {extra} differs"
    if stage == "ppo":
        assert sorted(p.name for p in (got / "checkpoints").iterdir()) == \
               sorted(p.name for p in (want / "checkpoints").iterdir())
    else:
        assert not (got / "checkpoints").exists()  # only kept for resuming


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted sft -> reward -> ppo: the artifacts every interrupted run must reproduce."""
    run = tmp_path_factory.mktemp("reference")
    logs = tmp_path_factory.mktemp("logs")
    for name in ("sft", "reward", "ppo"):
        stage = Stage(name, run, logs)
        code, out = stage()
        assert code == 0, out[-3000:]
        DURATIONS[name] = stage.seconds
    return run, logs


# Per stage: a signal stop, then SIGKILLs inside a checkpoint write, between a step and its
# checkpoint, and between the manifest and the final rename; each followed by --resume.
SCENARIOS = {
    "sft": ("sft:step:1=TERM", ["sft:checkpoint-written:4", "sft:step:5", "sft:publish"]),
    "reward": ("reward:step:1=INT", ["reward:checkpoint-written:4", "reward:step:5", "reward:publish"]),
    "ppo": ("ppo:step:1=TERM", ["ppo:checkpoint-written:3", "ppo:step:3", "ppo:publish"]),
}
KILLS_SEEN: dict[str, int] = {}


@pytest.mark.parametrize("name", ["sft", "reward", "ppo"])
def test_killed_and_resumed_stage_matches_an_uninterrupted_run(name, reference, tmp_path):
    ref, logs = reference
    run = tmp_path / "run"
    run.mkdir()
    if name != "sft":  # the later stages read the reference's earlier outputs
        for earlier in ("sft", "reward")[:("sft", "reward", "ppo").index(name)]:
            (run / earlier).symlink_to(ref / earlier, target_is_directory=True)
    stage = Stage(name, run, logs)
    work, out = run / f"{name}.work", run / name

    # 1. a signal after step 1: the step is saved, the message says how to resume, exit 128 + signal
    point, kills = SCENARIOS[name]
    sig = point.split("=")[1]
    code, log = stage(failpoints=point)
    assert code == 128 + signal.Signals[f"SIG{sig}"], log[-3000:]
    assert f"[{name}] stopped by SIG{sig} after step 1" in log and "--resume" in log, log[-3000:]
    assert "Traceback" not in log
    assert (work / "checkpoints" / "latest").read_text() == "step-000001"
    assert not out.exists()

    # 2. without --resume an unfinished run is refused
    code, log = stage()
    assert code == 1 and "pass --resume to continue it or --overwrite to start over" in log

    # 3. SIGKILL at each point, resuming in between: never a folder that looks complete before the end
    for kill in kills:
        code, log = stage("--resume", failpoints=kill)
        assert code == -signal.SIGKILL, f"{kill} was not reached:\n{log[-3000:]}"
        assert not (out / "manifest.json").exists()
        KILLS_SEEN[name] = KILLS_SEEN.get(name, 0) + 1
    code, log = stage("--resume")
    assert code == 0, log[-3000:]
    assert not work.exists() and (out / "manifest.json").is_file()
    assert_same_artifacts(out, ref / name, name)
    print(f"{name}: 1 signal stop and {len(kills)} SIGKILLs, all resumed, artifacts equal")


def test_killed_and_resumed_reward_ensemble_matches_an_uninterrupted_run(reference, tmp_path):
    """reward.ensemble=2 (members sharing the trunk below the top layer): a signal stop and two SIGKILLs,
    resumed each time, give every member's adapter and head bit for bit, and the same logs."""
    ref, logs = reference
    ensemble = ["reward.ensemble=2", "reward.lora.top_layers=1"]
    want, got = tmp_path / "want", tmp_path / "got"
    for run in (want, got):
        run.mkdir()
        (run / "sft").symlink_to(ref / "sft", target_is_directory=True)
    code, log = Stage("reward", want, logs)(*ensemble)
    assert code == 0, log[-3000:]
    stage = Stage("reward", got, logs)
    code, log = stage(*ensemble, failpoints="reward:step:1=INT")
    assert code == 128 + signal.SIGINT and "[reward] stopped by SIGINT after step 1" in log, log[-3000:]
    for kill in ("reward:checkpoint-written:4", "reward:step:5"):
        code, log = stage("--resume", *ensemble, failpoints=kill)
        assert code == -signal.SIGKILL, f"{kill} was not reached:\n{log[-3000:]}"
    code, log = stage("--resume", *ensemble)
    assert code == 0, log[-3000:]
    assert_same_artifacts(got / "reward", want / "reward", "reward")
    from safetensors.torch import load_file

    member = [load_file(str(d / "reward" / "member1" / "adapter_model.safetensors")) for d in (got, want)]
    assert member[0].keys() == member[1].keys() and all(torch.equal(member[0][k], member[1][k]) for k in member[0])


def test_tampered_checkpoints_are_refused_unexecuted(reference, tmp_path):
    """A crafted pickle where a checkpoint holds optimizer state (SFT: transformers' optimizer.pt) or in place of
    a state file (PPO: state.safetensors, or an older version's trainer_state.pt): --resume names the file,
    stops before any model loads, and the payload never runs."""
    ref, logs = reference
    marker = tmp_path / "pwned"
    for name, kill, tamper in (("sft", "sft:step:3", "optimizer.pt"), ("ppo", "ppo:step:2", "state.safetensors"),
                               ("ppo", "ppo:step:2", "trainer_state.pt")):
        run = tmp_path / f"{name}-{tamper}"
        run.mkdir()
        if name == "ppo":
            for earlier in ("sft", "reward"):
                (run / earlier).symlink_to(ref / earlier, target_is_directory=True)
        stage = Stage(name, run, logs)
        assert stage(failpoints=kill)[0] == -signal.SIGKILL
        ckpt = run / f"{name}.work" / "checkpoints" / "step-000002"
        if tamper == "trainer_state.pt":  # an older version's checkpoint layout
            (ckpt / "state.json").unlink()
            (ckpt / "state.safetensors").unlink()
        torch.save({"state": Payload(marker)}, ckpt / tamper)
        code, log = stage("--resume")
        assert code == 1 and str(ckpt / tamper) in log and "Traceback" not in log, log[-2000:]
        assert "[model]" not in log  # refused before the model loaded
        assert not marker.exists()


@pytest.mark.soak
def test_soak_random_kills_across_the_pipeline_then_resume(reference, tmp_path):
    """sft -> reward -> ppo, SIGKILLed at RLHF_SOAK_KILLS (default 20) random moments, each stage resumed
    (``--resume``) after every kill: the final adapters, value head, metrics and samples equal those of the
    uninterrupted run. Each moment is a stage, drawn in proportion to its run time, and a delay within that
    run time from the start of an attempt (imports, model load and the resumed steps included); a moment
    after its attempt, or its stage, has finished is counted as a miss. RLHF_SOAK_SEED (default: drawn and
    printed) picks the moments; timing makes a run only approximately repeatable."""
    from pipeline.artifacts.checkpoints import latest_checkpoint
    from pipeline.artifacts.outputs import is_complete

    ref, logs = reference
    n = int(os.environ.get("RLHF_SOAK_KILLS") or 20)
    seed = int(os.environ.get("RLHF_SOAK_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    names = ["sft", "reward", "ppo"]
    stages = rng.choices(names, weights=[DURATIONS[s] for s in names], k=n)
    moments = {s: sorted(rng.uniform(0, DURATIONS[s]) for _ in range(stages.count(s))) for s in names}
    print(f"soak: N={n} seed={seed} (RLHF_SOAK_KILLS, RLHF_SOAK_SEED); moments "
          + ", ".join(f"{s}@{t:.1f}s" for s in names for t in moments[s]))
    run = tmp_path / "run"
    run.mkdir()
    landed = 0
    for name in names:
        stage = Stage(name, run, logs)
        for delay in moments[name] + [None]:
            if is_complete(run / name):  # killed after its final rename: nothing left to do
                break
            unfinished = latest_checkpoint(run, name) is not None or is_complete(run / f"{name}.work")
            code, log = stage(*(["--resume"] if unfinished else []), kill_after=delay)
            if code == -signal.SIGKILL:
                landed += 1
                continue
            assert code == 0, log[-3000:]
        assert is_complete(run / name), f"{name} did not complete"
        assert_same_artifacts(run / name, ref / name, name)
    print(f"soak: N={n} seed={seed}: {landed} kills landed, {n - landed} fell after their attempt or stage had "
          "finished (resumed attempts are shorter than a whole run); final artifacts equal the uninterrupted run's")
