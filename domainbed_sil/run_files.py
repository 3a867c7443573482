"""The files of one run directory: records, checkpoint, done marker, lock.  Writes are atomic."""
from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

RESULTS = "results.jsonl"
CHECKPOINT = "checkpoint.pt"
DONE = "done"
LOCK = ".lock"
MODEL = "model.pt"
IDENTITY = "run.json"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, device) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path``, or None when it is unreadable (moved aside to ``*.corrupt``
    with a warning, so that the run restarts from scratch instead of failing forever)."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # any unpickling / truncation error means the file is unusable
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        warnings.warn(f"{path} is unreadable ({type(err).__name__}: {err}); moved to {aside.name}, restarting from step 0")
        return None


def _json_safe(value: Any) -> Any:
    """NaN and inf become null: they are not JSON, and a diverged run must still be readable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    with open(run_dir / RESULTS, "a") as f:
        f.write(json.dumps(_json_safe(dict(record)), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(run_dir: Path) -> List[Dict[str, Any]]:
    """Parsed records; a torn last line (a crash mid-write) is dropped."""
    path = run_dir / RESULTS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_records(run_dir: Path, before_step: int) -> List[Dict[str, Any]]:
    """Keep only records with ``step < before_step`` (those a resumed run will not redo); returns them."""
    kept = [r for r in read_records(run_dir) if r.get("step", -1) < before_step]
    atomic_write_bytes(run_dir / RESULTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
    return kept


class RunDirMismatch(ValueError):
    """The run directory holds a run made with other arguments."""


def without_hparams(identity: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """``identity`` with the hparams ``names`` left out of its ``hparams`` (the override) and
    ``resolved_hparams`` mappings."""
    kept = dict(identity)
    for key in ("hparams", "resolved_hparams"):
        if isinstance(kept.get(key), Mapping):
            kept[key] = {k: v for k, v in kept[key].items() if k not in names}
    return kept


def claim_run_dir(run_dir: Path, identity: Mapping[str, Any], ignored_hparams: Sequence[str] = ()) -> None:
    """Record what run ``run_dir`` holds, or check that it holds this one.

    ``identity``: the JSON-able arguments that define the run (not where data or output live).
    A directory written by a different run raises RunDirMismatch naming the first difference,
    so that a reused ``--output_dir`` never resumes or skips someone else's run.  Hparams in
    ``ignored_hparams`` (those that choose only how a number is computed) may differ, or be
    missing from a ``run.json`` written before they existed.
    """
    path = Path(run_dir) / IDENTITY
    wanted = json.loads(json.dumps(dict(identity), sort_keys=True))
    if path.exists():
        found = without_hparams(json.loads(path.read_text()), ignored_hparams)
        wanted = without_hparams(wanted, ignored_hparams)
        if found != wanted:
            key = next(k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k))
            raise RunDirMismatch(
                f"run directory {run_dir} holds another run ({key}={found.get(key)!r}, this one has {wanted.get(key)!r}); "
                "choose another --output_dir or delete that one"
            )
        return
    if (Path(run_dir) / RESULTS).exists() or (Path(run_dir) / DONE).exists():
        return  # written before run.json existed: nothing to compare with
    atomic_write_bytes(path, (json.dumps(wanted, sort_keys=True, indent=1) + "\n").encode())


def mark_done(run_dir: Path) -> None:
    atomic_write_bytes(run_dir / DONE, b"done\n")


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).exists()


class FileLock:
    """Exclusive, non-blocking ``flock`` on ``path``, holding the owner's pid; released when
    the process dies.  A second holder gets ``busy(path, holder_pid)`` raised."""

    def __init__(self, path: Path, busy: Callable[[Path, str], Exception]):
        self.path = Path(path)
        self._busy = busy
        self._fd: Optional[int] = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise self._busy(self.path, holder)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_file_locked(path: Path) -> bool:
    """True while some process holds the ``FileLock`` on ``path``."""
    path = Path(path)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def RunLock(run_dir: Path) -> FileLock:
    """The lock a training run holds on ``<run_dir>/.lock`` while it executes."""
    return FileLock(Path(run_dir) / LOCK,
                    lambda path, pid: RunDirBusy(f"run directory {path.parent} is in use by another process (pid {pid})"))


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run's lock (i.e. the run is executing right now)."""
    return is_file_locked(Path(run_dir) / LOCK)
