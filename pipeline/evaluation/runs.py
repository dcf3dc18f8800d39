"""What an eval looks at: the PPO-family series (RUN/ppo and every run in ``eval.runs``) with their
checkpoints, the fuse outputs in ``eval.fused``, and the checks that they all started from this
eval's SFT adapter on the same base, so that they share the reference, the rewards and best-of-n.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.artifacts.outputs import (
    ArtifactError,
    check_same_base,
    is_complete,
    read_manifest,
)
from pipeline.rl.policy_value import POLICY, SFT

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Series:
    """One PPO-family run on the plot."""

    source: str  # "RUN/ppo" or "eval.runs[i]": where it was named, for messages
    ppo_dir: Path
    manifest: dict
    checkpoints: list[tuple[int, Path]]
    key: str = ""  # its label: the algorithm, or "<algorithm>:<run folder>" where two share one
    slot: str = POLICY  # the adapter that holds its checkpoints (one per distinct LoRA shape)

    @property
    def algorithm(self) -> str:
        return self.manifest.get("config", {}).get("ppo", {}).get("algorithm", "ppo")  # older runs: PPO


def _ppo_output(path: Path) -> Optional[Path]:
    """``path`` when it is a complete ppo output, else its ppo/ subfolder when that is one."""
    for folder in (path, path / "ppo"):
        if is_complete(folder) and read_manifest(folder).get("stage") == "ppo":
            return folder
    return None


def collect_series(run_dir: Path, runs: Sequence[str], default_steps: int) -> list[Series]:
    """RUN/ppo when complete, then every ``eval.runs`` entry (a run folder or a ppo output folder), each
    folder once, labelled by algorithm; where two share an algorithm, by algorithm and run folder name."""
    found = [("RUN/ppo", run_dir / "ppo")] if is_complete(run_dir / "ppo") else []
    for i, entry in enumerate(runs):
        ppo_dir = _ppo_output(Path(entry))
        if ppo_dir is None:
            raise ArtifactError(f"eval.runs[{i}]: {entry} is neither a run folder holding a complete ppo/ output "
                                "nor a complete ppo output folder (finish `rlhf ppo` there, or drop it)")
        found.append((f"eval.runs[{i}]", ppo_dir))
    series: list[Series] = []
    seen: set[Path] = set()
    for source, ppo_dir in found:
        if ppo_dir.resolve() in seen:
            continue
        seen.add(ppo_dir.resolve())
        manifest = read_manifest(ppo_dir)
        checkpoints = _ppo_checkpoints(ppo_dir)
        if not checkpoints and (ppo_dir / "adapter_model.safetensors").is_file():
            checkpoints = [(int(manifest.get("metrics", {}).get("steps", default_steps)), ppo_dir)]
        series.append(Series(source, ppo_dir, manifest, checkpoints))
    per_algorithm = Counter(s.algorithm for s in series)
    for s in series:
        folder = Path(os.path.abspath(s.ppo_dir))
        run_name = folder.parent.name if folder.name == "ppo" else folder.name
        s.key = s.algorithm if per_algorithm[s.algorithm] == 1 else f"{s.algorithm}:{run_name}"
    repeated = Counter(s.key for s in series)
    for i, s in enumerate(series):
        if repeated[s.key] > 1:  # two runs of one algorithm in folders of the same name
            s.key = f"{s.key}-{i + 1}"
    return series


def collect_fused(entries: Sequence[str]) -> list[tuple[Path, dict]]:
    """The complete fuse outputs named in ``eval.fused`` with their manifests; a folder that does not
    exist is skipped (the default names RUN/fused, which runs without `rlhf fuse` lack), one that exists
    but is not a finished fuse output is an error."""
    found = []
    for i, entry in enumerate(entries):
        folder = Path(entry)
        if not folder.exists():
            continue
        if not is_complete(folder) or read_manifest(folder).get("stage") != "fuse":
            raise ArtifactError(f"eval.fused[{i}]: {folder} is not a complete fuse output (finish `rlhf fuse` "
                                "there, or drop it from eval.fused)")
        found.append((folder, read_manifest(folder)))
    return found


def exact_copy_of(manifest: dict, sft_sha: Optional[str], checkpoints: dict[str, str]) -> Optional[str]:
    """The checkpoint a fuse output reproduces exactly, else None: an all-ones ``cat`` of this eval's SFT
    adapter and one PPO checkpoint (``checkpoints``: adapter sha256 -> checkpoint name), matched by hash."""
    if manifest.get("method") != "cat" or any(w != 1.0 for w in manifest.get("weights") or [0.0]):
        return None
    shas = [a.get("sha256") for a in (manifest.get("adapters") or {}).values()]
    if len(shas) != 2 or sft_sha not in shas:
        return None
    other = shas[1] if shas[0] == sft_sha else shas[0]
    return checkpoints.get(other)


def _describe_sft(entry: Optional[dict]) -> str:
    """A manifest's SFT adapter entry ({"path", "sha256"}) for a message."""
    return f"{entry['path']} (sha256 {str(entry.get('sha256'))[:12]})" if entry else "no SFT adapter"


def check_same_start(s: Series, base, sft: Optional[dict], adapters: dict) -> None:
    """Refuse a series trained on another base, or from another SFT adapter than this eval's (by hash)."""
    check_same_base(s.manifest, base, f"{s.source}: PPO output {s.ppo_dir}")
    theirs = s.manifest.get("adapters", {}).get(SFT)
    if (theirs or {}).get("sha256") != (sft or {}).get("sha256"):
        raise ArtifactError(f"{s.source}: the run in {s.ppo_dir} started from {_describe_sft(theirs)}, this eval "
                            f"from {_describe_sft(sft)} (ppo.sft_adapter): the runs on one plot must share the SFT "
                            "model")
    missing = [a for a in s.manifest.get("stacked_on", list(adapters)) if a not in adapters]
    if missing:
        raise ArtifactError(f"{s.source}: the policy in {s.ppo_dir} is stacked on {missing}, which this config "
                            "does not provide (ppo.sft_adapter)")


def _ppo_checkpoints(ppo_dir: Path) -> list[tuple[int, Path]]:
    ckpt_root = ppo_dir / "checkpoints"
    found = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "policy" / "adapter_model.safetensors").is_file():
                found.append((int(m.group(1)), d / "policy"))
    return sorted(found)
