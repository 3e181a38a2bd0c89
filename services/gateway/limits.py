"""What one client may send and hold: body size and encoding, prompt size, answer length, and each API
key's requests in flight. Every limit answers with a 4xx in the OpenAI error format naming what was
exceeded (README, "Limits")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.api_types import ChatCompletionRequest, CompletionRequest
from services.gateway.errors import ApiError
from shared.messages import ApiKeyRecord, ModelSpec
from shared.settings import GatewaySettings


def check_request(body: ChatCompletionRequest | CompletionRequest, spec: ModelSpec, s: GatewaySettings) -> None:
    """The limits that depend on settings or on the model (the static ones are in the request types)."""
    chat = isinstance(body, ChatCompletionRequest)
    if chat and len(body.messages) > s.max_messages:
        raise ApiError(400, f"{len(body.messages)} messages sent; at most {s.max_messages} are accepted",
                       code="too_many_messages", param="messages")
    if chat and body.tool_choice_value != "none" and spec.tool_parser is None:
        # vLLM's server without a tool-call parser refuses every tool_choice but "none" the same way
        choice = body.tool_choice_value
        named = f'the function "{choice.function.name}"' if not isinstance(choice, str) else f'"{choice}"'
        default = " (the default when tools are sent)" if body.tool_choice is None else ""
        raise ApiError(400, f"tool_choice {named}{default} needs a tool-call parser, and none is configured for "
                            f"'{spec.slug}'; send tool_choice \"none\" or no tools", code="invalid_request",
                       param="tool_choice")
    chars = body.prompt_chars()
    if chars > s.max_prompt_chars:
        raise ApiError(400, f"the prompt has {chars} characters; at most {s.max_prompt_chars} are accepted",
                       code="prompt_too_long", param=prompt_param(body))
    requested = body.requested_max_tokens
    if requested is not None and requested[1] >= spec.max_context_tokens:
        name, value = requested
        raise ApiError(400, f"{name} ({value}) must be below the context of '{spec.slug}' "
                            f"({spec.max_context_tokens} tokens), which the prompt shares",
                       code="context_length_exceeded", param=name)
    # A cheap bound instead of tokenising here: no token covers more than max_chars_per_token characters,
    # so a longer prompt needs more tokens than the context has room for. It never refuses a prompt that
    # fits (as long as the setting is true of the tokenizers); the worker checks the exact count. Each of a
    # completions request's prompts is its own sequence; token-id prompts are counted exactly.
    room = spec.max_context_tokens - (requested[1] if requested is not None else 0)
    answer = f", less {requested[0]} ({requested[1]})" if requested is not None else ""
    prompts = [sum(len(m.content or "") for m in body.messages)] if chat else body.prompt_list
    for i, prompt in enumerate(prompts):
        where = prompt_param(body) if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(prompt, list):
            if len(prompt) > room:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context of '{spec.slug}' holds "
                                    f"{spec.max_context_tokens} tokens{answer}", code="context_length_exceeded",
                               param=where)
            continue
        size = prompt if isinstance(prompt, int) else len(prompt)
        if size > room * s.max_chars_per_token:
            raise ApiError(400, f"the prompt has {size} characters, so at least {-(-size // s.max_chars_per_token)} "
                                f"tokens; the context of '{spec.slug}' holds {spec.max_context_tokens} tokens{answer}",
                           code="context_length_exceeded", param=where)


def prompt_param(body) -> str:
    """The parameter that holds a request's prompt (named by a context or prompt-size error)."""
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"


