"""Checks on the paths a command reads and writes, made before any work starts.

A result that cannot be saved, or that would be saved over one of the command's own
inputs, should fail in the first second, not after hours of training or a paid-for
annotation run.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``./x`` and ``x``, symlinks, hard links and case-insensitive file systems included."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_distinct_paths(inputs: dict[str, list], outputs: dict[str, list]) -> None:
    """Refuse an output that is one of the command's inputs or other outputs: writing it
    would destroy the other file. ``{option: [paths]}``; inputs may repeat each other."""
    named = [(option, Path(p), kind) for kind, group in (("input", inputs), ("output", outputs))
             for option, paths in group.items() for p in paths if p is not None]
    for i, (option, path, kind) in enumerate(named):
        for other_option, other, other_kind in named[:i]:
            if "output" in (kind, other_kind) and same_file(path, other):
                raise ValueError(f"{option} {path} is the same file as {other_option} {other}: "
                                 "give them different paths")


def model_inputs(reference: str | None, results: tuple[str, ...] = ("eval_results.json",)) -> list[Path]:
    """A local model directory and its files, as inputs a command must not write over
    (the evaluation results kept in it excepted); nothing for a hub id or built-in name."""
    if not reference or not Path(reference).is_dir():
        return []
    return [Path(reference)] + [p for p in Path(reference).iterdir() if p.is_file() and p.name not in results]


def check_writable_file(path: str | os.PathLike, option: str) -> None:
    """A file that can be (re)written: not a directory, and its directory, or the first
    existing one above it (missing ones are created on writing), takes new files."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: not writable (permission denied or read-only file system)")
    parent = Path(os.path.abspath(path)).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is not a directory")
    _try_create_in(parent, option, str(path))


def check_writable_dir(directory: str | os.PathLike, option: str) -> None:
    """A directory that exists or can be made, and takes new files."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {directory}: exists and is not a directory")
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {directory}: {existing} is not a directory")
    _try_create_in(existing, option, str(directory))


def _try_create_in(directory: Path, option: str, label: str) -> None:
    # A real file, not os.access: root passes access() on mounts that still refuse files.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".cattune-write-test."):
            pass
    except OSError as e:
        raise ValueError(f"{option} {label}: cannot write there ({e.strerror or e})") from None


LOCK_FILE = ".cattune.lock"


@contextmanager
def output_lock(directory: str | os.PathLike, command: str):
    """Hold ``DIR/.cattune.lock`` while ``command`` writes ``DIR``: a second writer of the
    same output fails at once instead of running every step again or replacing the
    first one's files. The lock is the operating system's, so a killed holder frees it."""
    from filelock import FileLock, Timeout

    if int(os.environ.get("RANK", "0")) != 0:  # one process of a distributed job speaks for all
        yield
        return
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"another {command} is writing {directory} (it holds {path}); wait for it to finish "
                           "or give another output directory") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # a lock file left behind would look like a run still going
        lock.release()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: what identifies data that may change under the same name."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
