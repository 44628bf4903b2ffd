"""Files shipped inside the package (``cattune/resources/``), named ``builtin:NAME``.

One resolver for every kind of shipped file (annotation instructions and demos,
experiment recipes), so that a misspelt name gets the same message listing what is
shipped. Built-in *models* are Python packages, not files: ``cattune.models``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def is_builtin(spec: str | os.PathLike | None) -> bool:
    return isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX)


def builtin_name(spec: str) -> str:
    return spec[len(BUILTIN_PREFIX):]


def resource_dir(folder: str) -> Path:
    return Path(str(resources.files("cattune") / "resources" / folder))


def shipped_file(spec: str, folder: str, pattern: str, kind: str) -> Path:
    """The file for ``builtin:NAME``: ``pattern`` with ``{name}`` filled, in ``resources/folder``.

    A name not shipped raises ``FileNotFoundError`` listing the shipped ones."""
    name = builtin_name(spec)
    shipped = resource_dir(folder)
    path = shipped / pattern.format(name=name)
    if not path.is_file():
        known = shipped_names(folder, pattern)
        raise FileNotFoundError(f"no shipped {kind} named {name!r}; shipped: {', '.join(known) or 'none'}")
    return path


def shipped_names(folder: str, pattern: str) -> list[str]:
    prefix, _, suffix = pattern.partition("{name}")
    names = (p.name for p in resource_dir(folder).glob(pattern.format(name="*")))
    return sorted(name[len(prefix):len(name) - len(suffix)] for name in names)
