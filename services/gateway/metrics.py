"""Prometheus metrics of the gateway, named in vLLM's style (``warmserve:`` prefix, the unit in the name) so
an operator who knows vLLM's dashboards reads these the same way (docs/operations.md, "Metrics")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("warmserve:requests", "Requests by model, outcome (warm, prewarm_hit, cold; none: "
                                "never routed) and HTTP status; the prewarm-hit ratio is prewarm_hit over "
                                "prewarm_hit + cold", ["model", "outcome", "status"], registry=self.registry)
        self.ttft = Histogram("warmserve:time_to_first_token_seconds", "Time to first token, by how the request "
                              "found its instance", ["model", "outcome"], buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("warmserve:time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                              registry=self.registry)
        self.queue_wait = Histogram("warmserve:queue_wait_seconds", "Time a request waited for an instance "
                                    "(admission to route: a scale-up or a load is inside it)", ["model", "outcome"],
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("warmserve:num_requests_running", "Requests being served (routed or waiting)",
                               ["model"], registry=self.registry)
        self.queue_depth = Gauge("warmserve:num_requests_waiting", "Requests waiting for an instance", ["model"],
                                 registry=self.registry)
        self.demand_buffered = Gauge("warmserve:demand_samples_buffered", "Demand samples waiting for NATS",
                                     registry=self.registry)
        self.demand_dropped = Counter("warmserve:demand_samples_dropped", "Demand samples dropped because the "
                                      "buffer was full while NATS was away (forecasts undercount that demand)",
                                      registry=self.registry)
