"""Architecture as tests: cores are pure, shared/ holds no tooling, services never import each other, the
simulator runs the services' cores instead of decision code of its own, and no module imports itself back
through others."""

import ast
from pathlib import Path

import pytest

from tests.unit.test_policy_purity import FORBIDDEN, imported_roots

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "services", "tooling", "simulator", "loadtest")
CORES = sorted([*ROOT.glob("services/*/core.py"), ROOT / "services/gateway/admission_core.py"])
# the kernels that only the cores compose into decisions
KERNELS = {"shared.policy.scaleup", "shared.policy.reconcile", "shared.policy.prewarm_placement.place",
           "shared.policy.autoscale.decide", "shared.policy.autoscale.LoadWindow",
           "shared.policy.forecast.ModelForecaster"}
DECISION_NAMES = {"choose_group", "choose_worker", "decide", "reconcile", "place", "replan", "autoscale",
                  "scale_decision", "forecast_round", "plan"}
SIM_NEEDS = {"services.prewarm_orchestrator.core", "services.placement.core", "services.forecaster.core",
             "services.gateway.admission_core"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str) -> set[str]:
    """Every absolute import, as ``module`` and ``module.name`` (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


@pytest.mark.parametrize("path", CORES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cores_import_no_io(path):
    bad = imported_roots(path.read_text()) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; a core takes time and I/O results as inputs"


def test_every_control_plane_service_has_a_core():
    assert {p.parent.name for p in CORES} == {"forecaster", "placement", "prewarm_orchestrator", "gateway"}


def test_shared_imports_no_tooling_simulator_loadtest_or_service():
    for name, path in project_modules().items():
        if name.startswith("shared"):
            bad = {i for i in imports(path.read_text()) if i.split(".")[0] in {"tooling", "simulator", "loadtest",
                                                                            "services"}}
            assert not bad, f"{name} imports {sorted(bad)}: shared/ holds contracts, policy, bus, database, telemetry"


def test_services_import_neither_each_other_nor_the_tooling():
    for name, path in project_modules().items():
        if not name.startswith("services."):
            continue
        own = name.split(".")[1]
        for i in imports(path.read_text()):
            parts = i.split(".")
            assert parts[0] not in {"tooling", "simulator", "loadtest"}, f"{name} imports {i}"
            if parts[0] == "services" and len(parts) > 1:
                assert parts[1] == own, f"{name} imports another service: {i}"


def decision_code(source: str) -> tuple[set[str], set[str]]:
    """(kernels imported, decision functions or methods defined) in ``source``."""
    kernels = {i for i in imports(source) if i in KERNELS}
    defined = {n.name for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name in DECISION_NAMES}
    return kernels, defined


def test_the_simulator_runs_the_services_cores_and_decides_nothing_itself():
    sim = {name: path for name, path in project_modules().items() if name.startswith("simulator")}
    assert sim
    used = set()
    for name, path in sim.items():
        source = path.read_text()
        kernels, defined = decision_code(source)
        assert not kernels, f"{name} imports {sorted(kernels)}: compose decisions in a core the services run"
        assert not defined, f"{name} defines {sorted(defined)}: decision code belongs in the services' cores"
        used |= imports(source)
    assert SIM_NEEDS <= used, f"the simulator does not drive {sorted(SIM_NEEDS - used)}"


def test_the_decision_code_check_catches_a_chooser_of_its_own():
    source = "from shared.policy.scaleup import choose_group\nclass S:\n    def replan(self): ...\n"
    assert decision_code(source) == ({"shared.policy.scaleup", "shared.policy.scaleup.choose_group"} & KERNELS,
                                     {"replan"})


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles in ``graph`` (depth-first search; each cycle reported once from where it was found)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles():
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for i in imports(path.read_text()):
            while i and i not in modules:  # ``pkg.mod.Name`` -> ``pkg.mod``
                i = i.rpartition(".")[0]
            if i and i != name and not name.startswith(i + "."):  # a package's own __init__ is not a cycle
                targets.add(i)
        graph[name] = targets
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # the checker finds one
    assert not cycles(graph), f"import cycles: {cycles(graph)}"
