"""Policy modules must stay pure: no transport, storage, web, tracing, engine, clock or randomness."""

import ast
from pathlib import Path

import pytest

import shared.policy

FORBIDDEN = {"nats", "sqlalchemy", "fastapi", "httpx", "opentelemetry", "vllm", "psycopg", "asyncio",
             "socket", "subprocess", "time", "random", "os", "requests", "pynvml", "starlette", "uvicorn"}
POLICY_DIR = Path(shared.policy.__file__).parent


def imported_roots(source: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(POLICY_DIR.glob("*.py")), ids=lambda p: p.name)
def test_policy_module_imports_no_io(path):
    bad = imported_roots(path.read_text()) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}; policy must be a pure function of its inputs"


def test_checker_catches_forbidden_imports():
    assert imported_roots("import nats\nfrom sqlalchemy.orm import Session\nimport time") >= {"nats", "sqlalchemy", "time"}
    assert "opentelemetry" in imported_roots("from opentelemetry import trace")


def test_policy_package_is_not_empty():
    assert len(list(POLICY_DIR.glob("*.py"))) >= 5
