"""What every benchmark report carries: the command, the time, the machine and the parameters."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def command_line() -> str:
    """How to run it again: ``python -m loadtest.<name> ...`` rather than the absolute path Python saw."""
    script = Path(sys.argv[0])
    if script.parent.name == "loadtest" and script.suffix == ".py":
        return " ".join([".venv/bin/python -m loadtest." + script.stem, *sys.argv[1:]])
    return " ".join(sys.argv)


def header(name: str, params: dict) -> dict:
    return {"benchmark": name, "command": command_line(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}}


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
