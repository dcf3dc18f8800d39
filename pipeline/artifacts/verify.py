"""Outputs that prove themselves: the file list a manifest records (size and sha256 of every file a
stage wrote), the check of a folder against it, and the check of a whole run folder (`rlhf verify`).

Below ``outputs`` (which writes and reads manifests through it): this module parses manifest.json
itself and reports problems as lines, raising nothing of its own.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.artifacts.hashing import sha256_file

MANIFEST = "manifest.json"
FILES = "files"  # the manifest key: {relative path: {"size": bytes, "sha256": hex}}
RUN_CONFIG = "run_config.json"  # the resolved config a run in progress started with; removed on publishing
CHECKPOINTS = "checkpoints"
UNVERIFIED = "unverified: written before file lists"
MAKE_ONLY = ("forgetting-demo",)  # outputs a Makefile target writes, not an rlhf command


def list_files(folder: str | Path, with_checkpoints: bool) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder`` but the manifest itself and the files that do not
    outlive the stage's publishing (``run_config.json``; ``checkpoints/`` unless the stage keeps them)."""
    folder = Path(folder)
    skip = {MANIFEST, RUN_CONFIG} | (set() if with_checkpoints else {CHECKPOINTS})
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if rel.parts[0] in skip:
            continue
        out[rel.as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def file_problems(folder: str | Path, manifest: dict) -> list[str]:
    """One line per listed file that is missing, of another size or another content, naming the file."""
    folder = Path(folder)
    problems = []
    for rel, want in (manifest.get(FILES) or {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            how = "truncated" if size < want["size"] else "longer than written"
            problems.append(f"{path} is {how} ({size} bytes; the manifest says {want['size']})")
        elif (digest := sha256_file(path)) != want["sha256"]:
            problems.append(f"{path} has changed since it was written (sha256 {digest[:12]}, the "
                            f"manifest says {want['sha256'][:12]})")
    return problems


def remake_command(folder: str | Path, manifest: dict) -> str:
    """The command that writes ``folder`` again: its stage, with the config its manifest's command used
    (CONFIG where the manifest cannot tell)."""
    folder = Path(folder)
    stage = manifest.get("stage") or {"fused": "fuse"}.get(folder.name, folder.name)
    try:
        argv = shlex.split(str(manifest.get("command", "")))
    except ValueError:
        argv = []
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "CONFIG"
    if stage in MAKE_ONLY:
        return shlex.join(["make", stage, f"CONFIG={config}", f"RUN={folder.parent}"])
    return shlex.join(["rlhf", stage, "--config", config, "--run-dir", str(folder.parent), "--overwrite"])


def parse_manifest(folder: str | Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, a line saying why ``folder``'s manifest cannot be read)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        return None, f"{path}: cannot read it ({e.strerror or e})"
    except ValueError as e:
        return None, f"{path} is not valid JSON ({e}); remake it with: {remake_command(folder, {})}"
    if not isinstance(manifest, dict):
        return None, (f"{path} holds a {type(manifest).__name__}, not a manifest object; remake it with: "
                      f"{remake_command(folder, {})}")
    return manifest, None


@dataclass
class RunCheck:
    """What `rlhf verify` found in a run folder."""
    run_dir: Path
    outputs: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        state = f"{len(self.problems)} problem(s)" if self.problems else "all intact"
        unverified = f", {len(self.notes)} unverified" if self.notes else ""
        return (f"{self.run_dir}: {self.outputs} stage output(s), {self.files} files, "
                f"{self.bytes / 1e6:.1f} MB checked in {self.seconds:.2f}s: {state}{unverified}")


def _stage_folders(run_dir: Path) -> list[Path]:
    """The run's stage outputs: folders holding a manifest, or named like a stage and lacking one."""
    stages = ("sft", "reward", "ppo", "fused", "eval")
    return sorted(d for d in run_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and not d.name.endswith(".work") and ((d / MANIFEST).is_file() or d.name in stages))


def verify_run(run_dir: str | Path) -> RunCheck:
    """Check every stage output of ``run_dir`` (PPO checkpoints included) against its manifest."""
    run_dir = Path(run_dir)
    check = RunCheck(run_dir)
    t0 = time.perf_counter()
    if not run_dir.is_dir():
        check.problems.append(f"{run_dir} is not a folder; pass a run folder (RUN, holding sft/, reward/, ...)")
        return check
    folders = _stage_folders(run_dir)
    if not folders:
        check.problems.append(f"{run_dir} holds no stage output (sft/, reward/, ppo/, fused/, eval/)")
    for folder in folders:
        if not (folder / MANIFEST).is_file():
            check.problems.append(f"{folder} has no {MANIFEST}: the stage did not finish; run it again "
                                  f"(`rlhf {'fuse' if folder.name == 'fused' else folder.name} ...`)")
            continue
        manifest, problem = parse_manifest(folder)
        check.outputs += 1
        if problem:
            check.problems.append(problem)
            continue
        if FILES not in manifest:
            check.notes.append(f"{folder}: {UNVERIFIED}")
            continue
        listed = manifest[FILES]
        check.files += len(listed)
        check.bytes += sum(v["size"] for v in listed.values())
        remake = remake_command(folder, manifest)
        check.problems += [f"{p}; remake it with: {remake}" for p in file_problems(folder, manifest)]
    check.seconds = time.perf_counter() - t0
    return check

