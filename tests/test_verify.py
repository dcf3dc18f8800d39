"""Outputs that prove themselves: manifests list every file with size and sha256, readers check them
first, and `rlhf verify RUN` checks a whole run folder. Stage folders are built by hand: no model loads."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts.outputs import ArtifactError, read_manifest, write_manifest
from pipeline.cli import main
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
BASE = {"name": "tiny", "weights_sha256": "w", "tokenizer_sha256": "t"}
REMAKE = "remake it with: rlhf sft --config configs/tiny.yaml --run-dir {run} --overwrite"


def make_stage(run: Path, stage: str = "sft", with_checkpoints: bool = False) -> Path:
    """A stage folder as a stage leaves it just before publishing: outputs, a checkpoint, run_config.json."""
    folder = run / stage
    (folder / "checkpoints" / "step-000001").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    (folder / "run_config.json").write_text("{}")
    argv, sys.argv = sys.argv, ["rlhf", stage, "--config", "configs/tiny.yaml", "--run-dir", str(run)]
    try:
        write_manifest(folder, stage, load_config(CONFIG), BASE, {}, with_checkpoints=with_checkpoints)
    finally:
        sys.argv = argv
    return folder


def test_the_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = make_stage(tmp_path)
    files = read_manifest(folder)["files"]
    assert sorted(files) == ["adapter_model.safetensors", "config.yaml", "metrics.jsonl"]
    assert files["adapter_model.safetensors"] == {
        "size": 1024, "sha256": hashlib.sha256(bytes(range(256)) * 4).hexdigest()}
    # PPO keeps its checkpoints (eval reads them): they are listed too; run_config.json never outlives publishing.
    ppo = make_stage(tmp_path, "ppo", with_checkpoints=True)
    assert "checkpoints/step-000001/state.json" in read_manifest(ppo)["files"]
    assert "run_config.json" not in read_manifest(ppo)["files"]


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "{p} is truncated (100 bytes; the manifest says 1024)"),
    (lambda p: p.unlink(), "{p} is missing"),
    (lambda p: p.write_bytes(b"\1" * 1024),
     "{p} has changed since it was written (sha256 {new}, the manifest says {old})"),
    (lambda p: p.write_bytes(p.read_bytes() + b"x"), "{p} is longer than written (1025 bytes; the manifest says 1024)"),
])
def test_a_damaged_file_is_one_line_naming_it_and_the_command_that_remakes_it(tmp_path, damage, problem):
    folder = make_stage(tmp_path)
    path = folder / "adapter_model.safetensors"
    damage(path)
    old = hashlib.sha256(bytes(range(256)) * 4).hexdigest()[:12]
    new = hashlib.sha256(b"\1" * 1024).hexdigest()[:12]
    want = problem.format(p=path, old=old, new=new) + "; " + REMAKE.format(run=tmp_path)
    with pytest.raises(ArtifactError) as e:
        read_manifest(folder)
    assert str(e.value) == want
    r = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.splitlines()[0] == want
    assert r.output.splitlines()[1].startswith(f"{tmp_path}: 1 stage output(s), 3 files, ")
    assert r.output.splitlines()[1].endswith(": 1 problem(s)")


def test_verify_of_an_intact_run_and_of_outputs_from_before_file_lists(tmp_path):
    make_stage(tmp_path, "sft")
    ppo = make_stage(tmp_path, "ppo", with_checkpoints=True)
    r = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith(f"{tmp_path}: 2 stage output(s), 7 files, ")
    assert r.output.strip().endswith(": all intact")
    manifest = json.loads((ppo / "manifest.json").read_text())
    del manifest["files"]
    (ppo / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(ppo)["stage"] == "ppo"  # older outputs still load
    r = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert r.exit_code == 0
    assert r.output.splitlines()[0] == f"{ppo}: unverified: written before file lists"
    assert r.output.strip().endswith(": all intact, 1 unverified")


def test_verify_names_unfinished_stages_and_damaged_manifests(tmp_path):
    (tmp_path / "reward").mkdir()
    folder = make_stage(tmp_path, "sft")
    (folder / "manifest.json").write_text('{"stage": "sft", ')
    r = CliRunner().invoke(main, ["verify", str(tmp_path)])
    lines = r.output.splitlines()
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert lines[0] == f"{tmp_path / 'reward'} has no manifest.json: the stage did not finish; run it again " \
                       "(`rlhf reward ...`)"
    assert lines[1] == (f"{folder / 'manifest.json'} is not valid JSON (Expecting property name enclosed in double "
                        "quotes: line 1 column 18 (char 17)); the stage output is damaged")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        read_manifest(folder)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and r.output.splitlines()[0] == \
        f"{tmp_path / 'nothing'} is not a folder; pass a run folder (RUN, holding sft/, reward/, ...)"
