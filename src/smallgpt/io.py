"""Atomic file and directory writes: a kill at any moment leaves the previous version intact.

Also the run-folder lock: one writer per folder, enforced by the kernel.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smallgpt.errors import UserError

LOCK_FILE = ".lock"
# mkstemp/mkdtemp create private (0600/0700) entries; finished files get the usual permissions
_UMASK = os.umask(0)
os.umask(_UMASK)


def cannot_write(path: str | os.PathLike, error: OSError) -> UserError:
    """A failed write (full disk, file size limit, no permission) as one line."""
    return UserError(f"cannot write {path}: {error.strerror or error}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file's path in `path`'s folder to write; on success it replaces `path` (synced
    to disk first), on any failure it is removed, so `path` is whole or untouched."""
    path = Path(path)
    check_file_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise cannot_write(path, e) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and an `os.replace`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_file_target(path: str | os.PathLike) -> None:
    """UserError if no file can be written at `path` (it is a folder, or below a file): callers check
    their output path before the work whose result it takes."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"cannot write {path}: {above} is a file, not a folder")


def check_folder_target(path: str | os.PathLike) -> None:
    """UserError if `path` is a file: writing a folder there would replace it."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{path} exists and is not a folder: choose another output path")


def holds_files(path: str | os.PathLike) -> bool:
    """Whether the folder `path` (or the copy an interrupted `atomic_dir` swap left) holds anything."""
    folder = resolve_dir(path)
    return folder.is_dir() and any(folder.iterdir())


def refuse_to_replace(path: str | os.PathLike, what: str, overwrite: bool, how: str = "--overwrite") -> None:
    """The one rule of every writer: `path` already holds `what` (a trained run, prepared data, an
    export), and it is replaced only when the user said so (`how`, e.g. `--overwrite`)."""
    if not overwrite:
        raise UserError(f"{path} already holds {what}: pass {how} to replace it, or choose another path")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it takes the place of `path` (an old one is replaced).

    The swap is two renames (old -> `<path>.old`, new -> `<path>`); `resolve_dir` finds the old
    copy if a kill falls between them, so a reader always sees one complete version.
    """
    path = Path(path)
    check_folder_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise cannot_write(path, e) from None
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:  # a previous swap was cut short after its first rename: `old` is the good copy
            old.rename(path)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def resolve_dir(path: str | os.PathLike) -> Path:
    """The complete version of a folder written by `atomic_dir`, even after an interrupted swap."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        return old
    return path


def read_user_text(path: str | os.PathLike, what: str = "file") -> str:
    """A text file the user named, decoded as UTF-8 (without a byte-order mark); a UserError naming
    it if it is missing, unreadable or not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not valid UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks (corpora can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) while the block runs.

    An OS lock (flock) on `folder/.lock`, so the kernel releases it on any exit, kill -9 included; a
    stale file is harmless. The holder writes its pid into the file for the next one's error message,
    and removes the temp files and folders that writers killed mid-write left behind.
    """
    folder = Path(folder)
    check_folder_target(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as e:
        raise cannot_write(folder / LOCK_FILE, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"{folder} is in use by process {holder} (another smallgpt writing it): "
                "wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_leftovers(folder)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def remove_leftovers(folder: Path) -> None:
    """Temp files and folders of `atomic_write_*` and `atomic_dir` under `folder`: call it only
    holding the folder's lock, when no writer can be using them."""
    for path in sorted(folder.rglob(".*.tmp"), reverse=True):  # inner ones first
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
