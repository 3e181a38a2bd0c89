"""OpenAI API request bodies the gateway accepts: the surface of vLLM's OpenAI server (docs/api.md).

As vLLM's server does, a parameter it does not know is ignored (the handler logs its name, never its value).
A parameter vLLM knows but a worker here cannot honour is refused by name (400), never silently dropped.
Static bounds live here (they are part of the OpenAPI schema); the limits an operator sets (messages, prompt
characters) and the model's context are checked by ``limits``. Each request turns itself into the bus's
``InferRequest`` (``infer``); nothing here does I/O.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, WithJsonSchema, model_validator,
)

from shared.messages import ChatMessage, FunctionCall, InferRequest, SamplingParams, StructuredOutput, ToolCall, Tools

MAX_TOKENS_CAP = 32768  # no model served here generates more in one request
MAX_STOP_SEQUENCES = 4  # vLLM's VLLM_MAX_STOP_STRINGS
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per prompt (vLLM allows 16384: one request here holds one slot however many it asks for)
MAX_PROMPTS = 64  # prompts in one completions request (vLLM: 1024)
MAX_CHOICES = 128  # prompts x n
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
LOGIT_BIAS_BOUND = 100.0  # vLLM clamps biases to [-100, 100]
# Lists vLLM bounds only by the body size. Each entry costs the engine work on every step (a bias, a stop id,
# an alternative of a grammar) or the template and tokenizer work on every request (a tool), so a 1 MiB body
# of them would slow every request in the batch: bounded here (docs/api.md, "Differences from vLLM").
MAX_LIST_ITEMS = 1024  # logit_bias entries, stop_token_ids, structured choice alternatives
MAX_TOOLS = 128
CHAT_FALLBACK_MAX_TOKENS = 256  # chat without max_tokens: the cap a worker that cannot fill the context uses
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) completions default
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy decoding
INT64 = 2**63
TOKEN_ID_LIMIT = 2**31  # token ids are vocabulary indices
# vLLM 0.32 removed these (its server ignores them with a warning: the output is not constrained)
REMOVED_GUIDED_FIELDS = frozenset({"guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                   "guided_decoding_backend", "guided_whitespace_pattern"})


def tools_chars(tools) -> int:
    """Characters the tools' definitions add to a chat prompt (their JSON, as the template gets them)."""
    return sum(len(json.dumps(t.as_sent())) for t in tools or ())


class ParamError(ValueError):
    """A validation error about a parameter at ``path`` below where the validator runs (a model validator runs
    at the request's root, a field's at the field): the 400 names the whole path (``messages.0.content.1``).
    ``code`` is the error's code in the answer."""

    def __init__(self, message: str, *path: str | int, code: str = "invalid_request"):
        super().__init__(message)
        self.path = tuple(str(p) for p in path)
        self.code = code


def _encodable(v: str) -> str:
    """JSON may escape lone UTF-16 surrogates (``"\\ud800"``); they are not text and cannot be sent on."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired UTF-16 surrogate (not valid Unicode text)") from None
    return v


def _quoted(value: object, limit: int = 40) -> str:
    """A client's value quoted in an error message, cut short (a type name may be anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _encodable_json(v: Any) -> Any:
    """A free-form JSON value (a tool's parameters, a schema) holds no lone surrogates either: walked without
    recursion, since its depth is the client's."""
    pending = [v]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _encodable(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return v


Text = Annotated[str, AfterValidator(_encodable)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_encodable_json)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]


