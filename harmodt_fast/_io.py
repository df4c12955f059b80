"""Atomic file writes: the data goes to a temporary file in the target's folder, is flushed to disk, then renamed
over the target, so a reader (or a run killed mid-write) never sees half a file. Folder locks: one process writes a
folder at a time. Torch-free on purpose: dataset collection workers use it without importing torch."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import warnings
from typing import Callable, IO

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no locks, temporary files are never reclaimed)
    fcntl = None

LOCK_FILE = ".lock"
TEMPORARY_PREFIX = ".tmp-"  # atomic_write's temporary files: `.tmp-<random hex><the target's extension>`
_OLD_SUFFIX = "-old"  # atomic_write_folder: `.tmp-<name>-old`, the folder it replaces, set aside


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> str:
    """Calls write(f) on a temporary file next to `path`, then renames it to `path`; returns `path`. The file gets
    the permissions of any new file of this process (0666 less the umask). A failed write (a full disk, say)
    removes the temporary file, leaves any previous `path` as it was and raises OSError naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temporary(folder, os.path.splitext(path)[1])
    try:
        if fcntl is not None:  # shared while being written: remove_stale_temporaries leaves it alone
            fcntl.flock(fd, fcntl.LOCK_SH)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = _write_failure(exc)
        if failed is None:
            raise
        full = " (the disk is full)" if failed.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OSError(failed.errno, f"cannot write {path}: {failed.strerror or failed}{full}; any previous file "
                                    f"there is kept") from exc
    return path


def _write_failure(exc: BaseException) -> OSError | None:
    """The OSError of a failed write behind `exc`: itself, or the one torch.save wrapped (it turns its file's
    OSError into a RuntimeError, the OSError its context)."""
    if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError):
        exc = exc.__context__
    return exc if isinstance(exc, OSError) and exc.errno is not None else None


def _create_temporary(folder: str, suffix: str) -> tuple[int, str]:
    """A new file `folder/.tmp-<random><suffix>`, opened for writing. Not tempfile.mkstemp: that creates 0600
    files, and the rename would give the target those permissions instead of the umask's."""
    while True:
        tmp = os.path.join(folder, f"{TEMPORARY_PREFIX}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(folder: str) -> list[str]:
    """Removes the temporary files atomic_write left in `folder` when its process was killed mid-write (a file no
    live writer holds); returns their paths. Call it holding the folder's lock."""
    removed = []
    if fcntl is None or not os.path.isdir(folder):
        return removed
    for entry in os.scandir(folder):
        if not entry.name.startswith(TEMPORARY_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:  # its writer just renamed it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
            os.unlink(entry.path)
            removed.append(entry.path)
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)
    return removed


def atomic_write_folder(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary folder beside `path`, which then replaces `path`: a reader sees the old folder
    or the new one (between the two renames, none; a run killed there gets the old one back on its next start),
    never a part of either."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TEMPORARY_PREFIX}{os.path.basename(path)}")
    old = tmp + _OLD_SUFFIX
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def restore_temporary_folders(folder: str) -> None:
    """Removes the temporary folders a killed atomic_write_folder left in `folder`; an old folder set aside whose
    replacement never arrived goes back in place."""
    if not os.path.isdir(folder):
        return
    for entry in list(os.scandir(folder)):
        if not entry.name.startswith(TEMPORARY_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        target = os.path.join(folder, entry.name[len(TEMPORARY_PREFIX):].removesuffix(_OLD_SUFFIX))
        if entry.name.endswith(_OLD_SUFFIX) and not os.path.exists(target):
            os.replace(entry.path, target)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)


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


def append_json_line(path: str, entry: dict, error: type[Exception], default: Callable | None = None) -> None:
    """Appends `entry` as one JSON line to `path`; a failed write (a full disk) raises `error` naming the file. The
    line may be left cut short: read_json_lines drops it."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=default) + "\n")
    except OSError as exc:
        raise error(f"cannot append to {path}: {exc}") from exc


def read_json_lines(path: str, error: type[Exception]) -> list[tuple[str, dict]]:
    """The (line, object) pairs of a JSON-lines file, each line ending in a newline. A damaged last line (its
    writer stopped mid-append) is dropped with a warning naming the file and line; a damaged line before it raises
    `error`: appends never leave one, so something else changed the file, and the caller must not rewrite it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    entries = []
    for number, line in lines:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError(f"a JSON {type(entry).__name__}, not an object")
        except ValueError as exc:
            if number != lines[-1][0]:
                raise error(f"{path}, line {number}: damaged ({exc}); only the last line can be cut short by a "
                            f"stopped writer, so repair or remove the file") from None
            warnings.warn(f"{path}, line {number}: dropped the damaged last line ({exc}), left by a writer that "
                          f"stopped mid-line", stacklevel=3)
            continue
        entries.append((line if line.endswith("\n") else line + "\n", entry))  # the next append starts a line
    return entries


class FolderLock:
    """An exclusive flock on `folder/.lock`, which records the holder's pid and host. acquire() on a folder held
    elsewhere, by another process or another holder in this one, raises `error` naming the folder and the holder.
    The kernel drops the lock when its holder dies, so the file a killed process leaves never blocks. Without
    fcntl (Windows) nothing is locked. Also a context manager (folder_lock)."""

    def __init__(self, folder: str, error: type[Exception] = RuntimeError):
        self.folder, self.error = folder, error
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Takes the folder (created if needed); a no-op when this lock holds it already."""
        if self.held or fcntl is None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
                os.close(fd)
                raise self.error(f"{self.folder}: in use by {holder} (lock {self.path}); wait for it to finish or "
                                 f"use another folder") from None
            try:  # the holder we waited on may have removed the file before we locked it: lock the current one
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Gives the folder back (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held, so no one locks the removed file's inode
        os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a holder dropped without release() (a Trainer never run, say)
        with contextlib.suppress(Exception):
            self.release()


def folder_lock(folder: str, error: type[Exception] = RuntimeError) -> FolderLock:
    """`with folder_lock(folder, error):` holds `folder` for the block (FolderLock)."""
    return FolderLock(folder, error)
