"""Settings from the environment: one ``WARMSERVE_`` prefix, validated at start, failing fast.

Each service reads its own class; every field has a default that works for the local cluster.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.policy.keepalive import IdleCopyPolicy
from shared.subjects import check_token


def idle_copy_policy_field():
    """One definition for the workers' and the orchestrator's setting, which must agree."""
    return Field("evict", description="prewarmed copies the placement plan does not list: evict (at once; the plan "
                 "is the only reason to hold weights) or keep-lru (kept while memory allows, least recently used "
                 "evicted first when a load, a KV cache or a planned copy needs room: the load test's keep-alive "
                 "baseline). Set the same on the orchestrator and the workers")

S = TypeVar("S", bound="CommonSettings")


class NatsSettings(BaseSettings):
    """How to reach NATS. ``shared.bus.connect`` reads the TLS part itself, so services, the CLI and
    ``warmserve up`` all agree without each passing it on."""

    model_config = SettingsConfigDict(env_prefix="WARMSERVE_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated: a client "
                          "connects to one and fails over to the others (list every server of a cluster)")
    nats_replicas: int = Field(1, ge=1, le=5, description="copies of every JetStream stream and KV bucket a service "
                               "creates: 1 on one server, 3 in a cluster of 3 or more (a stream then survives one "
                               "server's loss). Applies when a stream or bucket is created or, for streams, updated")
    nats_tls_ca: FilePath | None = Field(
        None, description="CA certificate (PEM) that signed the NATS server's certificate. Set, or a tls:// URL: "
                          "the client starts TLS before anything else and never falls back to plain text")
    nats_tls_cert: FilePath | None = Field(None, description="client certificate (PEM), for a NATS server that "
                                                              "verifies clients; needs WARMSERVE_NATS_TLS_KEY")
    nats_tls_key: FilePath | None = Field(None, description="private key (PEM) of WARMSERVE_NATS_TLS_CERT")

    @model_validator(mode="after")
    def _client_pair(self):
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("WARMSERVE_NATS_TLS_CERT and WARMSERVE_NATS_TLS_KEY go together: set both or neither")
        return self


class CommonSettings(NatsSettings):
    """Settings every process shares."""

    model_config = SettingsConfigDict(env_prefix="WARMSERVE_", extra="ignore")

    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP traces endpoint, e.g. http://jaeger:4318")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="how often workers publish their state")
    heartbeat_timeout_s: float = Field(5.0, gt=0, description="a worker silent this long is gone")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return v


class DatabaseSettings(CommonSettings):
    """For the processes that use Postgres (placement, orchestrator, forecaster, the CLI, ``warmserve up``):
    the gateway and the workers have no database URL at all, so none can leak from them."""

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/warmserve",
        description="Postgres URL (postgresql://...; psycopg 3 is used whatever the scheme says). Each service "
                    "connects as its own role (docs/operations.md, Security); migrations as the tables' owner",
    )


class MetricsSettings(CommonSettings):
    """The services without an HTTP server of their own (placement, orchestrator, forecaster, workers) serve
    their Prometheus metrics on a port of their own (one per process: two processes on one host need two)."""

    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics (and /healthz, /readyz) of "
                              "this process on this port; 0: none. One port per process: `warmserve up` gives each "
                              "service and worker its own. The gateway serves its /metrics on its HTTP port")
    metrics_host: str = Field("127.0.0.1", description="listen address of WARMSERVE_METRICS_PORT (0.0.0.0 in containers)")


class ControlPlaneSettings(DatabaseSettings, MetricsSettings):
    """Placement, the orchestrator and the forecaster: a database, metrics on a port, a leader lease."""

    leader_lease_s: float = Field(5.0, ge=1, le=120, description="run several replicas of a control-plane service "
                                  "and one leads: it renews a lease in NATS KV every third of this; a standby takes "
                                  "over once the lease has gone unrenewed this long (docs/deploy.md, High "
                                  "availability). Shorter: faster failover, more false ones under load")
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname().lower()}-{os.getpid()}"[:64],
                            description="names this replica in the leader lease (default: <hostname>-<pid>)")


class GatewaySettings(CommonSettings):
    host: str = Field("127.0.0.1", description="listen address (0.0.0.0 in containers)")
    port: int = Field(8080, ge=1, le=65535, description="listen port")
    gateway_id: str = Field(default_factory=lambda: f"gw-{socket.gethostname()}".lower()[:60],
                            description="names this gateway in demand samples (default: gw-<hostname>)")
    first_token_timeout_s: float = Field(60.0, gt=0, description="wait for a worker's first chunk")
    inter_token_timeout_s: float = Field(30.0, gt=0, description="longest silence between chunks")
    demand_interval_s: float = Field(1.0, gt=0, description="how often arrivals are published")
    demand_buffer_samples: int = Field(36_000, ge=0, description="demand samples (one per model and interval) kept "
                                       "while NATS is away and published once it is back; beyond this the oldest "
                                       "are dropped (warmserve:demand_samples_dropped_total) and forecasts "
                                       "undercount that demand")
    queue_wait_s: float = Field(60.0, gt=0, description="longest a request waits for an instance "
                                                        "(a cold start included) before a 503")
    queue_size: int = Field(256, ge=0, description="requests that may wait per model; more get a 503")
    require_api_key: bool = Field(True, description="check 'Authorization: Bearer <key>' against the API keys")
    rate_limit_rps: float = Field(50.0, gt=0, description="requests per second per API key, unless the key "
                                                         "has its own limit; bursts of twice that pass (more: 429)")
    key_max_concurrency: int = Field(64, ge=1, description="requests in flight per API key, unless the key has "
                                                           "its own limit; more get a 429 until one finishes")
    gateways: int = Field(1, ge=1, le=1024, description="gateways behind one load balancer that spreads requests "
                          "evenly: each enforces 1/N of every key's rate limit and of its concurrency limit (rounded "
                          "up, at least 1), so a key's limits hold across them (docs/deploy.md, Gateways). Set the "
                          "same on every gateway; 1: this gateway alone enforces the whole limit")
    max_body_bytes: int = Field(1024**2 - 8 * 1024, ge=1024,
                                description="largest request body, chunked bodies included; larger ones get a 413 "
                                            "before any parsing. At most NATS's max_payload less 8 KiB for what the "
                                            "gateway adds on the way to a worker: a larger value is lowered to "
                                            "that, with a warning at start")
    max_messages: int = Field(256, ge=1, description="most messages in one chat request (more: 400)")
    shutdown_grace_s: float = Field(10.0, ge=1, description="on SIGTERM the gateway stops being ready and gives "
                                                          "requests in flight this long; what is still running "
                                                          "1 s before the end gets a 503 or an error event "
                                                          "(gateway_shutdown)")
    keep_alive_s: float = Field(75.0, gt=0, description="how long an idle client connection stays open. "
                                "Longer than the idle timeout of clients' connection pools (5 s in httpx and "
                                "the openai client) and of load balancers in front (often 60 s), so the client "
                                "side always closes first: a server that closes first races a request sent "
                                "on the connection just then, which the client sees as a reset")
    max_prompt_chars: int = Field(512 * 1024, ge=1, description="most characters in a request's prompt or "
                                                               "messages together (more: 400); the worker then "
                                                               "checks tokens against the model's context")
    gateway_processes: int = Field(1, ge=0, le=64, description="serving processes on this host, sharing the port "
                                   "(SO_REUSEPORT, Linux) and each API key's rate and concurrency limits (a "
                                   "shared-memory table); 0: one per CPU core. 1 suits a small host where workers "
                                   "and NATS share the cores; more where the gateway has cores of its own "
                                   "(docs/operations.md, Performance)")
    access_log: bool = Field(False, description="a log line per HTTP request (uvicorn's access log); off by "
                                                "default, a formatted line and a write for every request: counts "
                                                "and latencies are in /metrics, each request in its trace")
    max_chars_per_token: int = Field(128, ge=1, description="the most characters one token of any served model's "
                                                           "tokenizer covers: a prompt longer than this many times "
                                                           "the context left after max_tokens cannot fit and gets a "
                                                           "400 (context_length_exceeded) without reaching a worker")
    recent_requests: int = Field(1000, ge=0, le=100_000, description="requests whose spans this gateway process "
                                 "keeps in memory, newest first, for `warmserve request ID` (at most 64 spans "
                                 "each; the oldest request is forgotten first); 0: none kept. Kept whether or "
                                 "not WARMSERVE_OTLP_ENDPOINT exports traces")


class WorkerSettings(MetricsSettings):
    worker_id: str = Field("worker-0", description="unique per worker; used in subjects")
    node: str = Field(default_factory=lambda: socket.gethostname().lower(), description="node name (default: hostname)")
    device: str = Field("cpu:0", description="cuda:<index> on a GPU node, cpu:<n> on a CPU machine")
    engine: str = Field("sim", pattern="^(sim|vllm)$",
                        description="engine adapter: vllm (real inference) or sim (modelled timings, no compute)")
    memory_budget_bytes: int = Field(
        4 * 1024**3, gt=0, description="device memory the worker may use (a GPU's is read by pynvml)"
    )
    batch_capacity: int = Field(32, gt=0, description="requests one instance serves at once (B); "
                                                   "gateways send an instance no more than this, and a vLLM "
                                                   "engine batches as many (max_num_seqs)")
    chunk_interval_s: float = Field(0.0, ge=0, description="0: every engine step is its own chunk and SSE "
                                    "event, as vLLM's server streams (clients measure inter-token latency "
                                    "right). Above 0: steps produced faster than this are merged into one "
                                    "(fewer messages; the first token never waits)")
    kv_cache_bytes: int = Field(1024**3, gt=0, description="KV cache an active instance reserves; "
                                                          "the rest of the budget stays prewarm capacity")
    sim_profile: Literal["fast", "a100"] = Field(
        "fast", description="sim engine timings: fast (a small model, for tests and demos) or a100 (7B-70B fp16 "
                            "on an A100 over PCIe, the simulator's constants: 5 s engine start, 60 ms per 1k-token prefill)")
    sim_engine_start_s: float | None = Field(
        None, ge=0, description="sim engine: seconds each model load takes before its weights move (engine start), "
                                "instead of the profile's; long loads let fault tests kill a worker mid-activation")
    idle_copy_policy: IdleCopyPolicy = idle_copy_policy_field()

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, v: str) -> str:
        return check_token(v, "worker_id")


class ForecasterSettings(ControlPlaneSettings):
    window_s: float = Field(300.0, gt=0, description="forecast window (docs/design.md, 'Forecasting': 300 s)")
    horizon_windows: int = Field(3, ge=1, le=288, description="windows forecast at each window boundary")
    upper_quantile: float = Field(0.97, gt=0, lt=1, description="quantile of each window's load the upper band covers "
                                  "(docs/forecasting.md, 'The upper band')")
    min_history_windows: int = Field(12, ge=1, description="history needed before models are fitted (fewer: recent level)")
    score_windows: int = Field(48, ge=2, description="rolling-backtest windows used to select each model's method")
    startup_backtest_windows: int = Field(12, ge=0, description="windows of stored history backtested at start, so selection survives a restart")
    forecast_methods: str = Field("naive,seasonal-naive,paper,autoets,mstl",
                                  description="candidate methods, comma-separated (see docs/forecasting.md)")
    close_grace_s: float = Field(2.0, ge=0, description="demand samples for a window are accepted this long after it ends")
    retry_interval_s: float = Field(10.0, gt=0, description="pending history writes are retried (and new models get a first forecast) this often")
    outage_grace_s: float = Field(10.0, ge=0, description="after the forecaster was cut off from NATS, no window "
                                  "closes until this long after it is back: gateways publish the demand samples "
                                  "they kept meanwhile, and they are counted in their windows")


class PlacementSettings(ControlPlaneSettings):
    replan_interval_s: float = Field(5.0, gt=0, description="replan at least this often (and on every change)")
    catalog_sync_interval_s: float = Field(10.0, gt=0, description="Postgres catalog -> KV resync period")
    batch_capacity: int = Field(32, ge=1, description="B: concurrent requests one instance serves (docs/design.md, 'Placement')")
    h2d_gbps: float = Field(25.0, gt=0, description="host-to-device GB/s used to score load time (PCIe Gen4 x16)")
    placement_strategy: Literal["evict-aware", "round-robin"] = Field(
        "evict-aware", description="evict-aware (docs/design.md, 'Placement') or the paper's round-robin ablation")
    evict: bool = Field(True, description="evict lower-scored prewarmed copies when that raises the total score")
    kv_reservation: bool = Field(True, description="count KV memory running instances can give back as prewarm capacity")
    idle_first: bool = Field(True, description="place each model's copies on idle workers first, and only then in KV that "
                             "serving instances lend (a copy on a serving worker cannot become an instance until it stops)")
    prewarm: bool = Field(True, description="forecast-driven prewarming; false: only operator pins are prewarmed, "
                          "so scaling is reactive and a new instance loads from scratch (the load test's baseline)")
    forecast_freed_first: bool = Field(False, description="with idle_first, workers whose instances the forecast "
                                       "says will scale down within the next window count as idle (copies go where "
                                       "an activation will soon be possible); off: it bought nothing measurable and "
                                       "its choice of worker moves as loads change, so a pinned copy can be planned twice")
    copy_start_s: float = Field(20.0, ge=0, description="engine start of a copy being loaded: with its weights' load "
                                "time, picks the forecast windows a copy planned now must cover")
    copy_load_gbps: float = Field(2.0, gt=0, description="GB/s from storage to host memory for a copy's weights")


class OrchestratorSettings(ControlPlaneSettings):
    reconcile_interval_s: float = Field(0.5, gt=0, description="about every 0.5 s (docs/design.md, 'Prewarming and scaling')")
    command_timeout_s: float = Field(120.0, gt=0, description="longest a prewarm/activate may take")
    min_active_per_model: int = Field(0, ge=0, description="instances kept active per model however idle (0: scale to zero, the next request is a prewarm hit)")
    autoscale_window_s: float = Field(5.0, gt=0, description="load = mean concurrency over this window")
    scale_up_threshold: float = Field(0.8, gt=0, le=1, description="scale up above this share of capacity")
    scale_down_threshold: float = Field(0.5, ge=0, lt=1, description="scale down below this share of capacity")
    min_instance_lifetime_s: float = Field(5.0, ge=0, description="an instance younger than this is never stopped")
    batch_capacity: int = Field(32, ge=1, description="B: concurrent requests one instance serves")
    kv_reservation: bool = Field(True, description="push KV free-block targets (total x in_flight / B) to active instances")
    forecast_scale_down: bool = Field(True, description="never scale below the instances a model's forecast average for "
                                      "the next window keeps at least half full (false: purely reactive scale-down)")
    handover: bool = Field(True, description="a queued model with no free worker may take the worker of another model's "
                           "lightly used instance, drained first (docs/placement.md, 'Handover')")
    handover_margin: float = Field(2.0, ge=1, description="a handover that costs the giving model capacity it needs "
                                   "requires the queued model's demand to be this many times the giver's")
    shared_tier: bool = Field(True, description="a quiet model with no free worker may serve next to another model's "
                              "instance on the same worker, and is promoted to a worker of its own when its load "
                              "rises (docs/placement.md, 'Shared tier')")
    shared_quiet: float = Field(0.25, gt=0, le=1, description="quiet enough to share a worker: load and forecast peak "
                                "at most this share of B")
    shared_max_instances: int = Field(4, ge=2, description="instances one worker serves at once under the shared tier")
    idle_copy_policy: IdleCopyPolicy = idle_copy_policy_field()

    @model_validator(mode="after")
    def _band(self):
        if self.scale_down_threshold >= self.scale_up_threshold:
            raise ValueError("WARMSERVE_SCALE_DOWN_THRESHOLD must be below WARMSERVE_SCALE_UP_THRESHOLD")
        return self


class LocalClusterSettings(DatabaseSettings):
    """Settings of ``warmserve up``: what it starts itself and where it keeps state.

    An explicitly set ``WARMSERVE_NATS_URL`` or ``WARMSERVE_DATABASE_URL`` means "use that server";
    otherwise an embedded nats-server and Postgres are started.
    """

    state_dir: Path = Field(Path(".warmserve"), description="project-local folder for NATS, Postgres, models")
    nats_port: int = Field(4322, ge=0, le=65535, description="port of the embedded nats-server (0: any free)")
    gateway_port: int = Field(8080, ge=1, le=65535, description="HTTP port of the local gateway")
    workers: int = Field(1, ge=1, le=64, description="local workers (one emulated device each; dozens only with the sim engine)")
    engine: str = Field("auto", pattern="^(auto|sim|vllm)$",
                        description="engine of the local workers; auto: vllm when installed, else sim")
    worker_memory_budget_bytes: int = Field(6 * 1024**3, gt=0, description="memory budget of each local worker")
    metrics_port: int = Field(0, ge=0, le=65000, description="/metrics of placement on this port, the "
                              "orchestrator on the next, the forecaster, then each worker; 0: free ports. Either "
                              "way they are listed in the state folder's cluster.json and prometheus-targets.json. "
                              "The gateway serves its own on WARMSERVE_GATEWAY_PORT")


    @property
    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "sim"

    @property
    def external_nats(self) -> bool:
        return "nats_url" in self.model_fields_set

    @property
    def external_database(self) -> bool:
        return "database_url" in self.model_fields_set


class CliSettings(BaseSettings):
    """What the ``warmserve`` command line reads beyond where the cluster is (``WARMSERVE_OPERATOR_NATS_URL``,
    ``WARMSERVE_NATS_URL``, ``WARMSERVE_GATEWAY_URL`` or the local cluster's cluster.json)."""

    model_config = SettingsConfigDict(env_prefix="WARMSERVE_", extra="ignore")

    traces_url: str | None = Field(None, description="base URL of a Jaeger query API (e.g. http://127.0.0.1:16686, "
                                   "the compose stack's Jaeger with the tracing profile): `warmserve request ID` "
                                   "then shows the request's whole trace across services, and finds requests the "
                                   "gateways no longer keep; unset: the gateways' own spans of their recent requests")


class MigrateSettings(DatabaseSettings):
    """``warmserve migrate``: the owner's URL, and the passwords of the services' login users to create
    (or to change); a service whose password is unset keeps the login it has, or gets none."""

    db_placement_password: SecretStr | None = Field(None, description="password of placement's database user "
                                                    "(<database>_placement_login)")
    db_orchestrator_password: SecretStr | None = Field(None, description="password of the orchestrator's database "
                                                       "user (<database>_orchestrator_login)")
    db_forecaster_password: SecretStr | None = Field(None, description="password of the forecaster's database user "
                                                     "(<database>_forecaster_login)")

    def db_passwords(self) -> dict[str, str]:
        """Service -> password, for those given."""
        out = {"placement": self.db_placement_password, "orchestrator": self.db_orchestrator_password,
               "forecaster": self.db_forecaster_password}
        return {k: v.get_secret_value() for k, v in out.items() if v is not None}

    @field_validator("db_placement_password", "db_orchestrator_password", "db_forecaster_password")
    @classmethod
    def _not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            raise ValueError("must not be empty (leave it unset to create no login)")
        return v


def load_settings(cls: type[S], **overrides) -> S:
    """Build settings or exit with a message that names each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = [f"invalid configuration for {cls.__name__}:"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if field:
                lines.append(f"  WARMSERVE_{field.upper()}: {err['msg']} (got {err.get('input')!r})")
            else:  # a rule across several settings: the message names them
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