class _Model(BaseModel):
    """A nested object of a request: fields it does not define are ignored, as vLLM's server does."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ---------------------------------------------------------------- chat messages

TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
              "thinking": "thinking"}  # part type -> the field holding its text (vLLM's TEXT_PART_TYPES)
MEDIA_PARTS = ("image_url", "input_image", "image_pil", "image_embeds", "audio_url", "input_audio", "audio_embeds",
               "video_url", "video_embeds", "prompt_embeds", "file")


def _join_parts(v: Any) -> Any:
    """A message's content as the text its chat template receives: text parts joined with newlines, as vLLM
    does for templates that take a string. Media parts are refused: the models served here are text-only."""
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError("must be a string, an array of content parts, or null")
    texts = []
    for i, part in enumerate(v):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ParamError("a content part must be an object with a 'type'", i)
        kind = part.get("type")
        if kind is None:  # vLLM infers a media part's type from its key
            kind = next((k for k in MEDIA_PARTS if k in part), None)
            if kind is None:
                raise ParamError("a content part needs a 'type'", i, "type")
        if not isinstance(kind, str):
            raise ParamError("a content part's 'type' must be a string", i, "type")
        if kind in TEXT_PARTS:
            text = part.get(TEXT_PARTS[kind])
            if text is None:  # vLLM skips a text part without text
                continue
            if not isinstance(text, str):
                raise ParamError(f"a '{kind}' part's '{TEXT_PARTS[kind]}' must be a string", i, TEXT_PARTS[kind])
            texts.append(text)
        elif kind in MEDIA_PARTS:
            raise ParamError(f"'{kind}' content parts are not supported: the models served here take text only",
                             i, code="unsupported_content")
        else:
            raise ParamError(f"unknown content part type {_quoted(kind)}; text parts are 'text', 'input_text', "
                             "'output_text', 'refusal' and 'thinking'", i, "type")
    return "\n".join(texts)


def _encodable_or_none(v: str | None) -> str | None:
    return None if v is None else _encodable(v)


_PART_SCHEMA = {"anyOf": [
    {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
     "required": ["type", "text"]},
    {"type": "object", "properties": {"type": {"type": "string"}}, "required": ["type"]},
]}
Content = Annotated[
    str | None, BeforeValidator(_join_parts), AfterValidator(_encodable_or_none),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _PART_SCHEMA}, {"type": "null"}]}),
]


class FunctionCallIn(_Model):
    name: Text
    arguments: Text = ""


class ToolCallIn(_Model):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(_Model):
    """A chat message as the API accepts it: content as a string or content parts, an assistant turn's
    ``tool_calls`` (its content may then be null), a tool result's ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None

    def bus(self) -> ChatMessage:
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
                 for c in self.tool_calls] if self.tool_calls else None
        content = self.content if self.content is not None or calls else ""  # null: only an assistant's calls
        return ChatMessage(role=self.role, content=content, name=self.name, tool_calls=calls,
                           tool_call_id=self.tool_call_id)


# ---------------------------------------------------------------- tools, structured outputs, stream options


class FunctionDefinition(_Model):
    name: Text = Field(min_length=1, max_length=256)
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class ToolDefinition(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def as_sent(self) -> dict[str, Any]:
        """The definition for the chat template, as the client sent it (fields it left out stay out)."""
        return {"type": "function", "function": self.function.model_dump(exclude_unset=True)}


class NamedFunction(_Model):
    name: Text = Field(min_length=1)


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Model):
    name: Text
    description: Text | None = None
    schema_: JsonObject | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Model):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: JsonObject | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1, max_length=MAX_LIST_ITEMS)
    grammar: Text | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Text | None = None
    structural_tag: Text | None = None

    def constraints(self) -> dict[str, Any]:
        """The constraints set, keyed by StructuredOutput's field names."""
        out = {"json_schema": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
               "json_object": self.json_object}
        return {k: v for k, v in out.items() if v is not None}


class StreamOptions(_Model):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


def _not_set(v: Any) -> bool:
    return v is None or v is False or v == [] or v == {}


# What vLLM's server accepts but a worker here cannot honour: (parameter, "left as vLLM's default", why).
# Each is refused by name when set, rather than dropped without a word.
_REFUSED_BOTH: list[tuple[str, Any, str]] = [
    ("use_beam_search", _not_set, "beam search is not served here"),
    ("watermarking", _not_set, "watermarking is not served here"),
    ("prompt_logprobs", lambda v: v is None, "prompt logprobs are not returned here"),
    ("logprob_token_ids", _not_set, "logprobs of chosen token ids are not returned here; use logprobs"),
    ("allowed_token_ids", lambda v: v is None, "allowed_token_ids is not passed to the model servers here"),
    ("bad_words", _not_set, "bad_words is not passed to the model servers here"),
    ("truncate_prompt_tokens", lambda v: v is None, "prompts are not truncated here; shorten the prompt"),
    ("priority", lambda v: v == 0, "requests are served first come, first served here"),
    ("cache_salt", lambda v: v is None, "the prefix cache cannot be salted per request here"),
    ("kv_transfer_params", _not_set, "disaggregated serving is not available here"),
    ("ec_transfer_params", _not_set, "disaggregated serving is not available here"),
    ("vllm_xargs", _not_set, "custom engine extensions are not available here"),
    ("repetition_detection", lambda v: v is None, "repetition detection is not passed to the model servers here"),
    ("return_tokens_as_token_ids", _not_set, "token ids are not returned here"),
    ("return_token_ids", _not_set, "token ids are not returned here"),
    ("thinking_token_budget", lambda v: v is None or v == -1, "thinking budgets are not passed to the model "
                                                              "servers here"),
]


