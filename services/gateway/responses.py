"""OpenAI response bodies built from a worker's chunks, as vLLM's server builds them (docs/api.md, "Responses").

Streaming, every choice delta a worker sends (one choice's output of one engine step) is one SSE event, so
a client measures inter-token latency as it would against vLLM; a chat stream first sends each choice's role.
Otherwise the deltas are collected per choice. Each choice has its own finish reason, logprobs in the
endpoint's format, tool calls and echo; ``usage`` counts every choice. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from services.gateway.api_types import ChatCompletionRequest, CompletionRequest
from shared.messages import ChoiceDelta, InferChunk, TokenLogprob, Usage, finite_logprob, new_id


def token_bytes(token: str, given: list[int] | None) -> list[int]:
    return given if given is not None else list(token.encode("utf-8", errors="replace"))


def usage_body(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


class _Choice:
    """What one choice has produced so far."""

    def __init__(self) -> None:
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.calls: dict[int, dict[str, str]] = {}  # tool call index -> id, name, arguments so far
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.started = False  # a completions choice's first event carries the echoed prompt
        self.offset = 0  # completions: where the next token's text starts (text_offset)


class ResponseBuilder:
    """The OpenAI bodies of one request. ``take`` every chunk (in order); then, streaming, send
    ``start_events`` after the first chunk, ``events(chunk)`` for each chunk and ``end_events`` after the last;
    or, not streaming, ``add`` each chunk and send ``response()``."""

    def __init__(self, body: ChatCompletionRequest | CompletionRequest, request_id: str, model: str, created: int):
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id, self.model, self.created = request_id, model, created
        self.n = body.n or 1
        self.count = body.choices
        self.choices = {i: _Choice() for i in range(self.count)}
        self.include_usage, self.continuous = body.include_usage, body.continuous_usage
        self.usage: Usage | None = None
        self.last_finish: str | None = None
        if self.chat:
            self.want_logprobs = bool(body.logprobs)
            self.tools = body.bus_tools()
            self.parallel = body.parallel_tool_calls is not False
            self.chat_echo = body.echo_text
            self.prompt_texts: list[str | None] = []
        else:
            self.want_logprobs = body.logprobs is not None
            self.tools, self.parallel, self.chat_echo = None, True, ""
            self.prompt_texts = body.echo_texts  # the worker's detokenised texts replace them when it sends some

    # ------------------------------------------------------------ both

    def take(self, chunk: InferChunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.prompt_texts and self.prompt_texts:
            # the texts sent are kept as sent; the worker's detokenised ones stand for token-id prompts
            self.prompt_texts = [mine if mine is not None else given for mine, given
                                 in zip(self.prompt_texts, chunk.prompt_texts + [None] * len(self.prompt_texts))]
        if chunk.finish_reason is not None:
            self.last_finish = chunk.finish_reason

    def _choice(self, index: int) -> _Choice:
        c = self.choices.get(index)
        if c is None:  # more choices than asked for: served rather than dropped
            c = self.choices[index] = _Choice()
        return c

    def _echo(self, index: int) -> str:
        """The prompt text a completions choice starts with (echo)."""
        if not self.prompt_texts:
            return ""
        prompt = index // self.n
        return (self.prompt_texts[prompt] or "") if prompt < len(self.prompt_texts) else ""

    def _finish(self, c: _Choice, reason: str | None) -> str | None:
        """The finish reason as vLLM reports it with tools: "tool_calls" when a choice called tools (or had to,
        with "required"), "stop" for a named function."""
        tools = self.tools
        if reason is None or tools is None or tools.choice == "none":
            return reason
        if tools.named:
            return "stop" if reason == "tool_calls" else reason
        if reason == "stop" and (c.calls or tools.choice == "required"):
            return "tool_calls"
        return reason

    def _tool_calls(self, c: _Choice, delta: ChoiceDelta) -> list[dict[str, Any]]:
        """The delta's tool-call pieces in OpenAI's stream format (the first piece of a call has its id, type and
        name; later ones add to its arguments), recorded on the choice."""
        out = []
        for t in delta.tool_calls or []:
            if not self.parallel and t.index > 0:  # parallel_tool_calls false: only the first call, as vLLM
                continue
            call = c.calls.get(t.index)
            entry: dict[str, Any] = {"index": t.index}
            fn: dict[str, str] = {}
            if call is None:
                call = c.calls[t.index] = {"id": t.id or f"chatcmpl-tool-{new_id()}", "name": t.name or "",
                                           "arguments": ""}
                entry |= {"id": call["id"], "type": "function"}
                fn = {"name": call["name"], "arguments": t.arguments}
            else:
                if t.name and not call["name"]:
                    call["name"] = fn["name"] = t.name
                if t.arguments:
                    fn["arguments"] = t.arguments
            call["arguments"] += t.arguments
            entry["function"] = fn
            out.append(entry)
        return out

    def _logprobs(self, c: _Choice, tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tokens = tokens or []
        if self.chat:
            return {"content": [{"token": t.token, "logprob": finite_logprob(t.logprob),
                                 "bytes": token_bytes(t.token, t.bytes),
                                 "top_logprobs": [{"token": a.token, "logprob": finite_logprob(a.logprob),
                                                   "bytes": token_bytes(a.token, a.bytes)} for a in t.top]}
                                for t in tokens]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            top = {t.token: finite_logprob(t.logprob)}  # the chosen token and the top ones, as vLLM lists them
            for a in t.top:
                top.setdefault(a.token, finite_logprob(a.logprob))
            out["tokens"].append(t.token)
            out["token_logprobs"].append(finite_logprob(t.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(c.offset)
            c.offset += len(t.token)
        return out

    def _body(self, choices: list[dict], usage: Usage | None = None, stream: bool = True) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage_body(usage)
        return out

    # ------------------------------------------------------------ streaming

    def _running_usage(self, completion_tokens: int | None = None) -> Usage | None:
        if not self.continuous or self.usage is None:
            return None
        if completion_tokens is None:
            return self.usage
        return Usage(prompt_tokens=self.usage.prompt_tokens, completion_tokens=completion_tokens)

    def start_events(self) -> list[dict[str, Any]]:
        """A chat stream's first events: each choice's role, then the echoed assistant message, as vLLM sends them."""
        if not self.chat:
            return []
        events = [self._body([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}], self._running_usage(0)) for i in range(self.count)]
        if self.chat_echo:
            events += [self._body([{"index": i, "delta": {"content": self.chat_echo}, "logprobs": None,
                                    "finish_reason": None}], self._running_usage(0)) for i in range(self.count)]
        return events

    def events(self, chunk: InferChunk) -> list[dict[str, Any]]:
        """One event per choice delta of the chunk. A plain chunk is one engine step: an event even when its
        token made no text yet, as vLLM's server streams it; an explicit delta that carries nothing sends none."""
        self.take(chunk)
        events = []
        for d in chunk.choice_deltas():
            if chunk.deltas and not (d.text or d.logprobs or d.tool_calls or d.finish_reason):
                continue
            c = self._choice(d.index)
            if c.finish_reason is not None:  # a choice ends once
                continue
            choice = self._step(c, d)
            events.append(self._body([choice], self._running_usage()))
        return events

    def _step(self, c: _Choice, d: ChoiceDelta) -> dict[str, Any]:
        text = d.text
        if not self.chat and not c.started:
            text = self._echo(d.index) + text
        c.started = True
        c.text += d.text
        choice: dict[str, Any] = {"index": d.index}
        if self.chat:
            calls = self._tool_calls(c, d)
            delta: dict[str, Any] = {"content": text} if text or not calls else {}
            if calls:
                delta["tool_calls"] = calls
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(c, d.logprobs)
        finish = self._finish(c, d.finish_reason)
        choice["finish_reason"] = finish
        if finish is not None:
            c.finish_reason, c.stop_reason = finish, d.stop_reason
            choice["stop_reason"] = d.stop_reason
        return choice

    def end_events(self) -> list[dict[str, Any]]:
        """After the last chunk: a finish for any choice the worker did not finish, then usage if asked for."""
        events = []
        for i, c in sorted(self.choices.items()):
            if c.finish_reason is None:
                d = ChoiceDelta(index=i, finish_reason=self.last_finish or "stop")
                events.append(self._body([self._step(c, d)], self._running_usage()))
        if self.include_usage and self.usage is not None:
            events.append(self._body([], self.usage))
        return events

    # ------------------------------------------------------------ not streaming

    def add(self, chunk: InferChunk) -> None:
        self.take(chunk)
        for d in chunk.choice_deltas():
            c = self._choice(d.index)
            if c.finish_reason is not None:
                continue
            c.text += d.text
            c.logprobs += d.logprobs or []
            self._tool_calls(c, d)
            if d.finish_reason is not None:
                c.finish_reason, c.stop_reason = self._finish(c, d.finish_reason), d.stop_reason

    def response(self) -> dict[str, Any]:
        choices = []
        for i, c in sorted(self.choices.items()):
            finish = c.finish_reason or self._finish(c, self.last_finish or "stop")
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                text = self.chat_echo + c.text
                message: dict[str, Any] = {"role": "assistant", "content": text if text or not c.calls else None}
                if c.calls:
                    message["tool_calls"] = [{"id": t["id"], "type": "function",
                                              "function": {"name": t["name"], "arguments": t["arguments"]}}
                                             for _, t in sorted(c.calls.items())]
                choice["message"] = message
            else:
                choice["text"] = self._echo(i) + c.text
            c.offset = 0
            choice |= {"logprobs": self._logprobs(c, c.logprobs), "finish_reason": finish,
                       "stop_reason": c.stop_reason}
            choices.append(choice)
        return self._body(choices, self.usage, stream=False) | ({} if self.usage else {"usage": None})
