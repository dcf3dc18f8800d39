"""Process-level safety around a stage: one writer per stage folder, a clean stop on SIGINT/SIGTERM,
and the fault-injection points the kill tests use.

- ``StageLock``: ``RUN/.<stage>.lock`` is held (``flock``) by the process writing that stage and names
  it (pid, host, start time, command). A second writer is refused with that name. The kernel drops
  the lock when its process dies, so a lock left by a killed run is taken over (and said so).
- ``stop_on_signals``: while a training loop allows it (``graceful_stop(True)``), SIGINT or SIGTERM
  only sets a flag; the loop finishes its step, saves a checkpoint and raises ``StopRequested``.
  Anywhere else, or on a second signal, ``StopRequested`` is raised at once (the last checkpoint is
  kept; nothing that looks complete has been written).
- ``failpoint``: ``RLHF_FAILPOINTS=sft:checkpoint:2,ppo:publish`` kills this process with SIGKILL at
  those points (``name=TERM`` / ``name=INT`` sends that signal instead). Only tests set it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline.artifacts.outputs import ArtifactError

FAILPOINTS_ENV = "RLHF_FAILPOINTS"


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the stage. A KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signal_name: str, detail: str = ""):
        super().__init__(signal_name, detail)
        self.signal_name = signal_name
        self.detail = detail


class LockedError(ArtifactError):
    """Another live process writes the same stage of the same run folder."""


# ---------------------------------------------------------------------------------------------
# Signals


class _StopState:
    requested: Optional[str] = None  # the signal's name once one arrived inside a graceful region
    graceful: bool = False


_STOP = _StopState()
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _STOP.graceful and _STOP.requested is None:
        _STOP.requested = name
        print(f"\n{name}: stopping after the current step and saving it (send it again to stop at once)",
              file=sys.stderr, flush=True)
        return
    raise StopRequested(name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``StopRequested`` (or a graceful stop, see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    _STOP.requested, _STOP.graceful = None, False
    for s in _SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _STOP.requested, _STOP.graceful = None, False


def graceful_stop(allowed: bool) -> None:
    """Mark the start (True) and end (False) of a loop that checks ``stop_requested()`` after every step."""
    _STOP.graceful = allowed


def stop_requested() -> Optional[str]:
    """The name of the signal that asked the running loop to stop, or None."""
    return _STOP.requested


def end_of_step(stage: str, step: int, total: int, every: int, save: Callable[[], Path],
                any_process: Callable[[bool], bool] = bool) -> Optional[Path]:
    """What a training loop does after ``step`` of ``total`` steps: save a checkpoint every ``every``
    steps (0 = never; not after the last, the stage's output follows), pass the fault-injection point
    ``<stage>:step:<step>``, and stop if a signal asked to, saving this step first. ``any_process``
    combines the stop flag over processes, which a signal may reach at different steps."""
    saved = save() if every and step % every == 0 and step < total else None
    failpoint(f"{stage}:step:{step}")
    requested = stop_requested()
    if step < total and any_process(requested is not None):
        if saved is None:
            save()
        raise StopRequested(requested or "a signal to another process", f"after step {step}")
    return saved


def exit_code(signal_name: str) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    try:
        return 128 + int(signal.Signals[signal_name])
    except KeyError:
        return 130


# ---------------------------------------------------------------------------------------------
# Fault injection


def failpoint(name: str) -> None:
    """Kill this process at ``name`` when ``RLHF_FAILPOINTS`` lists it (tests only; see the module docstring)."""
    wanted = os.environ.get(FAILPOINTS_ENV)
    if not wanted:
        return
    for item in wanted.split(","):
        point, _, sig = item.strip().partition("=")
        if point == name:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.Signals[f"SIG{sig}"] if sig else signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# One writer per stage


def _holder_text(info: dict) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
            f"({info.get('command', '?')})")


class StageLock:
    """An exclusive ``flock`` on ``path`` whose content names the holder. Local file systems only
    (``flock`` on NFS depends on the mount)."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: Optional[int] = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {}

    def acquire(self) -> Optional[dict]:
        """Take the lock; returns the info of a dead previous holder it took over (None if there was none).
        Raises LockedError naming the live holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise LockedError(f"{self.what} is being written by {_holder_text(holder)}; wait for it to "
                                  f"finish or stop it (lock file {self.path})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file while we opened it: lock the new one
        stale = self._read(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        if stale:
            print(f"[lock] took over {self.path} from {_holder_text(stale)}, which no longer runs", flush=True)
        return stale or None

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock: a waiter that opened the old file re-checks the inode.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def stage_lock(run_dir: str | Path, stage: str) -> StageLock:
    return StageLock(Path(run_dir) / f".{stage}.lock", f"{Path(run_dir) / stage}")
