"""Every message that crosses the bus, in one module.

Rules: messages change only by adding fields with defaults (readers ignore fields they do not
know), units are in field names (``_s``, ``_ms``, ``_bytes``), and nothing here does I/O.
"""

from __future__ import annotations

import enum
import math
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T", bound="BusMessage")


def new_id() -> str:
    return uuid.uuid4().hex


class BusMessage(BaseModel):
    """Base for bus messages: JSON on the wire, unknown fields ignored for forward compatibility."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls: type[T], data: bytes | str) -> T:
        return cls.model_validate_json(data)


class ErrorInfo(BusMessage):
    """A failure with a machine-readable code and a sentence for humans."""

    code: str
    message: str


# ---------------------------------------------------------------- catalog


class ModelStatus(str, enum.Enum):
    ACTIVE = "active"  # servable and placeable
    DISABLED = "disabled"  # kept in the catalog, not placed or served


class ModelSpec(BusMessage):
    """What the data plane needs to know about a catalog model."""

    slug: str
    path: str
    parameter_bytes: int
    tensor_parallel_size: int = 1
    max_context_tokens: int = 2048
    status: ModelStatus = ModelStatus.ACTIVE
    tool_parser: str | None = None  # vLLM's tool-call parser for tool_choice "auto" (e.g. "hermes"); None: no auto


class ApiKeyRecord(BusMessage):
    """What a gateway needs to check a key (the KV bucket is keyed by the key's SHA-256)."""

    id: str
    name: str
    disabled: bool = False
    rate_limit_rps: float | None = None
    max_concurrency: int | None = None  # requests in flight at once; None: the gateway's default


# ---------------------------------------------------------------- inference


class FunctionCall(BusMessage):
    name: str
    arguments: str = ""  # JSON text, as the OpenAI API sends it


class ToolCall(BusMessage):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BusMessage):
    """One chat message as the model's chat template receives it. Content parts are joined by the gateway
    (text parts with newlines, as vLLM does for templates that take a string); ``None`` content is an
    assistant turn that only called tools."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StructuredOutput(BusMessage):
    """A constraint on the answer's form, passed to vLLM's structured outputs (exactly one is set)."""

    json_schema: dict[str, Any] | None = None  # response_format json_schema, or vLLM's structured_outputs.json
    json_object: bool | None = None  # response_format json_object: any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingParams(BusMessage):
    """vLLM's sampling parameters as the OpenAI server sets them; defaults change nothing."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0  # 0: all tokens
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # top logprobs per generated token (0: only the chosen token's); None: none
    structured: StructuredOutput | None = None
    fill_context: bool = False  # chat without max_tokens: generate up to the context's end, as vLLM does
    # (max_tokens is then only the cap of a worker that does not read this field)


class Tools(BusMessage):
    """Tools offered to a chat model: the function definitions go to the chat template; ``choice`` is
    "none", "auto" (the catalog's tool parser reads calls out of the text), "required" or a function's name
    (both: the answer is constrained to calls of the given functions)."""

    definitions: list[dict[str, Any]]  # [{"type": "function", "function": {...}}], as the client sent them
    choice: str = "auto"
    named: bool = False  # ``choice`` is a function's name
    parser: str | None = None  # the catalog's tool parser as the gateway sees it now (an instance's spec is
    # the one it was activated with, so an operator's `model update --tool-parser` reaches running instances
    # this way); None: the instance's own


class InferRequest(BusMessage):
    """One generation request routed to a worker; the reply inbox receives InferChunk messages.

    A completions request sends ``prompt`` (one text), or ``prompts`` (several texts or token-id lists:
    one choice group per prompt, choice index = prompt index x n + i, as vLLM numbers them)."""

    request_id: str = Field(default_factory=new_id)
    model: str
    instance_id: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompts: list[str | list[int]] | None = None
    echo: bool = False  # completions: the answer starts with its prompt; chat: ignored (the gateway has it)
    tools: Tools | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    usage_every_chunk: bool = False  # stream_options.continuous_usage_stats: counts on every chunk


class Usage(BusMessage):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def finite_logprob(value: float) -> float:
    """A logprob JSON can carry: -inf (and NaN) become -9999.0, as vLLM's server reports them."""
    return max(value, -9999.0) if math.isfinite(value) else -9999.0


class TopLogprob(BusMessage):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BusMessage):
    """One generated token with its log-probability and the ``top`` alternatives asked for."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TopLogprob] = Field(default_factory=list)


class ToolCallDelta(BusMessage):
    """A tool call, or in a stream a piece of one (``index`` says which: later pieces add to ``arguments``)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ChoiceDelta(BusMessage):
    """What one choice produced in one engine step (one SSE event at the gateway)."""

    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it, as vLLM reports