class _Request(_Model):
    """What both endpoints take. Fields not defined here are ignored (``ignored_fields`` names them)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    _structured: StructuredOutput | None = PrivateAttr(None)  # set when the request is validated

    model: Text = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: Finite | None = Field(None, ge=0.0, le=2.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, max_length=256)
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Finite] | None = Field(None, max_length=MAX_LIST_ITEMS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's sampling extensions
    top_k: int | None = Field(None, ge=-1, lt=INT64)
    min_p: Finite | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Finite | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_CAP)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # accepted and ignored, as vLLM's server ignores them here (docs/api.md)
    length_penalty: float | None = 1.0  # beam search only
    truncation_side: Literal["left", "right"] | None = None  # with truncate_prompt_tokens only
    request_id: Any = None
    session_id: Any = None
    stream_interval: Any = None
    return_token_offsets: Any = None
    mm_payload: Any = None
    return_mm_kwargs: Any = None
    routed_experts_prompt_start: Any = None
    # accepted by vLLM, refused here when set (_REFUSED_BOTH)
    use_beam_search: bool = False
    watermarking: bool | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    thinking_token_budget: int | None = None

    REFUSED: ClassVar[tuple[tuple[str, Any, str], ...]] = ()  # an endpoint's own refusals

    @model_validator(mode="after")
    def _check(self):
        self._check_request()
        return self

    def _check_request(self) -> None:
        """Refusals and relations between parameters, in the order vLLM checks them."""
        for name, unset, why in _REFUSED_BOTH + list(self.REFUSED):
            if not unset(getattr(self, name)):
                raise ParamError(f"{name} is not supported: {why}", name, code="unsupported_parameter")
        stops = self.stop_list
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ParamError(f"at most {MAX_STOP_SEQUENCES} stop sequences", "stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ParamError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters", "stop")
        if self.stream_options is not None and not self.stream and (
                self.stream_options.model_fields_set or self.stream_options.model_extra):
            raise ParamError("stream_options can only be set when stream is true", "stream_options")
        for key in self.logit_bias or {}:
            try:
                token = int(key)
            except ValueError:
                raise ParamError(f"keys must be token ids (integers as strings), not {_quoted(key)}",
                                 "logit_bias") from None
            if not 0 <= token < TOKEN_ID_LIMIT:
                raise ParamError(f"token id {token} is not a vocabulary index", "logit_bias")
        limit = self.max_tokens_value
        if limit is not None and self.min_tokens > limit[1]:
            raise ParamError(f"min_tokens ({self.min_tokens}) must be at most {limit[0]} ({limit[1]})", "min_tokens")
        if (self.n or 1) > 1 and self.temperature is not None and self.temperature < GREEDY_BELOW:
            raise ParamError("n must be 1 when using greedy sampling (temperature 0)", "n")
        self._structured = self._build_structured()  # checked once here, used by infer and the tool checks

    # ------------------------------------------------------------ derived values

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def max_tokens_value(self) -> tuple[str, int] | None:
        """The parameter that sets the answer's length and the length, by the caller or by default."""
        return ("max_tokens", self.max_tokens) if self.max_tokens is not None else None

    @property
    def requested_max_tokens(self) -> tuple[str, int] | None:
        """The parameter that sets the answer's length and its value, if the caller set one."""
        return ("max_tokens", self.max_tokens) if self.max_tokens is not None else None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """stream_options.continuous_usage_stats counts only with include_usage, as in vLLM."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def ignored_fields(self) -> list[str]:
        """The parameters sent that nothing here defines (ignored, as vLLM's server ignores them)."""
        return sorted(self.model_extra or {})

    def prompt_chars(self) -> int:
        """Characters of prompt text (checked against WARMSERVE_MAX_PROMPT_CHARS); each request type counts
        its own (chat: every message's content; completions: the prompts' text)."""
        raise NotImplementedError

    def _build_structured(self) -> StructuredOutput | None:
        """The constraint on the answer: response_format overrides structured_outputs' same kind, as in vLLM."""
        constraints, where = {}, "structured_outputs"
        so = self.structured_outputs
        if so is not None:
            for name in ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
                         "structural_tag"):
                if not _not_set(getattr(so, name)):
                    raise ParamError(f"structured_outputs.{name} is not passed to the model servers here",
                                     "structured_outputs", name, code="unsupported_parameter")
            constraints = so.constraints()
            if not constraints:
                raise ParamError("structured_outputs needs one of json, regex, choice, grammar or json_object",
                                 "structured_outputs")
            if isinstance(constraints.get("json_schema"), str):
                try:
                    schema = json.loads(constraints["json_schema"])
                except ValueError:
                    raise ParamError("is not valid JSON", "structured_outputs", "json") from None
                if not isinstance(schema, dict):
                    raise ParamError("must be a JSON schema object", "structured_outputs", "json")
                constraints["json_schema"] = schema
        rf = self.response_format
        if rf is not None and rf.type == "structural_tag":
            raise ParamError("structural_tag response formats are not passed to the model servers here",
                             "response_format", "type", code="unsupported_parameter")
        if rf is not None and rf.type == "json_object":
            constraints, where = {**constraints, "json_object": True}, "response_format"
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ParamError("response_format type 'json_schema' needs the 'json_schema' field",
                                 "response_format", "json_schema")
            if rf.json_schema.schema_ is None:
                raise ParamError("needs the JSON schema the answer must follow", "response_format", "json_schema",
                                 "schema")
            constraints, where = {**constraints, "json_schema": rf.json_schema.schema_}, "response_format"
        if len(constraints) > 1:
            raise ParamError("only one kind of constraint can be used: json, regex, choice, grammar or json_object",
                             where)
        return StructuredOutput(**constraints) if constraints else None

    def _sampling(self, max_tokens: int, logprobs: int | None, **extra) -> SamplingParams:
        bias = None
        if self.logit_bias:
            bias = {int(k): min(LOGIT_BIAS_BOUND, max(-LOGIT_BIAS_BOUND, v)) for k, v in self.logit_bias.items()}
        values = dict(
            max_tokens=max_tokens, stop=self.stop_list, seed=self.seed, n=self.n or 1,
            temperature=self.temperature, top_p=self.top_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            top_k=0 if self.top_k == -1 else self.top_k, min_p=self.min_p,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stop_token_ids=list(self.stop_token_ids or []),
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=bias, logprobs=logprobs,
            structured=self._structured, **extra)
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})  # None: vLLM's default


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(0, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    echo: bool = False  # the answer starts with the last message's content when it is the assistant's
    include_reasoning: bool = True  # no reasoning parser here: nothing to include or leave out
    media_io_kwargs: Any = None  # multimodal only
    mm_processor_kwargs: Any = None  # multimodal only
    # accepted by vLLM, refused here when set
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    REFUSED = (
        ("add_generation_prompt", lambda v: v is True, "the chat template always gets the generation prompt here"),
        ("continue_final_message", _not_set, "the chat template cannot continue the last message here"),
        ("add_special_tokens", _not_set, "the chat template's own special tokens are used here"),
        ("documents", lambda v: v is None, "documents are not passed to the chat template here"),
        ("chat_template", lambda v: v is None, "the model's own chat template is used here"),
        ("chat_template_kwargs", _not_set, "the chat template takes no arguments here"),
        ("reasoning_effort", lambda v: v is None, "reasoning effort is not passed to the chat template here"),
    )

    def _check_request(self) -> None:
        super()._check_request()
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.tools == []:
            raise ParamError("tools must not be an empty array: send at least one tool or leave tools out", "tools")
        choice = self.tool_choice_value
        if choice != "none" and not self.tools:
            raise ParamError("tool_choice needs tools", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise ParamError(f"the function {_quoted(choice.function.name)} is not among the tools", "tool_choice")
        if (choice == "required" or isinstance(choice, NamedToolChoice)) and self._structured is not None:
            raise ParamError("structured output and a required tool call cannot be combined",
                             "response_format" if self.response_format else "structured_outputs")

    @property
    def max_tokens_value(self) -> tuple[str, int] | None:
        return self.requested_max_tokens

    @property
    def requested_max_tokens(self) -> tuple[str, int] | None:
        if self.max_completion_tokens is not None:  # vLLM: max_completion_tokens wins over max_tokens
            return "max_completion_tokens", self.max_completion_tokens
        return super().requested_max_tokens

    @property
    def tool_choice_value(self) -> str | NamedToolChoice:
        """tool_choice as vLLM reads it: "auto" when tools are sent without one, else "none"."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    @property
    def echo_text(self) -> str:
        """What echo puts before each answer: the last message's content when it is the assistant's (the role
        answering), as vLLM does."""
        last = self.messages[-1]
        return (last.content or "") if self.echo and last.role == "assistant" else ""

    @property
    def choices(self) -> int:
        return self.n or 1

    def prompt_chars(self) -> int:
        """Every message's content and the tools' definitions: the chat template renders both into the prompt."""
        return sum(len(m.content or "") for m in self.messages) + tools_chars(self.tools)

    def bus_tools(self) -> Tools | None:
        if not self.tools:
            return None
        choice = self.tool_choice_value
        if isinstance(choice, NamedToolChoice):
            return Tools(definitions=[t.as_sent() for t in self.tools], choice=choice.function.name, named=True)
        return Tools(definitions=[t.as_sent() for t in self.tools], choice=choice)

    def infer(self, request_id: str) -> InferRequest:
        requested = self.requested_max_tokens
        fill = {} if requested is not None else {"fill_context": True}  # vLLM: up to the context's end
        sampling = self._sampling(requested[1] if requested else CHAT_FALLBACK_MAX_TOKENS,
                                  self.top_logprobs or 0 if self.logprobs else None, **fill)
        return InferRequest(request_id=request_id, model=self.model, messages=[m.bus() for m in self.messages],
                            tools=self.bus_tools(), sampling=sampling, usage_every_chunk=self.continuous_usage)


def _prompt(v: Any) -> Any:
    """A completions prompt: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(v, str):
        if not v:
            raise ValueError("must not be empty")
        return _encodable(v)
    if not isinstance(v, list) or not v:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return [_token_ids(v)]
    if len(v) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
    out: list[str | list[int]] = []
    for i, p in enumerate(v):
        if isinstance(p, str):
            if not p:
                raise ParamError("must not be empty", i)
            try:
                out.append(_encodable(p))
            except ValueError as exc:
                raise ParamError(str(exc), i) from None
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            try:
                out.append(_token_ids(p))
            except ValueError as exc:
                raise ParamError(str(exc), i) from None
        else:
            raise ParamError("must be a string or a non-empty list of token ids", i)
    return out


def _token_ids(ids: list[int]) -> list[int]:
    if not all(0 <= t < TOKEN_ID_LIMIT for t in ids):
        raise ValueError("token ids must be vocabulary indices (0 or more)")
    return ids


PromptParam = Annotated[
    str | list[str | list[int]], BeforeValidator(_prompt),
    WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
         "minItems": 1}]}),
]


