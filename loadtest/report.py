"""What every benchmark report carries: the command, the time, the machine and the parameters."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def header(name: str, params: dict) -> dict:
    return {"benchmark": name, "command": " ".join(sys.argv),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}}


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
