"""The one table of NATS subjects, streams and KV buckets, and who may use each.

Every subject a service publishes or subscribes to is declared here with its message type, durability,
publishers and subscribers (NATS users), and every KV bucket with its writers and readers, so the contract
between services is readable in one place. The NATS permissions of each user are generated from this table
(``tooling/localcluster/nats_auth.py`` renders them for ``warmserve up`` and ``infra/nats/nats.conf``).
Identifiers come last in a subject and are catalog slugs or worker ids (``[a-z0-9-]``): a ``.`` would split
a token.
"""

from __future__ import annotations

import enum
import functools
import re
import string
from dataclasses import dataclass

from shared import messages as m

# \Z, not $: "$" also matches before a final newline, so re.match accepted "tiny\n"
SLUG_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?\Z")

# NATS users: one per service, and the operator (the CLI, ``warmserve up``, tests), who may do anything
GATEWAY, FORECASTER, PLACEMENT, ORCHESTRATOR, WORKER, OPERATOR = (
    "gateway", "forecaster", "placement", "orchestrator", "worker", "operator")
SERVICE_USERS = {  # the package under services/ -> the user its process connects as
    "gateway": GATEWAY, "forecaster": FORECASTER, "placement": PLACEMENT, "prewarm_orchestrator": ORCHESTRATOR,
    "gpu_worker": WORKER,
}
USERS = (GATEWAY, FORECASTER, PLACEMENT, ORCHESTRATOR, WORKER, OPERATOR)  # WORKER: a role, one user per worker
WORKER_USER_PREFIX = "worker-"


def worker_user(worker_id: str) -> str:
    """The NATS user of one worker (``worker-<id>``): each worker has its own, allowed only its own subjects,
    its own key in the workers bucket, and replies into inboxes addressed to it (``responder_worker``)."""
    return WORKER_USER_PREFIX + check_token(worker_id, "worker id")


class Durability(str, enum.Enum):
    """How a subject's messages travel."""

    CORE = "core"  # core NATS: request-reply or fire-and-forget, lost if nobody listens
    STREAM = "jetstream"  # persisted in a JetStream stream, survives restarts


def check_token(value: str, what: str = "identifier") -> str:
    """Reject identifiers that would break subject tokenisation (``.``, ``*``, ``>``, spaces)."""
    if not isinstance(value, str) or not SLUG_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS delivers ``subject`` to a subscription on ``pattern`` (``*`` one token, ``>`` the rest)."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


@dataclass(frozen=True)
class Subject:
    """A subject pattern such as ``warmserve.infer.{worker}``, the message it carries and who uses it.

    ``publishers`` send on it (requests, events); ``subscribers`` receive it on core NATS and, for a
    request, reply into the publishers' inboxes; ``readers`` read its stream with ordered consumers;
    ``durables`` are (user, consumer name) pairs that read its stream with a durable consumer. The operator
    may use every subject and is listed only where a service replies to it."""

    pattern: str
    message: type
    durability: Durability
    doc: str
    reply: type | None = None
    publishers: tuple[str, ...] = ()
    subscribers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    durables: tuple[tuple[str, str], ...] = ()

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.pattern) if f)

    def format(self, **tokens: str) -> str:
        """The concrete subject, with every identifier validated."""
        missing = set(self.tokens) - set(tokens)
        if missing:
            raise ValueError(f"{self.pattern}: missing {sorted(missing)}")
        return self.pattern.format(**{k: check_token(v, k) for k, v in tokens.items()})

    @property
    def wildcard(self) -> str:
        """The pattern with each identifier replaced by ``*`` (for subscriptions and streams)."""
        return self.pattern.format(**{t: "*" for t in self.tokens})


