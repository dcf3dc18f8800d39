"""Kill-safe stage state: state files that load no code, checkpoint folders written whole or not at all,
and the work folder a resumable stage (sft, reward, ppo) writes into until it completes.

```
RUN/<stage>.work/checkpoints/step-000020/   one complete checkpoint (written as .step-000020.tmp, renamed)
RUN/<stage>.work/checkpoints/latest         the newest complete checkpoint's name
RUN/<stage>.work/metrics.jsonl ...          the run in progress; manifest.json is written last
RUN/<stage>/                                the work folder, renamed when the stage completes
```

State files are JSON plus safetensors (``state.json`` + ``state.safetensors``): loading one parses
JSON and raw tensors and never runs code, so a checkpoint folder from someone else is as safe to
``--resume`` from as a data file. Files that only exist as pickles (``trainer_state.pt`` of earlier
versions, the optimizer/scheduler/RNG files of transformers' Trainer) are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers; a refused
file is named in an ArtifactError and nothing in it runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from pipeline.artifacts import guard
from pipeline.artifacts.outputs import (
    ArtifactError,
    WriteError,
    is_complete,
    replace_folder,
    write_text_atomic,
)
from pipeline.artifacts.readers import (
    check_adapter_folder,
    load_tensors,
    read_json,
    remake_hint,
)
from pipeline.artifacts.verify import RUN_CONFIG

STATE = "state"  # state.json + state.safetensors
LEGACY_STATE = "trainer_state.pt"  # PPO checkpoints before safe state files
TRAINER_STATE = "trainer_state.json"  # written last into a transformers Trainer checkpoint (SFT)
_STEP_DIR = re.compile(r"step-(\d+)$")


# ---------------------------------------------------------------------------------------------
# State files: nested dicts/lists/tuples of numbers, strings, tensors and numpy arrays


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"$ndarray": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        # Optimizer states are keyed by parameter index: keep the keys' types.
        return {"$items": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                           for k, v in obj.items()]}
    raise TypeError(f"{where}: a checkpoint holds numbers, strings, tensors, arrays, lists, tuples and "
                    f"dicts only, not {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag in ("$tensor", "$ndarray"):
            if value not in tensors:
                raise ArtifactError(f"{where}: names tensor {value!r}, which its .safetensors file does not hold")
            return tensors[value].numpy() if tag == "$ndarray" else tensors[value]
        if tag == "$tuple":
            return tuple(_decode(v, tensors, where) for v in value)
        if tag == "$items":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_state(folder: str | Path, state: dict, name: str = STATE) -> None:
    """Write ``state`` as ``<name>.safetensors`` (every tensor and array) and ``<name>.json`` (the rest)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"format": 1, "state": tree}))


def load_state(folder: str | Path, name: str = STATE) -> dict:
    """Read what ``save_state`` wrote; in a folder of an earlier version, its ``trainer_state.pt``
    (``torch.load(weights_only=True)``, or an ArtifactError naming the file)."""
    folder = Path(folder)
    path = folder / f"{name}.json"
    if not path.is_file() and (folder / LEGACY_STATE).is_file():
        return torch_load_weights_only(folder / LEGACY_STATE)
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the checkpoint state ({e}){remake_hint(path)}") from None
    if not isinstance(tree, dict) or tree.get("format") != 1:
        raise ArtifactError(f"{path}: not a state file this version writes (format {tree.get('format')!r})")
    return _decode(tree["state"], load_tensors(folder / f"{name}.safetensors"), str(path))


def _numpy_globals() -> list:
    """What ``numpy.random.get_state()`` pickles as: transformers allows the same for its rng_state.pth."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType", "UInt8DType")
                    if hasattr(dtypes, n)]
    return allowed


def torch_load_weights_only(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` (numpy arrays allowed, as in RNG states); a file holding anything
    else is refused, unexecuted, with an ArtifactError naming it."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
        raise ArtifactError(f"{path} was refused: it holds Python objects other than tensors and plain "
                            f"containers ({detail}), and loading it could run code. Nothing in it was "
                            "executed. Use checkpoints this pipeline wrote, or start over with --overwrite.") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ArtifactError(f"{path}: cannot read it ({e})") from None


def check_pickled_files(folder: str | Path) -> None:
    """Refuse (by name) any ``*.pt``/``*.pth``/``*.bin`` in ``folder`` that weights-only loading would
    not accept, before a library loads it."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in (".pt", ".pth", ".bin") and path.is_file():
            torch_load_weights_only(path)


