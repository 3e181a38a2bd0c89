"""Prometheus metrics of a GPU worker (on ``WARMSERVE_METRICS_PORT``). What the worker holds is read from its
heartbeat state at scrape time, so the figures are the ones placement and ``warmserve top`` see; commands are
timed as they run."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.messages import CopyState, WorkerState
from shared.metrics import REGISTRY

COMMAND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)

COMMAND_SECONDS = Histogram(
    "warmserve:worker_command_seconds", "Lifecycle commands by kind (prewarm: a load; activate; evict; deactivate; "
    "set_kv_target) and result (ok, or the error code), from receipt to answer",
    ["worker", "kind", "result"], buckets=COMMAND_BUCKETS, registry=REGISTRY)
ENGINE_ERRORS = Counter(
    "warmserve:worker_engine_errors", "Commands the engine failed, by kind and error code (alert on a rising rate: "
    "the log names the model and why)", ["worker", "kind", "code"], registry=REGISTRY)


class WorkerStateCollector(Collector):
    """Memory by role, copies by state and requests in flight of each worker in this process, from its state."""

    def __init__(self) -> None:
        self.states: dict[str, Callable[[], WorkerState]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        memory = GaugeMetricFamily("warmserve:worker_memory_bytes", "Device memory by role: weights (copies "
                                   "and memory an engine failed to release), kv_cache (active instances), free",
                                   labels=["worker", "device", "role"])
        budget = GaugeMetricFamily("warmserve:worker_memory_budget_bytes", "Device memory the worker may use",
                                   labels=["worker", "device"])
        copies = GaugeMetricFamily("warmserve:worker_copies", "Model copies by state (an active copy is an "
                                   "instance serving requests)", labels=["worker", "state"])
        copy_info = GaugeMetricFamily("warmserve:worker_copy_info", "1 for each model copy, by model and state",
                                      labels=["worker", "model", "state"])
        running = GaugeMetricFamily("warmserve:worker_requests_running", "Requests the worker is generating",
                                    labels=["worker"])
        for state in (read() for read in list(self.states.values())):
            w, dev = state.worker_id, state.device
            for role, n in (("weights", state.weight_bytes), ("kv_cache", state.kv_bytes), ("free", state.free_bytes)):
                memory.add_metric([w, dev, role], n)
            budget.add_metric([w, dev], state.memory_budget_bytes)
            for s in CopyState:
                if s is not CopyState.ABSENT:
                    copies.add_metric([w, s.value], sum(c.state is s for c in state.copies))
            for c in state.copies:
                copy_info.add_metric([w, c.model, c.state.value], 1)
            running.add_metric([w], state.in_flight)
        yield from (memory, budget, copies, copy_info, running)


STATE = WorkerStateCollector()
REGISTRY.register(STATE)
