"""OpenAI API request bodies the gateway accepts. Unknown parameters are rejected by name
(a silent ignore would change results without telling the caller).

Static bounds live here (they are part of the OpenAPI schema); the limits an operator sets
(body size, messages, prompt characters) and the model's context are checked by ``limits``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from shared.messages import ChatMessage, SamplingParams

MAX_TOKENS_CAP = 32768  # no model served here generates more in one request
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
INT64 = 2**63


def _encodable(v: str) -> str:
    """JSON may escape lone UTF-16 surrogates (``"\\ud800"``); they are not text and cannot be sent on."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired UTF-16 surrogate (not valid Unicode text)") from None
    return v


Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(ChatMessage):
    """A chat message as the API accepts it (a ChatMessage whose content is valid text)."""

    content: Text


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Text | list[Text] | None = None
    n: Literal[1] = 1
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    @property
    def requested_max_tokens(self) -> tuple[str, int] | None:
        """The parameter that sets the answer's length and its value, if the caller set one."""
        return ("max_tokens", self.max_tokens) if self.max_tokens is not None else None

    def prompt_chars(self) -> int:
        """Characters of prompt text (checked against WARMSERVE_MAX_PROMPT_CHARS); each request type counts
        its own (chat: every message's content; completions: the prompt)."""
        raise NotImplementedError

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stop or [], seed=self.seed)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)

    @property
    def requested_max_tokens(self) -> tuple[str, int] | None:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().requested_max_tokens

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None:
            params = params.model_copy(update={"max_tokens": self.max_completion_tokens})
        return params


class CompletionRequest(_Common):
    prompt: Text = Field(min_length=1)

    def prompt_chars(self) -> int:
        return len(self.prompt)
