"""Outputs that prove themselves: manifests list every file with size and sha256, readers check them
first, and `rlhf verify RUN` checks a whole run folder. Stage folders are built by hand: no model loads."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.artifacts import readers
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
                        f"quotes: line 1 column 18 (char 17)); remake it with: rlhf sft --config CONFIG --run-dir {tmp_path} "
                        "--overwrite")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        read_manifest(folder)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and r.output.splitlines()[0] == \
        f"{tmp_path / 'nothing'} is not a folder; pass a run folder (RUN, holding sft/, reward/, ...)"


# ---------------------------------------------------------------------------------------------
# The readers behind every stage's loads: damaged or wrong inputs are one line naming the file


def old_adapter_stage(run: Path, stage: str = "sft") -> Path:
    """A stage output from before file lists, holding a LoRA adapter folder's two files."""
    from safetensors.torch import save_file

    folder = make_stage(run, stage)
    save_file({"a.lora_A.weight": torch.ones(2, 2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LORA"}))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _error(fn, *args) -> str:
    with pytest.raises(ArtifactError) as e:
        fn(*args)
    return str(e.value)


def test_damaged_adapter_files_are_named_with_the_command_that_remakes_them(tmp_path):
    folder = old_adapter_stage(tmp_path)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    remake = REMAKE.format(run=tmp_path)
    readers.check_adapter_folder(folder)
    weights.write_bytes(weights.read_bytes()[:7])
    for fn in (readers.check_adapter_folder, lambda f: readers.load_tensors(f / "adapter_model.safetensors")):
        msg = _error(fn, folder)
        assert msg.startswith(f"{weights} is not a readable safetensors file (") and \
               msg.endswith(f"); it was not loaded; {remake}"), msg
    weights.unlink()
    assert _error(readers.check_adapter_folder, folder) == f"{weights} is missing (the adapter weights); {remake}"
    config.write_text("{not json")
    assert _error(readers.check_adapter_folder, folder) == (
        f"{config} is not readable JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        f"(char 1)); it should be a peft LoRA adapter config; {remake}")
    config.write_text('{"peft_type": "LORA"}')
    assert _error(readers.check_adapter_folder, folder) == f"{config} is not a LoRA adapter config (no 'r'); {remake}"
    assert _error(readers.check_adapter_folder, tmp_path / "none") == (
        f"{tmp_path / 'none'} is not a folder; a LoRA adapter folder (with adapter_config.json and "
        "adapter_model.safetensors) was expected")


def test_another_stage_output_where_one_is_named_is_refused(tmp_path):
    reward = old_adapter_stage(tmp_path, "reward")
    assert _error(readers.read_output, reward, "sft", "ppo.sft_adapter") == (
        f"ppo.sft_adapter: {reward} is a 'reward' output, not a 'sft' one; point ppo.sft_adapter at RUN/sft (or the "
        "sft output of another run)")


def test_a_damaged_learned_fusion_and_trainer_checkpoint_are_named(tmp_path):
    from pipeline.artifacts.checkpoints import check_trainer_checkpoint
    from pipeline.fusion import gating

    fused = make_stage(tmp_path, "fuse")
    (fused / "fusion.json").write_text("[1, 2")
    assert _error(gating.read, fused).startswith(f"{fused / 'fusion.json'} is not readable JSON (")
    (fused / "fusion.json").write_text('{"format": "other"}')
    assert _error(gating.read, fused) == (
        f"{fused / 'fusion.json'}: format 'other' version None, expected 'rlhf-lora-fusion' version 1; remake it "
        f"with: rlhf fuse --config configs/tiny.yaml --run-dir {tmp_path} --overwrite")
    ckpt = old_adapter_stage(tmp_path / "sft.work" / "checkpoints", "step-000004")
    (ckpt / "manifest.json").unlink()
    (ckpt / "trainer_state.json").write_text('{"global_step": 4}')
    assert check_trainer_checkpoint(ckpt) == 4
    (ckpt / "trainer_state.json").write_text("garbage")
    assert _error(check_trainer_checkpoint, ckpt) == (
        f"{ckpt / 'trainer_state.json'} is not readable JSON (Expecting value: line 1 column 1 (char 0)); it should "
        f"be a transformers Trainer state; the checkpoint step-000004 is damaged: remove {ckpt} to resume from the "
        "one before, or start over with --overwrite")


def test_an_adapter_of_another_lora_configuration_is_named(tmp_path, tiny_model_cfg):
    from peft import LoraConfig, get_peft_model

    from pipeline.models import loading, stacking

    model, _, _ = loading.load_base(tiny_model_cfg)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="other")
    stacking.save_adapter(pm, "other", tmp_path / "other")
    pm.add_adapter("policy", LoraConfig(r=2, target_modules=["q_proj"]))
    msg = _error(stacking.load_adapter_weights, pm, "policy", tmp_path / "other")
    assert msg.startswith(f"{tmp_path / 'other'} does not fit adapter 'policy' (unexpected [")
    assert msg.endswith("): it was saved with another LoRA rank, targets or layers; use the config it was trained with")


def test_the_remake_command_names_the_stage_and_config_that_wrote_the_folder():
    from pipeline.artifacts.verify import remake_command

    ppo = {"stage": "ppo", "command": "/venv/bin/rlhf ppo --config configs/rloo.yaml --run-dir runs/r ppo.steps=3"}
    assert remake_command(Path("runs/r/ppo"), ppo) == "rlhf ppo --config configs/rloo.yaml --run-dir runs/r --overwrite"
    assert remake_command(Path("runs/r/fused"), {}) == "rlhf fuse --config CONFIG --run-dir runs/r --overwrite"
    demo = {"stage": "forgetting-demo", "command": "benchmarks/forgetting_demo.py --config configs/default.yaml"}
    assert remake_command(Path("runs/d/forgetting-demo"), demo) == \
        "make forgetting-demo CONFIG=configs/default.yaml RUN=runs/d"
