"""Helpers shared by the benchmark scripts: machine description, tables, atomic JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# The data sits in shared/ beside the checkout (as for the tests).
DATA_DIR = REPO.parent / "shared" / "data"

try:  # run from a checkout without `pip install -e .`
    import cattune  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO / "src"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    import torch
    import transformers

    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def command_line() -> str:
    return " ".join([Path(sys.executable).name if "python" in Path(sys.executable).name else sys.executable,
                     *[a if a and " " not in a else repr(a) for a in sys.argv]])


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` so that readers see the old file or the new one, never half."""
    from cattune.files import atomic_write_text

    path = Path(path)
    payload = {"command": command_line(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def report(path: str | os.PathLike, payload: dict, render) -> Path:
    """Print ``render(payload)`` and write it with the payload as JSON (the end of every script)."""
    text = render(payload)
    print()
    print(text)
    out = write_json(path, {**payload, "table": text})
    print(f"\nwritten {out} ({payload['wall_s']:.0f}s)")
    return out


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A GitHub-markdown table (prints fine on a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines += [title, ""]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines.append(fmt(cells[0]))
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)
