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

from pipeline.config import PipelineConfig, save_config, to_dict

MANIFEST = "manifest.json"
_LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or incompatible with the current base."""


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
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_manifest(folder: str | Path, stage: str, cfg: PipelineConfig, base: Any,
                   metrics: dict, data: Optional[dict] = None, adapters: Optional[dict] = None,
                   extra: Optional[dict] = None) -> dict:
    """Write the resolved config and ``manifest.json`` (last) into ``folder``."""
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
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def write_jsonl(path: str | Path, rows) -> None:
    """One JSON object per line, written to a temporary name and renamed (never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not is_complete(folder):
        raise ArtifactError(f"{folder} is not a complete stage output (no {MANIFEST}); run that stage first")
    return json.loads((folder / MANIFEST).read_text())


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
    """One flat dict per step: JSONL always, TensorBoard when asked."""

    def __init__(self, path: str | Path, tensorboard_dir: Optional[str | Path] = None, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w")
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
