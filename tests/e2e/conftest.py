"""Starting the local cluster the way a user does: `warmserve up` in a process of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tooling.localcluster.infra import StartError
from tooling.localcluster.launch import ROOT, Launched, launch

__all__ = ["ROOT", "start_cluster"]


def start_cluster(state: Path, *args: str, extra_env: dict[str, str] | None = None,
                  timeout_s: float = 240) -> Launched:
    """Run `warmserve up` with its state in ``state`` on free ports; returns once it says it is up.
    Fails the test otherwise."""
    try:
        return launch(state, *args, extra_env=extra_env, timeout_s=timeout_s)
    except StartError as exc:
        pytest.fail(str(exc))
