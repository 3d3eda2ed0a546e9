"""Reading the files a spec names and a model folder holds: regular files only, with a size
limit. A FIFO would block the read forever and `/dev/zero` would fill memory; both are refused
with a message naming the file, before any byte is read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from harness.errors import HarnessError

MB = 1_000_000
MAX_CONFIG_BYTES = 64 * MB   # a model's or an SAE's config.json; real ones are kilobytes


class UnreadableFile(HarnessError):
    """A file the harness was asked to read is not a regular file, or too large."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_problem(path: str | Path) -> str | None:
    """Why `path` is not a regular file that a library may open (a FIFO, a device, a
    directory), or None. Missing files are left to the caller (None)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{path} is {_kind(mode)}, not a regular file"


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them. UnreadableFile when
    it is something else or larger; OSError (FileNotFoundError ...) as `open` raises it.
    Opened non-blocking, so a FIFO is refused instead of waiting for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(f"{path} is {_kind(mode)}, not a regular file; point the spec "
                                 "at a file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnreadableFile(f"{path} is larger than the limit of {_size(max_bytes)}")
    return data


def read_regular_text(path: str | Path, max_bytes: int) -> str:
    """`read_regular` decoded as UTF-8 (UnicodeDecodeError as `bytes.decode` raises it)."""
    return read_regular(path, max_bytes).decode("utf-8")


def _size(n: int) -> str:
    return f"{n // MB:,} MB" if n >= MB else f"{n:,} bytes"
