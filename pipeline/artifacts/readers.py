"""Reading the files a stage wrote (adapters, heads, gates, JSON metadata) so that a missing, damaged
or foreign file is one ArtifactError naming it and, when it lies in a stage output, the command that
writes that output again, never a library's exception. Outputs with file lists are checked whole by
``read_manifest`` first; these readers cover older outputs, folders a user points to, and checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts.outputs import ArtifactError, read_manifest
from pipeline.artifacts.verify import MANIFEST, parse_manifest, remake_command

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def remake_hint(path: str | Path) -> str:
    """``"; remake it with: rlhf ..."`` for a file inside a stage output, what to do for one inside a
    checkpoint of an unfinished run, else ``""``."""
    for folder in Path(path).parents:
        if folder.parent.name == "checkpoints" and folder.parent.parent.name.endswith(".work"):
            return (f"; the checkpoint {folder.name} is damaged: remove {folder} to resume from the one before, "
                    "or start over with --overwrite")
        if (folder / MANIFEST).is_file():
            manifest, problem = parse_manifest(folder)
            return "" if problem else f"; remake it with: {remake_command(folder, manifest)}"
    return ""


def _missing(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path} is missing ({what}){remake_hint(path)}")


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON file ``path`` (``what`` it is, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} is not readable JSON ({e}); it should be {what}{remake_hint(path)}") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise _missing(path, "a safetensors file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a damaged or foreign file
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); it was not loaded"
                            f"{remake_hint(path)}") from None


def check_adapter_folder(folder: str | Path) -> None:
    """Before peft reads ``folder``: its adapter_config.json parses and its weights file has a readable
    safetensors header (the header only: cheap)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder; a LoRA adapter folder (with {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS}) was expected")
    config = read_json(folder / ADAPTER_CONFIG, "a peft LoRA adapter config")
    if not isinstance(config, dict) or "r" not in config:
        raise ArtifactError(f"{folder / ADAPTER_CONFIG} is not a LoRA adapter config (no 'r')"
                            f"{remake_hint(folder / ADAPTER_CONFIG)}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise _missing(weights, "the adapter weights")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # as in load_tensors
        raise ArtifactError(f"{weights} is not a readable safetensors file ({e}); it was not loaded"
                            f"{remake_hint(weights)}") from None


def read_output(folder: str | Path, stage: str, key: str) -> dict:
    """The verified manifest of the adapter-holding ``stage`` output that ``key`` names, its adapter
    checked readable; another stage's output is refused."""
    manifest = read_manifest(folder)
    theirs = manifest.get("stage")
    if theirs != stage:
        raise ArtifactError(f"{key}: {folder} is a '{theirs}' output, not a '{stage}' one; point {key} at "
                            f"RUN/{stage} (or the {stage} output of another run)")
    check_adapter_folder(folder)
    return manifest
