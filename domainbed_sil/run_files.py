"""The files of one run directory: records, checkpoint, done marker, lock.  Writes are atomic."""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping

import torch

RESULTS = "results.jsonl"
CHECKPOINT = "checkpoint.pt"
DONE = "done"
LOCK = ".lock"
MODEL = "model.pt"


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
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def truncate_records(run_dir: Path, before_step: int) -> None:
    """Keep only records with ``step < before_step`` (those a resumed run will not redo)."""
    kept = [r for r in read_records(run_dir) if r.get("step", -1) < before_step]
    atomic_write_bytes(run_dir / RESULTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


def mark_done(run_dir: Path) -> None:
    atomic_write_bytes(run_dir / DONE, b"done\n")


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).exists()


class RunLock:
    """Exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``; released when the process dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd = None

    def __enter__(self) -> "RunLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RunDirBusy(f"run directory {self.path.parent} is in use by another process")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run's lock (i.e. the run is executing right now)."""
    path = Path(run_dir) / LOCK
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


def iter_run_dirs(root: Path) -> Iterator[Path]:
    for path in sorted(Path(root).rglob(RESULTS)):
        yield path.parent