def check_trainer_checkpoint(folder: str | Path) -> int:
    """The step of a transformers Trainer checkpoint (SFT), after checking, by name and before any model
    loads, what the Trainer would read: its pickled files (``check_pickled_files``), trainer_state.json
    and the adapter folder."""
    check_pickled_files(folder)
    state = read_json(Path(folder) / TRAINER_STATE, "a transformers Trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ArtifactError(f"{Path(folder) / TRAINER_STATE} has no global_step; it is not a Trainer state "
                            "(start over with --overwrite)")
    check_adapter_folder(folder)
    return state["global_step"]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (ours or a library's) is weights-only, whatever the call site asks."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        yield  # the user opted out explicitly; torch refuses both variables at once
        return
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def restore_parameters(named: list[tuple[str, torch.nn.Parameter]], saved: dict[str, torch.Tensor],
                       where: str | Path) -> None:
    """Copy ``saved`` into the live parameters of the same names. Another set of names or shapes (the
    config's LoRA rank, targets or layers changed since the checkpoint) is an ArtifactError."""
    live = dict(named)
    differ = sorted(set(live) ^ set(saved)) or [k for k in live if live[k].shape != saved[k].shape]
    if differ:
        raise ArtifactError(f"{where} holds parameters of another configuration (first difference: {differ[0]}); "
                            "resume with the config it was trained with, or start over with --overwrite")
    with torch.no_grad():
        for k, p in live.items():
            p.copy_(saved[k])


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    """Every RNG a stage draws from: torch's CPU generator, Python's, NumPy's, and each CUDA device's once
    CUDA is in use (sampling on a GPU draws from the device's generator, not the CPU's)."""
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`. CUDA generators are restored where the state has them and CUDA is
    present: on as many devices as both have (a state saved without CUDA leaves them as they are)."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------
# Checkpoint folders


def step_name(step: int) -> str:
    return f"step-{step:06d}"


class Checkpoints:
    """``step-NNNNNN`` folders under ``root``, each complete or absent, and a ``latest`` marker.

    ``complete``: file names of which one marks a finished checkpoint folder. ``keep``: how many of the
    newest to keep (None = all: PPO's are evaluated along the KL curve).
    """

    def __init__(self, root: str | Path, stage: str, keep: Optional[int] = None,
                 complete: tuple[str, ...] = (f"{STATE}.json", LEGACY_STATE)):
        self.root = Path(root)
        self.stage = stage
        self.keep = keep
        self.complete = complete

    def is_checkpoint(self, folder: Path) -> bool:
        return folder.is_dir() and any((folder / name).is_file() for name in self.complete)

    def all(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        found = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                m = _STEP_DIR.match(d.name)
                if m and self.is_checkpoint(d):
                    found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names, or the newest complete one if the marker is missing or stale."""
        marker = self.root / "latest"
        if marker.is_file():
            ckpt = self.root / marker.read_text().strip()
            if self.is_checkpoint(ckpt):
                return ckpt
        found = self.all()
        return found[-1][1] if found else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Call ``write(folder)`` on an empty temporary folder, then rename it to ``step-NNNNNN``. If
        writing fails (a full disk), the earlier checkpoints are untouched and a WriteError says so."""
        tmp = self.root / f".{step_name(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(step, e) from e
        return self.install(tmp, step)

    def install(self, folder: Path, step: int) -> Path:
        """Move a complete checkpoint ``folder`` (on the same file system) into place as ``step``."""
        guard.failpoint(f"{self.stage}:checkpoint-written:{step}")
        final = self.root / step_name(step)
        try:
            replace_folder(folder, final)
            write_text_atomic(self.root / "latest", final.name)
        except (OSError, WriteError) as e:
            raise self._write_error(step, e) from e
        guard.failpoint(f"{self.stage}:checkpoint:{step}")
        self._prune(final)
        return final

    def _write_error(self, step: int, e: Exception) -> WriteError:
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} is intact; free space and run again with --resume"
                if previous is not None else "there is no earlier checkpoint")
        reason = getattr(e, "strerror", None) or str(e)
        return WriteError(f"[{self.stage}] writing checkpoint {step_name(step)} in {self.root} failed ({reason}); {kept}")

    def _prune(self, newest: Path) -> None:
        if not self.keep:
            return
        for _, folder in self.all()[:-self.keep]:
            if folder != newest:
                shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The work folder of a resumable stage


class StageWork:
    """``RUN/<stage>.work``: checkpoints and outputs of a run in progress, renamed to ``RUN/<stage>``
    when it completes. ``start`` applies the rules for a stage that can resume:

    - a complete ``RUN/<stage>`` is replaced only with ``overwrite``;
    - ``resume`` continues from the latest checkpoint (an error if there is none);
    - without ``resume``, a work folder holding checkpoints is an unfinished run: refused unless
      ``overwrite`` (then it starts over);
    - a work folder that is complete (killed between writing the manifest and the rename) is
      published by ``resume``.
    """

    def __init__(self, run_dir: str | Path, stage: str, keep: Optional[int] = None,
                 complete: tuple[str, ...] = (f"{STATE}.json", LEGACY_STATE)):
        self.stage = stage
        self.out = Path(run_dir) / stage
        self.work = Path(run_dir) / f"{stage}.work"
        self.checkpoints = Checkpoints(self.work / "checkpoints", stage, keep, complete)
        self.finished = False

    def start(self, overwrite: bool = False, resume: bool = False, main_process: bool = True,
              config: Optional[dict] = None) -> Optional[Path]:
        """Returns the checkpoint to resume from, or None for a fresh start (the work folder is then
        empty but for ``checkpoints/``). Sets ``finished`` when the work folder only awaits its rename.
        ``config`` (the resolved config) is kept for the run; resuming with other values prints them."""
        ckpt = self._start(overwrite, resume, main_process)
        if config is not None and not self.finished:
            saved = self.work / RUN_CONFIG
            if ckpt is not None and saved.is_file():
                changed = _differences(json.loads(saved.read_text()), config)
                if changed:
                    print(f"[{self.stage}] note: resuming with settings changed since the run started: "
                          + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""), flush=True)
            elif main_process:
                write_text_atomic(saved, json.dumps(config, default=str))
        return ckpt

    def _start(self, overwrite: bool, resume: bool, main_process: bool) -> Optional[Path]:
        if is_complete(self.out) and not overwrite:
            raise ArtifactError(f"{self.out} already holds a complete {self.stage} output; pass --overwrite to "
                                "replace it")
        if resume:
            if is_complete(self.work):
                self.finished = True
                return None
            ckpt = self.checkpoints.latest()
            if ckpt is None:
                raise ArtifactError(f"--resume: no checkpoint in {self.checkpoints.root}; start without --resume")
            return ckpt
        if self.work.exists():
            if not overwrite and (self.checkpoints.latest() is not None or is_complete(self.work)):
                raise ArtifactError(f"{self.work} holds checkpoints of an unfinished run; pass --resume to "
                                    "continue it or --overwrite to start over")
            if main_process:
                shutil.rmtree(self.work)
        if main_process:
            self.checkpoints.root.mkdir(parents=True, exist_ok=True)
        return None

    def publish(self, keep_checkpoints: bool = False) -> Path:
        """Rename the completed work folder (manifest written) to ``RUN/<stage>``, replacing an old output
        only once the new one is whole. Checkpoints only serve resuming unless ``keep_checkpoints``."""
        if not is_complete(self.work):
            raise ArtifactError(f"{self.work} has no manifest.json: the {self.stage} stage did not finish")
        if not keep_checkpoints:
            shutil.rmtree(self.checkpoints.root, ignore_errors=True)
        (self.work / RUN_CONFIG).unlink(missing_ok=True)  # config.yaml beside the manifest says the same
        guard.failpoint(f"{self.stage}:publish")
        replace_folder(self.work, self.out)
        return self.out


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``key: old -> new`` for every leaf of two nested config dicts that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))]
    new = json.loads(json.dumps(new, default=str))  # compare as saved (tuples become lists)
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def latest_checkpoint(run_dir: str | Path, stage: str) -> Optional[Path]:
    """The checkpoint ``rlhf <stage> --resume`` would continue from (for messages)."""
    return StageWork(run_dir, stage, complete=(f"{STATE}.json", LEGACY_STATE, TRAINER_STATE)).checkpoints.latest()
