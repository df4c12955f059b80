"""Atomic file writes: the data goes to a temporary file in the target's folder, is flushed to disk, then renamed
over the target, so a reader (or a run killed mid-write) never sees half a file. Folder locks: one process writes a
folder at a time. Torch-free on purpose: dataset collection workers use it without importing torch."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from typing import Callable, IO

LOCK_FILE = ".lock"


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> str:
    """Calls write(f) on a temporary file next to `path`, then renames it to `path`; returns `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_json_format(path: str, fmt: str, what: str, error: type[Exception]) -> dict:
    """A JSON object whose "format" is `fmt`; anything else raises `error` naming the file and the problem."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: not a {what} (format {data.get('format') if isinstance(data, dict) else None!r}, "
                    f"expected {fmt!r})")
    return data


@contextlib.contextmanager
def folder_lock(folder: str, error: type[Exception] = RuntimeError):
    """Holds `folder` (created if needed) for the with-block: an exclusive flock on `folder/.lock`, which records
    the holder's pid and host. A folder held elsewhere, by another process or another holder in this one, raises
    `error` naming the folder and the holder. The kernel drops the lock when its holder dies, so the file a killed
    process leaves never blocks. Without fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise error(f"{folder}: in use by {holder} (lock {path}); wait for it to finish or use another "
                        f"folder") from None
        try:  # the holder we waited on may have removed the file before we locked it: lock the current one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held, so no one locks the removed file's inode
        os.close(fd)