INFER = Subject(
    "warmserve.infer.{worker}", m.InferRequest, Durability.CORE,
    "Inference on a worker; replies are a stream of InferChunk on the request's reply inbox.",
    reply=m.InferChunk, publishers=(GATEWAY, OPERATOR), subscribers=(WORKER,),
)
WORKER_CMD = Subject(
    "warmserve.worker.{worker}.cmd", m.WorkerCommand, Durability.CORE,
    "Lifecycle command to one worker (prewarm, evict, activate, deactivate); idempotent by command_id.",
    reply=m.CommandResult, publishers=(ORCHESTRATOR, OPERATOR), subscribers=(WORKER,),
)
CANCEL = Subject(
    "warmserve.cancel.{worker}", m.CancelRequest, Durability.CORE,
    "The client of a request went away; the worker aborts its generation.",
    publishers=(GATEWAY,), subscribers=(WORKER,),
)
PING = Subject(
    "warmserve.ping.{worker}", m.Ping, Durability.CORE,
    "Is the worker process there? Answered at once with its incarnation; NATS's no-responders status "
    "says it is gone (its connection closed). Asked only when a stream is silent and the heartbeat stale.",
    reply=m.Pong, publishers=(GATEWAY, OPERATOR), subscribers=(WORKER,),
)
SCALE = Subject(
    "warmserve.scale.{model}", m.ScaleRequest, Durability.CORE,
    "A gateway needs an instance of a model; the orchestrator activates one and replies how.",
    reply=m.ScaleReply, publishers=(GATEWAY,), subscribers=(ORCHESTRATOR,),
)
WORKER_EVENT = Subject(
    "warmserve.event.worker.{worker}", m.WorkerEvent, Durability.STREAM,
    "A model copy changed state on a worker (bytes, seconds, reason); persisted as history.",
    publishers=(WORKER,), durables=((ORCHESTRATOR, "orchestrator-events"),),
)
DEMAND = Subject(
    "warmserve.demand.{model}", m.DemandSample, Durability.STREAM,
    "Per-model arrivals and concurrency, aggregated per second by each gateway.",
    publishers=(GATEWAY,), readers=(ORCHESTRATOR,), durables=((FORECASTER, "forecaster"),),
)
FORECAST = Subject(
    "warmserve.forecast.{model}", m.Forecast, Durability.STREAM,
    "Predicted average and peak concurrency of a model for the next window.",
    publishers=(FORECASTER,), readers=(PLACEMENT, ORCHESTRATOR),
)
PLACEMENT_PLAN = Subject(
    "warmserve.placement.plan", m.PlacementPlan, Durability.STREAM,
    "A new desired set of prewarmed copies (also kept current in the placement KV bucket).",
    publishers=(PLACEMENT,), durables=((PLACEMENT, "placement-history"),),
)
ADMIN = Subject(
    "warmserve.admin.{verb}", m.AdminRequest, Durability.CORE,
    "Operator commands (models, workers, placement history, API keys); request-reply.",
    reply=m.AdminReply, publishers=(OPERATOR,), subscribers=(PLACEMENT,),
)

FORECAST_ADMIN = Subject(
    "warmserve.admin.forecast.{verb}", m.AdminRequest, Durability.CORE,
    "Operator commands answered by the forecaster (status, reload); request-reply. Not matched by "
    "warmserve.admin.* (one token deeper), so placement's verbs and these never collide.",
    reply=m.AdminReply, publishers=(OPERATOR,), subscribers=(FORECASTER,),
)

GATEWAY_ADMIN = Subject(
    "warmserve.admin.gateway.{verb}", m.AdminRequest, Durability.CORE,
    "Operator questions every gateway process answers (no queue group: the asker gathers the answers), such as "
    "one recent request's spans from the gateway's bounded buffer (`warmserve request ID`); request-reply.",
    reply=m.AdminReply, publishers=(OPERATOR,), subscribers=(GATEWAY,),
)

DEAD_LETTER = Subject(
    "warmserve.deadletter.{service}", m.DeadLetter, Durability.STREAM,
    "A message a service's durable consumer gave up on (data it can never store, or failing past its delivery "
    "limit), with the error; for an operator to read (`warmserve deadletters`) and publish again once fixed.",
    publishers=(FORECASTER, PLACEMENT, ORCHESTRATOR), readers=(OPERATOR,),
)

SUBJECTS: tuple[Subject, ...] = (
    INFER, CANCEL, PING, SCALE, WORKER_CMD, WORKER_EVENT, DEMAND, FORECAST, PLACEMENT_PLAN, ADMIN, FORECAST_ADMIN,
    GATEWAY_ADMIN, DEAD_LETTER,
)


