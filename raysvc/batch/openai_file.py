"""OpenAI batch files: checking the input before any work, and an output that resumes.

Input: JSONL, one request per line, `{"custom_id", "method", "url", "body"}`. The check
streams the file once (memory: 8 bytes per line, the custom_id's hash) and reports every
line that is not a JSON object, lacks a field, or repeats a custom_id (duplicates are
confirmed by a second pass over the few lines whose hashes collide).

Output: JSONL, one line per custom_id, appended as rows finish and flushed line by line;
an interrupted run leaves at most a torn last line, which the next run cuts off. Beside it,
`OUTPUT.meta.json` records what produced it (the input's SHA-256, the model and engine
settings): a rerun with the same inputs resumes — the custom_ids already in OUTPUT are
skipped — and a rerun with other inputs refuses, unless told to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIELDS = ("custom_id", "method", "url", "body")
MAX_REPORTED = 20


def id_hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")


@dataclass
class InputCheck:
    total: int = 0
    sha256: str = ""
    bad: list[tuple[int, str]] = field(default_factory=list)  # the first MAX_REPORTED
    num_bad: int = 0

    def report(self, lineno: int, why: str) -> None:
        self.num_bad += 1
        if len(self.bad) < MAX_REPORTED:
            self.bad.append((lineno, why))


def _envelope_error(raw: bytes) -> tuple[str | None, str | None]:
    """(custom_id, None) for a good envelope, (None, why) for a bad one."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"not JSON ({e})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object but {type(obj).__name__}"
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        return None, f"missing {', '.join(missing)}"
    if not isinstance(obj["custom_id"], str) or not obj["custom_id"]:
        return None, "custom_id must be a non-empty string"
    return obj["custom_id"], None


def check_input(path: str | os.PathLike) -> InputCheck:
    check, hashes, digest = InputCheck(), array("Q"), hashlib.sha256()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            check.total += 1
            custom_id, why = _envelope_error(raw)
            if why is not None:
                check.report(lineno, why)
            else:
                hashes.append(id_hash(custom_id))
    check.sha256 = digest.hexdigest()
    if len(hashes) > 1:
        ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
        collide = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if collide:
            _confirm_duplicates(path, collide, check)
    check.bad.sort()
    return check


def _confirm_duplicates(path, collide: set[int], check: InputCheck) -> None:
    first: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            custom_id, why = _envelope_error(raw)
            if why is None and id_hash(custom_id) in collide:
                if custom_id in first:
                    check.report(lineno, f"custom_id {custom_id!r} repeats line "
                                         f"{first[custom_id]}")
                else:
                    first[custom_id] = lineno


class OutputFile:
    """The output JSONL and its meta file; `open` decides between start, resume, refuse.

    One writer at a time: `open` takes an exclusive lock (`OUTPUT.lock`, flock) held until
    `close`, so a second job on the same OUTPUT refuses instead of interleaving lines; the
    kernel drops the lock with its process, so a killed job never blocks its rerun.
    Durability: the meta is written to a temporary file, fsynced, renamed and its folder
    fsynced before any row; the output is fsynced every few seconds and at the end.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta_path = Path(f"{self.path}.meta.json")
        self.lock_path = Path(f"{self.path}.lock")
        self._lock_fd: int | None = None

    def open(self, meta: dict, overwrite: bool) -> tuple[np.ndarray, dict]:
        """Prepare to append; return (sorted hashes of the custom_ids already done, the
        meta to keep). ValueError (saying why) if OUTPUT exists from other inputs, is
        damaged, or another job is writing it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        if overwrite or not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "wb") as f:
                os.fsync(f.fileno())
            self._write_meta(meta)
            return np.zeros(0, dtype=np.uint64), meta
        if not self.meta_path.exists():
            raise ValueError(f"{self.path} exists but was not written by raysvc batch "
                             f"(no {self.meta_path.name}); pass --overwrite to replace it")
        old = json.loads(self.meta_path.read_text())
        changed = [k for k in ("input_sha256", "model", "engine", "served_model_name")
                   if old.get(k) != meta.get(k)]
        if changed:
            raise ValueError(f"{self.path} was written from different {', '.join(changed)} "
                             f"(see {self.meta_path.name}); refusing to resume; pass "
                             f"--overwrite to start again")
        self._repair()
        return self._done(), {**meta, "created": old.get("created", meta["created"])}

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"{self.path} is being written by another raysvc batch "
                             f"(pid {holder}, lock {self.lock_path.name}); wait for it or "
                             f"write elsewhere") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)
        fd = os.open(self.meta_path.parent, os.O_RDONLY)  # the rename itself
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _repair(self) -> None:
        """Cut a torn last line (the writer died mid-line) off."""
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    end = pos - step + nl + 1
                    break
                pos -= step
            else:
                end = 0
            if end != size:
                f.truncate(end)
                os.fsync(f.fileno())

    def _done(self) -> np.ndarray:
        """The custom_ids already answered; a line that is not one of ours (a torn line
        is cut before this) names itself: resuming past it could lose or repeat rows."""
        hashes = array("Q")
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    custom_id = json.loads(raw)["custom_id"]
                    if not isinstance(custom_id, str):
                        raise TypeError("custom_id is not a string")
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}:{lineno}: not an output line of raysvc "
                                     f"batch ({type(e).__name__}: {e}); fix or delete that "
                                     f"line to resume, or pass --overwrite") from None
                hashes.append(id_hash(custom_id))
        return np.sort(np.frombuffer(hashes, dtype=np.uint64))

    def appender(self):
        return open(self.path, "a", encoding="utf-8")
