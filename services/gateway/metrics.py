"""Prometheus metrics of the gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("warmserve_requests", "Requests by model, outcome and HTTP status",
                                ["model", "outcome", "status"], registry=self.registry)
        self.ttft = Histogram("warmserve_ttft_seconds", "Time to first token", ["model", "outcome"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("warmserve_tpot_seconds", "Time per output token after the first", ["model"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                              registry=self.registry)
        self.in_flight = Gauge("warmserve_in_flight_requests", "Requests being served", ["model"],
                               registry=self.registry)
        self.queue_depth = Gauge("warmserve_queue_depth", "Requests waiting for an instance", ["model"],
                                 registry=self.registry)
        self.demand_buffered = Gauge("warmserve_demand_samples_buffered", "Demand samples waiting for NATS",
                                     registry=self.registry)
        self.demand_dropped = Counter("warmserve_demand_samples_dropped", "Demand samples dropped because the "
                                      "buffer was full while NATS was away (forecasts undercount that demand)",
                                      registry=self.registry)
