"""Files as cattune reads and writes them, and checks on a command's paths before any work.

A result that cannot be saved, or that would be saved over one of the command's own
inputs, should fail in the first second, not after hours of training or a paid-for
annotation run. Files are written atomically (readers see the old content or the new),
and text and config files are read naming the path in every error.
"""

from __future__ import annotations

import json
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


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would have
        # (or keep the replaced file's), so others can still read the data.
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_is_file(path: Path) -> None:
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def read_text_file(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """A whole UTF-8 text file; a missing file, a directory or other bytes name the path."""
    path = Path(path)
    check_is_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def load_config_file(path: str | os.PathLike, error: type[Exception] = ValueError):
    """Parse a JSON (.json) or YAML (any other name) file; a syntax error, or a key twice
    in one mapping, raises ``error`` naming the file. (Both parsers would keep the last of
    two values without a word, so one of the user's settings would silently do nothing.)"""
    path = Path(path)
    text = read_text_file(path, error)
    if path.suffix == ".json":
        def unique(pairs):
            keys = [k for k, _ in pairs]
            if dup := sorted({k for k in keys if keys.count(k) > 1}):
                raise error(f"{path}: key {dup[0]!r} appears twice in one object; keep one")
            return dict(pairs)

        try:
            return json.loads(text, object_pairs_hook=unique)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:  # a merged mapping (<<: *base) may be overridden
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise error(f"{path}:{key_node.start_mark.line + 1}: key {key!r} appears twice in one "
                                "mapping; keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeys)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
