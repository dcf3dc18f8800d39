"""Stage outputs: atomic folders, manifests, the resolved config, and metric logs."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.artifacts.verify import (
    FILES,
    MANIFEST,
    file_problems,
    list_files,
    parse_manifest,
    remake_command,
)
from pipeline.config import PipelineConfig, save_config, to_dict

_LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or incompatible with the current base."""


class WriteError(ArtifactError):
    """Writing an output failed (a full disk, a lost permission); the message says what is still intact."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def is_complete(folder: str | Path) -> bool:
    """A stage folder is complete once its manifest exists: the manifest is written last."""
    return (Path(folder) / MANIFEST).is_file()


@contextlib.contextmanager
def atomic_output(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A killed or failed run leaves only a ``.<name>.tmp-*`` folder (kept for inspection), never
    something that looks complete.
    """
    final = Path(final)
    if is_complete(final) and not overwrite:
        raise ArtifactError(f"{final} already holds a complete output; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        # Kept for inspection (logs, partial metrics); it has no manifest so nothing mistakes it for done.
        print(f"[{final.name}] stage failed; partial output kept in {tmp}", file=sys.stderr, flush=True)
        raise
    if not is_complete(tmp):
        raise ArtifactError(f"stage finished without writing {MANIFEST} in {tmp}")
    replace_folder(tmp, final)


def replace_folder(src: str | Path, dst: str | Path) -> None:
    """Put folder ``src`` at ``dst`` by renames only. An existing ``dst`` is renamed aside first and
    removed once ``src`` is in place; if a rename fails, ``dst`` is put back as it was, ``src`` keeps
    the new content, and the WriteError says so."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}") if dst.exists() else None
    try:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(src, dst)
    except OSError as e:
        if old is not None and old.exists() and not dst.exists():
            os.replace(old, dst)
        kept = f"{dst} is as it was; " if old is not None else ""
        raise WriteError(f"could not move {src} to {dst} ({e.strerror or e}); {kept}the new output is "
                         f"complete in {src}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: str | Path, stage: str, cfg: PipelineConfig, base: Any,
                   metrics: dict, data: Optional[dict] = None, adapters: Optional[dict] = None,
                   extra: Optional[dict] = None, with_checkpoints: bool = False) -> dict:
    """Write the resolved config and ``manifest.json`` (last) into ``folder``; the manifest lists every
    file in ``folder`` with its size and sha256 (``checkpoints/`` only if ``with_checkpoints``: the
    other stages remove theirs when they publish)."""
    folder = Path(folder)
    save_config(cfg, folder / "config.yaml")
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base": base.to_dict() if hasattr(base, "to_dict") else base,
        "data": data or {},
        "adapters": adapters or {},
        "metrics": metrics,
        "libraries": library_versions(),
        "command": " ".join(sys.argv),
        "config": to_dict(cfg),
    }
    if extra:
        manifest.update(extra)
    manifest[FILES] = list_files(folder, with_checkpoints)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def write_jsonl(path: str | Path, rows) -> None:
    """One JSON object per line, written to a temporary name and renamed (never half a file)."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Drop the rows of a per-step JSONL log whose ``step`` is after ``step``: a run resumed from the
    checkpoint of ``step`` logs them again."""
    path = Path(path)
    if path.is_file():
        # split at "\n" only: str.splitlines also splits at U+0085, U+2028 and other characters that
        # json.dumps(ensure_ascii=False) leaves inside strings (a sampled response held one)
        rows = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
        write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name and rename it over ``path``: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest of a complete stage output; with ``verify``, every file it lists is first checked
    (size, then sha256, cached per size and mtime): a missing, truncated or changed file is an
    ArtifactError naming it and the command that writes it again. Manifests from before file lists
    load unchecked."""
    folder = Path(folder)
    if not is_complete(folder):
        raise ArtifactError(f"{folder} is not a complete stage output (no {MANIFEST}); run that stage first")
    manifest, problem = parse_manifest(folder)
    if problem:
        raise ArtifactError(problem)
    if verify:
        problems = file_problems(folder, manifest)
        if problems:
            more = f" (and {len(problems) - 1} more: `rlhf verify {folder.parent}` lists them)" if len(problems) > 1 else ""
            raise ArtifactError(f"{problems[0]}{more}; remake it with: {remake_command(folder, manifest)}")
    return manifest


def check_same_base(manifest: dict, base: Any, what: str) -> None:
    """Refuse to combine an artifact trained on another base model or tokenizer."""
    theirs = manifest.get("base", {})
    ours = base.to_dict() if hasattr(base, "to_dict") else base
    for key, label in (("weights_sha256", "base weights"), ("tokenizer_sha256", "tokenizer")):
        if theirs.get(key) != ours.get(key):
            raise ArtifactError(
                f"{what} was trained on a different {label} ({theirs.get('name')}, {str(theirs.get(key))[:12]}) "
                f"than the current base ({ours.get('name')}, {str(ours.get(key))[:12]})")


class MetricsLogger:
    """One flat dict per step: JSONL always, TensorBoard when asked.

    ``resume_step``: continue the file of a run resumed after ``resume_step`` steps, dropping the rows
    it logged after that (the killed run got further than it saved).
    """

    def __init__(self, path: str | Path, tensorboard_dir: Optional[str | Path] = None,
                 resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._f = open(self.path, "a" if resume_step is not None else "w")
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict, step: Optional[int] = None) -> None:
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()
        if self._tb is not None and step is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
