"""File helpers written once: atomic writes, safe file names, sha256."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path


def write_synced(path: Path, write) -> None:
    """Create `path` with write(f) (binary) and flush it to disk before anything is renamed over it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it and one rename: a reader (or a killed
    writer) never sees a partial file. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def readable_file(path, what: str) -> Path:
    """`path` as a Path when it is a regular file, else an error that says what it is instead: missing, a folder,
    or something that is not a file (a named pipe, a device), which `is_file()` alone would call missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder: give a file")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a named pipe, socket or device): give a file"
                         + (", or - for standard input" if what == "input file" else ""))
    return path


def same_file(a, b) -> bool:
    """Whether paths `a` and `b` name one file (through links or other spellings); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(s: str) -> str | None:
    """Why `s` cannot be tokenised (a lone UTF-16 surrogate, e.g. from the JSON escape \\ud800); None if fine."""
    bad = _SURROGATE.search(s)
    if bad is None:
        return None
    return (f"contains a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}: send valid Unicode "
            "(a \\ud800-\\udfff escape must be one half of a pair)")


def safe_name(s: str) -> str:
    """`s` with every character other than letters, digits and -._ replaced by _ (a file-name part)."""
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in s)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