class CompletionRequest(_Request):
    prompt: PromptParam
    max_tokens: int | None = Field(COMPLETION_DEFAULT_MAX_TOKENS, ge=0, le=MAX_TOKENS_CAP)  # 0: echo alone
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # accepted by vLLM, refused here when set
    suffix: str | None = None
    prompt_embeds: Any = None
    add_special_tokens: bool = True

    REFUSED = (
        ("suffix", lambda v: v is None, "no model served here fills in the middle"),
        ("prompt_embeds", _not_set, "prompt embeddings are not passed to the model servers here"),
        ("add_special_tokens", lambda v: v is True, "the tokenizer's special tokens are always added here"),
    )

    def _check_request(self) -> None:
        super()._check_request()
        if len(self.prompt_list) * (self.n or 1) > MAX_CHOICES:
            raise ParamError(f"prompts x n is {len(self.prompt_list) * (self.n or 1)}; at most {MAX_CHOICES} "
                             "choices in one request", "n")
        if self.max_tokens == 0 and not self.echo:  # vLLM: 0 only returns the echoed prompt
            raise ParamError("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
        if self.echo and self.logprobs is not None:
            raise ParamError("echo with logprobs needs the prompt's logprobs, which are not returned here",
                             "echo", code="unsupported_parameter")

    @property
    def max_tokens_value(self) -> tuple[str, int]:
        return "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def requested_max_tokens(self) -> tuple[str, int] | None:
        return ("max_tokens", self.max_tokens) if "max_tokens" in self.model_fields_set and self.max_tokens else None

    @property
    def prompt_list(self) -> list[str | list[int]]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def choices(self) -> int:
        return len(self.prompt_list) * (self.n or 1)

    @property
    def echo_texts(self) -> list[str | None]:
        """Each prompt's text for echo (None for token ids: the worker detokenises them); empty without echo."""
        if not self.echo:
            return []
        return [p if isinstance(p, str) else None for p in self.prompt_list]

    def prompt_chars(self) -> int:
        return sum(len(p) for p in self.prompt_list if isinstance(p, str))

    def infer(self, request_id: str) -> InferRequest:
        prompts = self.prompt_list
        one = prompts[0] if len(prompts) == 1 and isinstance(prompts[0], str) else None  # the plain case
        sampling = self._sampling(COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
                                  self.logprobs)
        return InferRequest(request_id=request_id, model=self.model, prompt=one,
                            prompts=None if one is not None else prompts, echo=bool(self.echo), sampling=sampling,
                            usage_every_chunk=self.continuous_usage)

