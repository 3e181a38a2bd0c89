"""WarmServe's Grafana dashboards, built in code: ``python -m tooling.dashboards`` writes them as JSON under
infra/grafana/dashboards/ (provisioned by the compose stack's Grafana; import them into any Grafana with a
Prometheus data source whose uid is ``prometheus``). A test keeps the JSON equal to what this builds, checks
that each query names metrics the services export, and evaluates every query against a real Prometheus
scraping a local cluster.

Queries use Grafana's ``$__rate_interval`` and the ``$model`` / ``$worker`` variables; anything that would
return no series until something happens (an error, a miss) is written to read 0 instead, so a healthy
cluster shows zeros, not "No data"."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "infra" / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    width: int = 12


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    variables: list[tuple[str, str]] = field(default_factory=list)  # (name, label_values(...) query)


def _ttft(quantile: float, selector: str = "") -> str:
    return (f"histogram_quantile({quantile}, sum by (le, outcome) "
            f"(rate(warmserve:time_to_first_token_seconds_bucket{selector}[{RATE}])))")


def _hit_ratio(by: str, selector: str = "") -> str:
    """Prewarm hits over the requests that needed an instance made (hits and cold loads); 0 while none did."""
    inner = selector[1:-1] + "," if selector else ""
    return (f'sum by ({by}) (increase(warmserve:requests_total{{{inner}outcome="prewarm_hit"}}[{RATE}])) / '
            f'clamp_min(sum by ({by}) (increase(warmserve:requests_total{{{inner}outcome=~"prewarm_hit|cold"}}'
            f'[{RATE}])), 1)')


def _or_zero(expr: str) -> str:
    """``expr``, or a single 0 while it has no series (no error has happened yet)."""
    return f"({expr}) or vector(0)"


M = '{model=~"$model"}'
W = '{worker=~"$worker"}'

CLUSTER = Dashboard(
    uid="warmserve-cluster", title="WarmServe: cluster",
    description="Is prewarming working? Time to first token by how each request found its instance, the prewarm-hit "
                "ratio, requests and errors, and what the control plane decided.",
    panels=[
        Panel("Time to first token by outcome (p50, p99)",
              ((_ttft(0.5), "p50 {{outcome}}"), (_ttft(0.99), "p99 {{outcome}}")), unit="s",
              description="warm: an instance was active; prewarm_hit: one was made from a prewarmed copy; cold: the "
                          "weights were loaded. Cold p99 far above prewarm_hit p99 is what prewarming saves."),
        Panel("Prewarm-hit ratio", ((_hit_ratio("model"), "{{model}}"),), unit="percentunit",
              description="Of the requests that needed an instance made, the share found prewarmed. Low and "
                          "falling: cold starts (docs/operations.md, 'Cold starts')."),
        Panel("Requests per second by model and outcome",
              (("sum by (model, outcome) (rate(warmserve:requests_total[$__rate_interval]))", "{{model}} {{outcome}}"),),
              unit="reqps"),
        Panel("Errors per second by model and status",
              ((_or_zero('sum by (model, status) (rate(warmserve:requests_total{status!="200"}[$__rate_interval]))'),
                "{{model}} {{status}}"),),
              unit="reqps"),
        Panel("Requests running and waiting",
              (("sum by (model) (warmserve:num_requests_running)", "running {{model}}"),
               ("sum by (model) (warmserve:num_requests_waiting)", "waiting {{model}}"))),
        Panel("Queue wait p99 by outcome",
              (("histogram_quantile(0.99, sum by (le, outcome) (rate(warmserve:queue_wait_seconds_bucket"
                "[$__rate_interval])))", "{{outcome}}"),), unit="s",
              description="Admission to route: a scale-up and a load are inside it."),
        Panel("Autoscaler decisions", (("sum by (decision, outcome) (increase(warmserve:autoscaler_decisions_total"
                                        "[$__rate_interval]))", "{{decision}} {{outcome}}"),)),
        Panel("Worker commands by kind and result",
              (("sum by (kind, result) (rate(warmserve:orchestrator_commands_total[$__rate_interval]))",
                "{{kind}} {{result}}"),), unit="ops"),
        Panel("Copies planned by model", (("sum by (model) (warmserve:placement_copies_planned)", "{{model}}"),)),
        Panel("Control-plane rounds (p99)",
              (("histogram_quantile(0.99, sum by (le) (rate(warmserve:placement_round_seconds_bucket"
                "[$__rate_interval])))", "placement"),
               ("histogram_quantile(0.99, sum by (le) (rate(warmserve:forecast_round_seconds_bucket[$__rate_interval])))",
                "forecast")), unit="s"),
        Panel("Leaders", (("sum by (role) (warmserve:leader)", "{{role}}"),),
              description="1 per role; 0 for a role means nobody leads it (a standby takes over after the lease)."),
        Panel("Dead letters", ((_or_zero("sum by (service) (increase(warmserve:dead_letters_total[$__rate_interval]))"),
                                "{{service}}"),),
              description="Any above 0: history that could not be stored (docs/operations.md)."),
    ])

MODEL = Dashboard(
    uid="warmserve-model", title="WarmServe: per model",
    description="One model: the forecast against what came, the band placement provisions for, its instances and "
                "copies over time, and its cold starts.",
    variables=[("model", "label_values(warmserve:forecast_load, model)")],
    panels=[
        Panel("Peak load: forecast, upper band, observed",
              (('warmserve:forecast_load{model=~"$model",series="peak",bound="point"}', "forecast {{model}}"),
               ('warmserve:forecast_load{model=~"$model",series="peak",bound="upper"}', "upper {{model}}"),
               ('warmserve:observed_load{model=~"$model",series="peak"}', "observed {{model}}")),
              description="Requests in flight at the window's peak. The forecast is for the next window, the "
                          "observed for the last closed one: shift by one window to compare."),
        Panel("Band coverage (share of windows within 20% of the upper)",
              ((f'1 - sum by (model, series) (increase(warmserve:forecast_misses_total{M}[1h])) / '
                f'clamp_min(sum by (model, series) (increase(warmserve:forecast_windows_total{M}[1h])), 1)',
                "{{model}} {{series}}"),), unit="percentunit"),
        Panel("Headroom of the last window", ((f"warmserve:forecast_headroom_ratio{M}", "{{model}} {{series}}"),),
              unit="percentunit", description="(upper - load) / load: what the band held beyond what came."),
        Panel("Copies and instances by state",
              ((f"sum by (model, state) (warmserve:worker_copy_info{M})", "{{model}} {{state}}"),),
              description="active: instances serving; prewarmed: weights held for a burst; loading."),
        Panel("Copies planned", ((f"sum by (model) (warmserve:placement_copies_planned{M})", "{{model}}"),)),
        Panel("Instances made, by outcome",
              (('sum by (model, outcome) (increase(warmserve:autoscaler_decisions_total{model=~"$model",'
                'decision=~"scale_up|handover"}[$__rate_interval]))', "{{model}} {{outcome}}"),),
              description="cold: loaded from storage, the slow start prewarming exists to avoid."),
        Panel("Cold starts and prewarm hits (requests)",
              (('sum by (model, outcome) (increase(warmserve:requests_total{model=~"$model",'
                'outcome=~"cold|prewarm_hit"}[$__rate_interval]))', "{{model}} {{outcome}}"),)),
        Panel("Time to first token p99 by outcome", ((_ttft(0.99, M), "{{outcome}}"),), unit="s"),
        Panel("Requests running and waiting",
              ((f"sum by (model) (warmserve:num_requests_running{M})", "running"),
               (f"sum by (model) (warmserve:num_requests_waiting{M})", "waiting"))),
    ])

WORKER = Dashboard(
    uid="warmserve-worker", title="WarmServe: per worker",
    description="One worker (one device): memory by role over time, its copies, activations and their durations.",
    variables=[("worker", "label_values(warmserve:worker_memory_bytes, worker)")],
    panels=[
        Panel("Memory by role", ((f"sum by (worker, role) (warmserve:worker_memory_bytes{W})", "{{worker}} {{role}}"),
                                 (f"sum by (worker) (warmserve:worker_memory_budget_bytes{W})", "{{worker}} budget")),
              unit="bytes", description="weights: prewarmed and active copies; kv_cache: active instances' KV."),
        Panel("Copies by state", ((f"sum by (worker, state) (warmserve:worker_copies{W})", "{{worker}} {{state}}"),)),
        Panel("Commands per second by kind",
              ((f"sum by (worker, kind, result) (rate(warmserve:worker_command_seconds_count{W}[$__rate_interval]))",
                "{{worker}} {{kind}} {{result}}"),), unit="ops",
              description="activate: instances made; prewarm: loads; evict: copies dropped."),
        Panel("Command duration p90 by kind",
              ((f"histogram_quantile(0.9, sum by (le, worker, kind) (rate(warmserve:worker_command_seconds_bucket{W}"
                f"[$__rate_interval])))", "{{worker}} {{kind}}"),), unit="s"),
        Panel("Requests running", ((f"sum by (worker) (warmserve:worker_requests_running{W})", "{{worker}}"),)),
        Panel("Engine errors", ((_or_zero(f"sum by (worker, kind, code) (increase(warmserve:worker_engine_errors_total"
                                          f"{W}[$__rate_interval]))"), "{{worker}} {{kind}} {{code}}"),)),
    ])

DASHBOARDS = (CLUSTER, MODEL, WORKER)


def to_json(d: Dashboard) -> dict:
    """The dashboard in Grafana's JSON model (schema 39), panels two to a row."""
    panels = []
    for i, p in enumerate(d.panels):
        panels.append({
            "id": i + 1, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": p.width, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"refId": chr(ord("A") + k), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for k, (expr, legend) in enumerate(p.queries)],
        })
    templating = [{"name": name, "label": name, "type": "query", "datasource": DATASOURCE,
                   "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
                   "multi": True, "current": {"text": "All", "value": "$__all"}, "allValue": ".*", "sort": 1}
                  for name, query in d.variables]
    return {"uid": d.uid, "title": d.title, "description": d.description, "tags": ["warmserve"],
            "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "templating": {"list": templating}, "panels": panels}


def render(d: Dashboard) -> str:
    return json.dumps(to_json(d), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    for d in DASHBOARDS:
        (out / f"{d.uid}.json").write_text(render(d))
        print(f"wrote {out / f'{d.uid}.json'} ({len(d.panels)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