def share_of(limit: int, gateways: int) -> int:
    """One gateway's share of a key's concurrency limit among ``gateways`` behind one load balancer; at
    least 1, so a key limited below the number of gateways may have one request on each."""
    return max(1, -(-limit // gateways))


class KeySlots:
    """Requests in flight per API key. ``acquire`` takes a slot or raises 429; the function it returns
    gives the slot back (once, however often it is called)."""

    def __init__(self, default_limit: int, gateways: int = 1):
        self.default_limit = default_limit
        self.gateways = gateways  # gateways sharing the keys' limits: this one enforces its share
        self.in_flight: dict[str, int] = {}

    def limit(self, record: ApiKeyRecord) -> int:
        return share_of(record.max_concurrency or self.default_limit, self.gateways)

    def acquire(self, record: ApiKeyRecord | None) -> Callable[[], None]:
        if record is None:  # keys are not required: nothing to count against
            return lambda: None
        limit = self.limit(record)
        held = self.in_flight.get(record.id, 0)
        if held >= limit:
            raise ApiError(429, f"API key '{record.name}' has {held} requests in flight, its limit of concurrent "
                                f"requests is {limit}; retry when one has finished",
                           code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight[record.id] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.in_flight.get(record.id, 0) - 1
            if left > 0:
                self.in_flight[record.id] = left
            else:
                self.in_flight.pop(record.id, None)

        return release


# What a body may grow by on its way to a worker (request and instance ids, defaults, trace headers): the
# body limit stays this far below NATS's max_payload, so every body under it fits in one message.
ENVELOPE_BYTES = 8 * 1024


def body_limit(setting: int, max_payload: int | None) -> int:
    """The largest body read: WARMSERVE_MAX_BODY_BYTES, lowered where NATS (its ``max_payload``; None before
    connecting) could not carry such a body to a worker."""
    if max_payload is None:
        return setting
    return min(setting, max_payload - min(ENVELOPE_BYTES, max_payload // 2))


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def too_large_for_bus(detail: str) -> ApiError:
    """The request as sent to a worker is more than NATS carries (a body under the limit grew on the way)."""
    return ApiError(413, "The request is too large to send to a model server; shorten the prompt",
                    code="request_too_large", detail=detail)


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes | None:
    """The whole body, at most ``limit`` bytes (a chunked body is counted as it arrives), checked to be
    UTF-8; None when the client left while sending it."""
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", code="invalid_request") from None
        if declared > limit:
            raise too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (at byte {exc.start})", code="invalid_encoding") from None
    return body


class Guard:
    """Pure ASGI middleware in front of ``/v1``: the API key (401), its rate (429) and concurrency (429)
    limits, then the body's size (413) and encoding (400), all before anything parses the body.

    Pure ASGI rather than ``@app.middleware``: the key's slot is held until the app has sent the whole
    response, a stream included, and given back however the request ends (answer, error, client gone,
    stream failure, cancellation). A client that leaves (waiting in the queue, while a non-streamed answer is
    generated, or mid-stream) cancels the request, so its slot and the worker's capacity are not held for
    nobody."""

    def __init__(self, app: ASGIApp, gateway) -> None:
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            record = self.gw.authorize(headers.get("authorization"))
            release = self.gw.key_slots.acquire(record)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        try:
            try:
                body = await read_body(receive, headers, self.gw.body_limit)
            except ApiError as exc:
                await exc.response()(scope, receive, send)
                return
            if body is not None:
                await _run_until_disconnect(self.app, scope, body, receive, send)
        finally:
            release()


async def _run_until_disconnect(app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """Run the app, in this task, on the body already read. The client's next message (only a disconnect
    can follow a whole body) is awaited alongside: the app receives it when it asks, and a disconnect cancels
    the app, before the response started or during a stream (which then ends as "client closed")."""
    nxt = asyncio.ensure_future(receive())
    me = asyncio.current_task()
    body_sent = gone = ended = finished = False

    async def app_receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await asyncio.shield(nxt)

    async def app_send(message: Message) -> None:
        nonlocal ended
        ended = message["type"] == "http.response.body" and not message.get("more_body", False)
        await send(message)

    def on_message(fut: asyncio.Future) -> None:
        # uvicorn answers a disconnect also once the response is complete: the app is only finishing then
        nonlocal gone
        # ``finished``: the callback was already scheduled when the app returned; cancelling now would hit the
        # server's code after the app
        if not ended and not finished and not fut.cancelled() and fut.exception() is None \
                and fut.result()["type"] == "http.disconnect":
            gone = True
            me.cancel()  # the handler sees CancelledError: the request ends as "client closed"

    nxt.add_done_callback(on_message)
    try:
        await app(scope, app_receive, app_send)
    except asyncio.CancelledError:
        if not gone or me.uncancel() > 0:  # cancelled by someone else too: the server is stopping
            raise
    finally:
        finished = True
        nxt.remove_done_callback(on_message)
        if not nxt.done():
            nxt.cancel()