@functools.lru_cache(maxsize=4096)  # asked on every request to a worker; few distinct subjects
def responder_worker(subject: str) -> str | None:
    """The worker that answers a request on the concrete ``subject`` (its inference or command subject), or
    None. Requesters address their reply inbox to it (``shared.bus.reply_inbox``): a worker may publish only
    into inboxes addressed to it, so it cannot answer, or forge chunks of, another worker's requests."""
    for s in SUBJECTS:
        if s.reply is not None and WORKER in s.subscribers and "worker" in s.tokens \
                and subject_matches(s.wildcard, subject):
            return check_token(subject.split(".")[s.pattern.split(".").index("{worker}")], "worker id")
    return None


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream holding the durable subjects."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    doc: str


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("WARMSERVE_DEMAND", (DEMAND.wildcard,), 8 * 24 * 3600, "arrivals for the forecaster"),
    StreamSpec("WARMSERVE_FORECAST", (FORECAST.wildcard, PLACEMENT_PLAN.pattern), 24 * 3600,
               "forecasts and placement plans"),
    StreamSpec("WARMSERVE_EVENTS", (WORKER_EVENT.wildcard,), 7 * 24 * 3600, "worker lifecycle events"),
    StreamSpec("WARMSERVE_DEADLETTER", (DEAD_LETTER.wildcard,), 30 * 24 * 3600,
               "messages durable consumers gave up on, with the error"),
)


@dataclass(frozen=True)
class BucketSpec:
    """A KV bucket holding current state (latest value per key), who writes it and who mirrors it."""

    name: str
    value: type
    ttl_s: float | None
    doc: str
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    keyed_by_worker: bool = False  # key = worker id: each worker may write its own key only
    keyed_by_writer: bool = False  # key = the writer's user: each service may write its own key only


WORKERS_BUCKET = BucketSpec(
    "warmserve-workers", m.WorkerState, 60.0,
    "key = worker id; the worker's state, rewritten every heartbeat. Stale after heartbeat_timeout_s.",
    writers=(WORKER,), readers=(GATEWAY, PLACEMENT, ORCHESTRATOR), keyed_by_worker=True,
)
CATALOG_BUCKET = BucketSpec(
    "warmserve-catalog", m.ModelSpec, None,
    "key = model slug; the catalog as the data plane sees it (Postgres is the system of record).",
    writers=(PLACEMENT,), readers=(GATEWAY, FORECASTER, PLACEMENT, ORCHESTRATOR),
)
PLACEMENT_BUCKET = BucketSpec(
    "warmserve-placement", m.PlacementPlan, None,
    "key = 'current'; the desired prewarmed copies.",
    writers=(PLACEMENT,), readers=(PLACEMENT, ORCHESTRATOR),
)
APIKEYS_BUCKET = BucketSpec(
    "warmserve-apikeys", m.ApiKeyRecord, None,
    "key = SHA-256 of an API key; its name, whether it is disabled, its rate limit (Postgres is the record).",
    writers=(PLACEMENT,), readers=(GATEWAY, PLACEMENT),
)
OPERATOR_BUCKET = BucketSpec(
    "warmserve-operator", m.OperatorHold, None,
    "key = 'drain.<worker>' or 'pin.<model>'; operators' standing instructions (worker drain, prewarm pin).",
    writers=(PLACEMENT,), readers=(PLACEMENT, ORCHESTRATOR),
)

LEASES_BUCKET = BucketSpec(
    "warmserve-leases", m.LeaderLease, None,
    "key = control-plane role (placement, orchestrator, forecaster); its leader and epoch (shared/leader.py).",
    writers=(PLACEMENT, ORCHESTRATOR, FORECASTER), readers=(PLACEMENT, ORCHESTRATOR, FORECASTER),
    keyed_by_writer=True,
)

BUCKETS: tuple[BucketSpec, ...] = (WORKERS_BUCKET, CATALOG_BUCKET, PLACEMENT_BUCKET, APIKEYS_BUCKET, OPERATOR_BUCKET,
                                   LEASES_BUCKET)
PLACEMENT_KEY = "current"
