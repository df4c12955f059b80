"""Atomic file writes: the data goes to a temporary file in the target's folder, is flushed to disk, then renamed
over the target, so a reader (or a run killed mid-write) never sees half a file. Torch-free on purpose: dataset
collection workers use it without importing torch."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, IO


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
