"""How the CLI answers: user errors in one line, unexpected ones in one line plus a full log in the run
folder, a second writer refused, library noise silenced. The stages are stubbed: no model loads."""
import errno
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import guard
from pipeline.cli import main, quiet_libraries
from pipeline.stages import fuse

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")


def _fuse(tmp_path, monkeypatch, error):
    def failing(cfg, run_dir, overwrite=False):
        raise error

    monkeypatch.setattr(fuse, "run_fuse", failing)
    return CliRunner().invoke(main, ["fuse", "--config", CONFIG, "--run-dir", str(tmp_path)])


def test_an_unexpected_error_is_one_line_and_a_full_log_in_the_run_folder(tmp_path, monkeypatch):
    r = _fuse(tmp_path, monkeypatch, RuntimeError("tensor shapes disagree\nsecond line"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert lines[0] == "Error: internal error: RuntimeError: tensor shapes disagree"
    log = Path(lines[1].removeprefix("full log: "))
    assert log.parent == tmp_path / "logs" and log.name.startswith("fuse-error-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text and "transformers" in text


def test_a_full_disk_is_one_line_saying_what_is_intact(tmp_path, monkeypatch):
    r = _fuse(tmp_path, monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/runs/x/fused/a.bin"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "No space left on device writing /runs/x/fused/a.bin" in r.output
    assert "the earlier ones are intact" in r.output and not (tmp_path / "logs").exists()


def test_a_second_writer_of_a_stage_is_refused_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(fuse, "run_fuse", lambda cfg, run_dir, overwrite=False: None)
    with guard.stage_lock(tmp_path, "fuse"):
        r = CliRunner().invoke(main, ["fuse", "--config", CONFIG, "--run-dir", str(tmp_path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"LockedError: {tmp_path / 'fuse'} is being written by pid" in r.output
    r = CliRunner().invoke(main, ["fuse", "--config", CONFIG, "--run-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    r = CliRunner().invoke(main, ["sft", "--config", CONFIG, "--run-dir", str(tmp_path), "--resume", "--overwrite"])
    assert r.exit_code == 2 and "pass one" in r.output and not list(tmp_path.iterdir())


def test_a_bad_value_stops_before_anything_loads(tmp_path, monkeypatch):
    """The issue's example: sft.lora.r=0 used to end in a peft traceback after the model had loaded."""
    import pipeline.stages.sft

    monkeypatch.setattr(pipeline.stages.sft, "run_sft", lambda *a, **k: pytest.fail("the stage ran"))
    r = CliRunner().invoke(main, ["sft", "--config", CONFIG, "--run-dir", str(tmp_path), "sft.lora.r=0"])
    assert r.exit_code == 1 and r.output.strip() == "Error: sft.lora.r must be >= 1, got 0"


def test_the_bitsandbytes_kernels_notice_is_silenced(caplog):
    quiet_libraries()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                    "already `pip install kernels`", "No module named 'kernels'")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
