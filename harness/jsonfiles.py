"""JSON files beside specs and reports: strict (no NaN), written atomically under a lock, read
defensively. Baselines and counterexample stores are read-modify-write: two runs at once must
not lose each other's entries, and a killed write must leave neither a torn file nor litter."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
import threading
from pathlib import Path

from harness.errors import HarnessError
from harness.files import UnreadableFile, read_regular_text

MAX_STORED_BYTES = 1_000_000_000   # a baseline or counterexample store; real ones are MBs

_held: dict[str, int] = {}   # folders this process holds the lock of -> depth (re-entrant)
_held_lock = threading.Lock()


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock (fcntl.flock) on the folder of `path`: read-modify-write cycles
    of files in it from other processes wait. Locking the folder leaves no lock files."""
    folder = str(Path(path).resolve().parent)
    Path(folder).mkdir(parents=True, exist_ok=True)
    with _held_lock:
        depth = _held.get(folder, 0)
        _held[folder] = depth + 1
    fd = None
    try:
        if depth == 0:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        with _held_lock:
            _held[folder] -= 1


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the
    target: an interrupted write leaves the old file or the new one, never a torn file.
    Temporary files a killed writer left behind are removed first (under the folder lock, so
    none of them belongs to a live writer): only names this function makes, matched exactly,
    never a pattern built from the target's name (`out/*` must not match the user's files)."""
    path = Path(path)
    with locked(path):
        for stale in _own_temp_files(path):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; reports are for sharing
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.harness-"


def _own_temp_files(path: Path) -> list[Path]:
    """The temporary files `write_atomic(path, ...)` makes: the prefix, then mkstemp's eight
    random characters, then `.tmp`."""
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[a-z0-9_]{8}\.tmp")
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def finite(value):
    """`value` with every NaN or infinite float replaced by None: what strict JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def not_finite(value) -> bool:
    """Whether any float inside `value` is NaN or infinite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(not_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(not_finite(v) for v in value)
    return False


def dumps(data, **kwargs) -> str:
    """json.dumps that never writes the non-JSON tokens NaN / Infinity."""
    return json.dumps(finite(data), allow_nan=False, **kwargs)


class CorruptFile(HarnessError):
    """A JSON file the harness keeps is not what it wrote."""


def read_object(path: Path, fix: str) -> dict:
    """A JSON object from `path` ({} when the file does not exist); CorruptFile naming the file
    and `fix` when it is unreadable, not JSON or not an object."""
    path = Path(path)
    try:
        text = read_regular_text(path, MAX_STORED_BYTES)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, UnreadableFile) as exc:
        raise CorruptFile(f"{path} cannot be read ({exc}); {fix}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CorruptFile(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def companion_path(spec_file: str | Path, kind: str) -> Path:
    """A file the harness keeps beside a spec: specs/x.yaml -> specs/x.<kind>.json; any other
    suffix stays in the name (specs/x.yml -> specs/x.yml.<kind>.json), so x.yaml and x.yml in
    one folder never share a baseline or a counterexample store."""
    path = Path(spec_file)
    return path.with_name((path.stem if path.suffix == ".yaml" else path.name) + f".{kind}.json")


def _legacy_companion(spec_file: str | Path, kind: str) -> Path | None:
    """Where older releases kept a `.yml` spec's file (x.<kind>.json), while it is there, the
    new name is not, and no x.yaml beside it owns that name."""
    path = Path(spec_file)
    old = path.with_name(path.stem + f".{kind}.json")
    if path.suffix == ".yaml" or old == companion_path(path, kind):
        return None
    if companion_path(path, kind).exists() or path.with_suffix(".yaml").exists():
        return None
    return old if old.exists() else None


def companion_to_read(spec_file: str | Path, kind: str) -> Path:
    """`companion_path`, or the name an older release wrote (still read: nothing is lost)."""
    return _legacy_companion(spec_file, kind) or companion_path(spec_file, kind)


def adopt_legacy_companion(spec_file: str | Path, kind: str) -> None:
    """Before a write (under the folder lock): move an older release's file to the new name."""
    old = _legacy_companion(spec_file, kind)
    if old is not None:
        os.replace(old, companion_path(spec_file, kind))


def keep_backup(path: Path) -> Path:
    """Copy a file the harness is about to replace to `<path>.bak`."""
    import shutil

    backup = Path(path).with_name(Path(path).name + ".bak")
    shutil.copyfile(path, backup)
    return backup
