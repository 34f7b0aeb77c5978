"""The run directory: what may be used as one, and the lock that gives it one writer.

A run directory (``output_dir``) holds ``config.yaml`` (the resolved recipe), ``metrics.jsonl``,
``checkpoints/``, a copy of the run's tokenizer (``tokenizer/``) and ``.lock``. A fresh run may
start in a directory that does not exist, is empty, or holds an earlier flashlm run (which the
start then checks further: a run with checkpoints needs ``--resume``). Anything else is refused
before anything is written, so files a user had are never overwritten.

The lock is an advisory ``flock`` on ``.lock``, held by the main process from the moment the run
starts writing until it exits. The kernel drops it when the process dies, however it dies, so a
killed run never leaves a stale lock behind and its ``--resume`` starts at once; a second run
started on the same directory while the first is alive is refused. The file itself is never
deleted (deleting lock files races with the next taker).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK = ".lock"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a flashlm run directory (it holds a resolved recipe and a run's
    metrics or checkpoints)."""
    return (path / "config.yaml").is_file() and any((path / name).exists() for name in RUN_MARKERS[1:])


def holds_training_state(path: Path) -> bool:
    """Whether ``path`` is a flashlm run, a checkpoint, or inside one: nothing but training may
    write there (an export into it would corrupt the checkpoint)."""
    path = Path(path).absolute()
    if is_run_dir(path):
        return True
    return any((p / "trainer_state.json").is_file() or p.name == "checkpoints" and is_run_dir(p.parent)
               for p in (path, *path.parents))


def check_output_dir(path: Path) -> str | None:
    """Why ``path`` cannot be a run's ``output_dir``, or None when it can (see the module docstring)."""
    if path.exists() and not path.is_dir():
        return f"output_dir {path} exists and is not a directory"
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not names or names == [LOCK] or is_run_dir(path):  # new, empty, a run, or a run about to start
        return None
    names = [name for name in names if name != LOCK]
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    return (f"output_dir {path} already holds files that are not a flashlm run ({shown}); choose a new or "
            "empty directory. Nothing was changed.")


def lock_holder(path: Path) -> str | None:
    """The pid recorded by a live run holding ``path``'s lock, or None if nobody holds it. Takes
    nothing and writes nothing."""
    lock = path / LOCK
    if not lock.is_file():
        return None
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().decode(errors="replace").strip() or "unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class RunLock:
    """The run directory's lock, held until ``release`` (or process exit)."""

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"output_dir {path} is in use by another flashlm run (pid {holder}); wait for it "
                                 "to end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""
