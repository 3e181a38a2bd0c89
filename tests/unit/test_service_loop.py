"""Every service's event loop: uvloop's where it is installed, asyncio's otherwise."""

import subprocess
import sys
from pathlib import Path

import pytest

from shared import service

ROOT = Path(__file__).parents[2]
PROBE = """
import asyncio
from shared.service import run_service
from shared.settings import CommonSettings

async def run(stop):
    loop = asyncio.get_running_loop()
    print(type(loop).__module__.split(".")[0], flush=True)

run_service(run, "probe", CommonSettings())
"""


def test_a_service_runs_on_uvloop_where_it_is_installed():
    pytest.importorskip("uvloop")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["uvloop"]


def test_without_uvloop_asyncios_loop_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert service.loop_factory() is None