class InferChunk(BusMessage):
    """A piece of a streamed answer. The last chunk has ``finish_reason`` (or ``error``) set.

    The plain case (one choice, no logprobs, no tools) uses ``text`` alone, the smallest message. Otherwise
    ``deltas`` holds each choice's output of each step, in order, and ``text``/``finish_reason`` are left
    empty except that the last chunk's ``finish_reason`` marks the end of the whole stream."""

    request_id: str
    seq: int
    text: str = ""
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    deltas: list[ChoiceDelta] = Field(default_factory=list)
    prompt_texts: list[str] | None = None  # echo: each prompt's (detokenised) text, on the first chunk

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def choice_deltas(self) -> list[ChoiceDelta]:
        """Every choice's deltas, the plain case included (there a chunk is one step, even one whose token made
        no text yet)."""
        if self.deltas:
            return self.deltas
        if self.error is None and (self.text or self.finish_reason or self.prompt_texts is None):
            return [ChoiceDelta(text=self.text, finish_reason=self.finish_reason)]
        return []


# ---------------------------------------------------------------- workers


class CopyState(str, enum.Enum):
    """Lifecycle of one model copy on a worker (docs/design.md, "Model states")."""

    LOADING = "loading"
    PREWARMED = "prewarmed"
    ACTIVE = "active"
    DRAINING = "draining"
    ABSENT = "absent"


class ModelCopy(BusMessage):
    model: str
    state: CopyState
    weight_bytes: int  # pages accounted to this copy's weights (at least its measured resident bytes)
    instance_id: str | None = None
    in_flight: int = 0
    since_s: float = 0.0
    resident_bytes: int = 0  # measured by the engine (process RSS on CPU, device memory on a GPU)
    kv_bytes: int = 0
    kv_total_blocks: int = 0
    kv_used_blocks: int = 0
    kv_target_free_blocks: int | None = None
    made: Outcome | None = None  # an active instance: cold (loaded for it) or prewarm_hit (from a prewarmed copy)
    shared: bool = False  # an active instance started next to another model's (the shared tier), for operators


class GpuStats(BusMessage):
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_pct: int


class WorkerState(BusMessage):
    """A worker's current state, rewritten in the workers KV bucket every heartbeat."""

    worker_id: str
    node: str
    device: str
    engine: str
    memory_budget_bytes: int
    weight_bytes: int = 0
    kv_bytes: int = 0
    batch_capacity: int = 32
    copies: list[ModelCopy] = Field(default_factory=list)
    gpu: GpuStats | None = None
    heartbeat_at_s: float = 0.0
    started_at_s: float = 0.0
    reclaimable_bytes: int = 0  # KV held beyond the active instance's target: prewarm capacity to be had
    kv_cache_bytes: int = 0  # KV cache an activation here needs beyond the weights (0: allocated at load)
    in_flight: int = 0

    @property
    def free_bytes(self) -> int:
        return max(self.memory_budget_bytes - self.weight_bytes - self.kv_bytes, 0)

    def copy_of(self, model: str) -> ModelCopy | None:
        return next((c for c in self.copies if c.model == model), None)


class CommandKind(str, enum.Enum):
    PREWARM = "prewarm"
    EVICT = "evict"
    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"
    SET_KV_TARGET = "set_kv_target"


class WorkerCommand(BusMessage):
    """A lifecycle command; repeating a command_id returns the first result (idempotent)."""

    command_id: str = Field(default_factory=new_id)
    kind: CommandKind
    model: str
    spec: ModelSpec | None = None  # required by prewarm/activate, so the worker needs no database
    reason: str = ""
    instance_id: str | None = None  # deactivate: the instance meant (a stale id is refused)
    drain: bool = True  # deactivate: let in-flight requests finish (False aborts them)
    replace_active: bool = False  # activate: drain the worker's current instance first instead of refusing
    share: bool = False  # activate: serve next to the worker's current instance (the shared tier)
    kv_free_blocks: int | None = Field(None, ge=0)  # set_kv_target: free KV blocks to keep
    epoch: int | None = Field(None, ge=0)  # the orchestrator leader's term: a worker refuses one below the
    # highest it has seen (a deposed leader); None: unfenced (the operator, a single orchestrator's tests)


FENCED = "fenced"  # a command's error code: it carried an orchestrator term older than one the worker has seen


class CommandResult(BusMessage):
    command_id: str
    ok: bool
    instance_id: str | None = None
    kv_bytes: int | None = None
    error: ErrorInfo | None = None
    seconds: float = 0.0


class WorkerEvent(BusMessage):
    """A copy's transition, with what it cost (docs/design.md, "Model states": measured, never assumed)."""

    event_id: str = Field(default_factory=new_id)
    worker_id: str
    model: str
    from_state: CopyState
    to_state: CopyState
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    at_s: float


class Outcome(str, enum.Enum):
    """How a request found its instance (docs/design.md, "Requests")."""

    WARM = "warm"  # an instance was active
    PREWARM_HIT = "prewarm_hit"  # an instance was made from a prewarmed copy
    COLD = "cold"  # the weights had to be loaded


class ScaleRequest(BusMessage):
    """A gateway asks for another instance of a model (none exists, or all are at capacity)."""

    model: str
    reason: Literal["no_instance", "at_capacity"] = "no_instance"
    waiting: int = 1


class ScaleReply(BusMessage):
    ok: bool
    outcome: Outcome | None = None
    worker_id: str | None = None
    instance_id: str | None = None
    seconds: float = 0.0
    error: ErrorInfo | None = None


class CancelRequest(BusMessage):
    """The client of ``request_id`` went away: stop generating for it."""

    request_id: str


class Ping(BusMessage):
    """Is this worker process still there, and does it have request ``request_id``? Asked by a gateway whose
    stream went quiet while the worker's heartbeat looks stale (a lagging heartbeat path is not a dead
    worker), or that has been quiet for a while (a request or its last chunk lost with a NATS server)."""

    request_id: str | None = None


class Pong(BusMessage):
    """A worker's answer to ``Ping``: which process answered (``started_at_s`` is its incarnation) and, when
    asked about a request, whether it is serving it (False: it never got it, or finished it)."""

    worker_id: str
    started_at_s: float
    serving: bool | None = None


# ---------------------------------------------------------------- demand, forecasts, placement


class DemandSample(BusMessage):
    """One gateway's view of one model over one interval (published about once a second)."""

    gateway_id: str
    model: str
    start_s: float
    interval_s: float
    arrivals: int
    completions: int
    concurrency_avg: float
    concurrency_peak: int


class ForecastPoint(BusMessage):
    """Predicted concurrency of one future window (point and upper quantile)."""

    window_start_s: float
    avg: float
    avg_upper: float
    peak: float
    peak_upper: float


class Forecast(BusMessage):
    """A model's forecast made at a window boundary. The ``predicted_*`` fields are the next window
    (``points[0]``); ``points`` holds every window of the horizon. ``method`` is the peak series'
    method, ``note`` says why (or that history is too short and the recent level is used)."""

    model: str
    window_start_s: float
    window_s: float
    predicted_avg: float
    predicted_peak: float
    predicted_peak_upper: float
    predicted_avg_upper: float = 0.0
    method: str
    method_avg: str = ""
    note: str = ""
    history_windows: int = 0
    made_at_s: float
    points: list[ForecastPoint] = Field(default_factory=list)


class OperatorHold(BusMessage):
    """An operator's standing instruction, kept in the operator KV bucket: a drained worker takes no new
    work and gives up its copies; a pinned model keeps ``copies`` prewarmed copies whatever the forecast."""

    kind: Literal["drain", "pin"]
    target: str  # worker id (drain) or model slug (pin)
    copies: int = Field(1, ge=1, le=64)
    reason: str = ""
    at_s: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.target}"


class PlannedCopy(BusMessage):
    model: str
    worker_id: str  # the device of a one-device copy; the first of a group's
    devices: list[str] = Field(default_factory=list)  # a multi-device (TP) copy's whole group; empty: worker_id

    @property
    def group(self) -> tuple[str, ...]:
        return tuple(self.devices) or (self.worker_id,)


class LeaderLease(BusMessage):
    """The lease of one control-plane role (key = role, shared/leader.py): who leads and since which epoch.
    ``epoch`` 0: just acquired, the epoch is the entry's revision (written into the value at the first renewal)."""

    holder: str
    epoch: int = Field(0, ge=0)
    at_s: float = 0.0  # the holder's clock when it wrote this: for people reading it, never for decisions


class PlacementPlan(BusMessage):
    plan_id: str = Field(default_factory=new_id)
    created_at_s: float
    epoch: int | None = Field(None, ge=0)  # the placement leader's term (None: unfenced, a single placement)
    copies: list[PlannedCopy] = Field(default_factory=list)
    inputs: dict[str, Any] = Field(default_factory=dict)

    def same_copies(self, other: PlacementPlan | None) -> bool:
        return other is not None and sorted(self.copies, key=_copy_key) == sorted(other.copies, key=_copy_key)


def _copy_key(c: PlannedCopy) -> tuple[str, str, list[str]]:
    return (c.model, c.worker_id, c.devices)


# ---------------------------------------------------------------- admin


class AdminRequest(BusMessage):
    """An operator command; ``args`` depend on the verb (see ``docs/architecture.md``)."""

    args: dict[str, Any] = Field(default_factory=dict)


class AdminReply(BusMessage):
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


# ---------------------------------------------------------------- dead letters


class DeadLetter(BusMessage):
    """A message a durable consumer gave up on (shared/deadletter.py), kept with why for an operator.

    ``payload`` is the original message as it was stored (UTF-8 text; base64 when ``payload_base64``, for
    bytes that are not text), so it can be read, fixed and published again on ``subject``. A payload too
    large to fit in a dead letter under NATS's max_payload is cut (``payload_truncated``; its size was
    ``payload_bytes``): then only its start is kept, and the original is still in its stream until it ages out."""

    service: str  # the NATS user whose consumer gave up
    consumer: str  # the durable consumer
    stream: str
    subject: str
    stream_seq: int
    delivered: int  # deliveries, the failed one included
    error: ErrorInfo  # code: malformed | unstorable | retries_exhausted; message: the exception
    failed_at_s: float
    payload: str
    payload_base64: bool = False
    payload_truncated: bool = False
    payload_bytes: int | None = None  # the original payload's size
