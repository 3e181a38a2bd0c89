"""The ``sim`` engine: modelled timings, no compute.

Used for cluster-scale tests and the simulator. It tokenizes with the model's real tokenizer (so
prompt lengths and context limits are real) and emits random vocabulary tokens on a modelled
schedule. Every timing parameter lives in ``SimProfile`` (``shared/perfmodel.py``'s ``PerfModel``).

The request surface is the vLLM engine's, cheaply: ``n`` choices (seeded ``seed + choice index``, as vLLM
seeds them) decoded as one batch per step, several prompts and token-id prompts, echo, ``stop``,
``stop_token_ids`` and ``min_tokens`` (stops are masked until then), synthetic finite logprobs with ``top``
alternatives. The model never ends on its own (no end-of-sequence token), so ``ignore_eos`` changes nothing.
Structured outputs and forced tool calls get a trivially valid answer in one step: the first of a
``choice`` list, ``{}`` for a JSON object, the smallest instance of a simple JSON schema (types, enums,
required properties), a call of the named function (or, for "required", of the first tool) with the
smallest arguments its parameters allow. Regexes, grammars and schemas beyond that are refused with
``unsupported``; tool_choice "auto" never calls a tool (and, as with vLLM, needs the catalog's tool parser).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.gpu_worker.engines import (
    Delta, EngineError, KvUsage, answer_budget, is_plain, off_loop, prompt_chars, prompt_inputs, top_logprobs_shown,
)
from shared.messages import ChoiceDelta, InferRequest, ModelSpec, TokenLogprob, ToolCallDelta, TopLogprob
from shared.perfmodel import GPU_A100_PCIE, PerfModel


SimProfile = PerfModel  # every timing parameter of the sim engine (shared with the cluster simulator)
# fast: a small model on a quick link (tests, demos); a100: the simulator's 7B-70B fp16 constants (load tests)
SIM_PROFILES = {"fast": SimProfile(), "a100": GPU_A100_PCIE}


class _Loaded:
    def __init__(self, spec: ModelSpec):
        from tokenizers import Tokenizer

        path = Path(spec.path)
        if not (path / "tokenizer.json").exists():
            raise EngineError("model_files_missing", f"{path} has no tokenizer.json")
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        self.eos = _token_text(cfg.get("eos_token")) or "</s>"
        self.template = ImmutableSandboxedEnvironment().from_string(template) if template else None
        specials = {self.tokenizer.token_to_id(t) for t in (self.eos, _token_text(cfg.get("bos_token")),
                                                           _token_text(cfg.get("pad_token")),
                                                           _token_text(cfg.get("unk_token"))) if t}
        model_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        layers = int(model_cfg.get("num_hidden_layers", 1))
        heads = int(model_cfg.get("num_attention_heads", 1))
        kv_heads = int(model_cfg.get("num_key_value_heads", heads))
        head_dim = int(model_cfg.get("head_dim") or model_cfg.get("hidden_size", 64) // heads)
        self.kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2
        # tokens that are whole characters on their own, so any sequence of them is valid text (special tokens,
        # the chat template's too, decode to nothing: not sampled)
        self.sample_ids = [i for i in range(self.tokenizer.get_vocab_size())
                           if i not in specials and (t := self.tokenizer.decode([i])) and "\ufffd" not in t]

    def prompts(self, request: InferRequest) -> tuple[list[list[int]], list[str] | None]:
        """Each prompt's token ids, and with echo each prompt's text (in a thread: ``encode_batch`` releases
        the GIL, ``encode`` does not)."""
        if request.messages is not None:
            return [self.tokenizer.encode_batch([self.chat_text(request)])[0].ids], None
        inputs = prompt_inputs(request)
        texts = [p for p in inputs if isinstance(p, str)]
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
        vocab = self.tokenizer.get_vocab_size()
        ids, echo = [], []
        for p in inputs:
            if isinstance(p, str):
                ids.append(next(encoded).ids)
                echo.append(p)
                continue
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise EngineError("invalid_request", f"Token id {bad} is out of vocabulary")
            ids.append(list(p))
            echo.append(self.tokenizer.decode(p, skip_special_tokens=False) if request.echo else "")
        return ids, echo if request.echo else None

    def chat_text(self, request: InferRequest) -> str:
        if self.template is None:
            raise EngineError("no_chat_template", f"model {self.spec.slug} has no chat template")
        messages = [{**m.model_dump(exclude_none=True), "content": m.content or ""} for m in request.messages]
        tools = request.tools.definitions if request.tools is not None else None
        return self.template.render(messages=messages, tools=tools, add_generation_prompt=True, eos_token=self.eos)


def _token_text(value) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


class SimEngine:
    name = "sim"

    def __init__(self, profile: SimProfile = SimProfile()):
        self.profile = profile
        self._models: dict[str, _Loaded] = {}
        self._active: set[str] = set()
        self._kv_bytes: dict[str, int] = {}
        self._tokens: dict[str, dict[int, int]] = {}  # model -> request -> tokens in the KV cache
        self._request_keys = itertools.count()

    async def load(self, spec: ModelSpec) -> int:
        p = self.profile
        loaded = await asyncio.to_thread(_Loaded, spec)
        await asyncio.sleep(p.load_s(spec.parameter_bytes))
        self._models[spec.slug] = loaded
        return spec.parameter_bytes

    async def unload(self, model: str) -> int:
        loaded = self._models.pop(model, None)
        self._active.discard(model)
        return loaded.spec.parameter_bytes if loaded else 0

    async def activate(self, model: str, kv_bytes: int) -> None:
        if model not in self._models:
            raise EngineError("not_loaded", f"{model} is not loaded")
        self._active.add(model)
        self._kv_bytes[model] = kv_bytes
        self._tokens.setdefault(model, {})

    async def deactivate(self, model: str) -> None:
        self._active.discard(model)
        self._kv_bytes.pop(model, None)

    def _block_bytes(self, model: str) -> int:
        return self._models[model].kv_bytes_per_token * self.profile.block_tokens

    def kv_usage(self, model: str) -> KvUsage | None:
        if model not in self._active:
            return None
        block = self._block_bytes(model)
        used = sum(-(-t // self.profile.block_tokens) for t in self._tokens.get(model, {}).values())
        return KvUsage(total_blocks=self._kv_bytes[model] // block, used_blocks=used, block_bytes=block)

    async def resize_kv(self, model: str, kv_bytes: int) -> int:
        usage = self.kv_usage(model)
        if usage is None:
            raise EngineError("not_active", f"{model} is not active")
        self._kv_bytes[model] = max(kv_bytes, usage.used_blocks * usage.block_bytes)
        return self._kv_bytes[model]

    async def close(self) -> None:
        self._models.clear()
        self._active.clear()


    async def generate(self, request: InferRequest) -> AsyncIterator[Delta]:
        loaded = self._models.get(request.model)
        if loaded is None or request.model not in self._active:
            raise EngineError("not_active", f"{request.model} is not active on this worker")
        prompts, echo = await off_loop(prompt_chars(request), loaded.prompts, request)
        s = answer_budget(request, max(map(len, prompts)), loaded.spec.max_context_tokens)
        request = request.model_copy(update={"sampling": s})
        _check_sampling(request)
        answer = _answer(request, loaded.spec)
        prompt_tokens = sum(map(len, prompts))
        await asyncio.sleep(self.profile.prefill_s(loaded.spec.parameter_bytes, prompt_tokens))
        tokens = self._tokens.setdefault(request.model, {})
        key = next(self._request_keys)  # request ids may repeat; KV bookkeeping must not collide
        tokens[key] = prompt_tokens
        run = _SimRun(self, loaded, request, prompt_tokens, len(prompts), echo)
        try:
            steps = run.answer(answer) if answer is not None else run.decode(lambda n: tokens.__setitem__(key, n))
            async for delta in steps:
                yield delta
        finally:
            tokens.pop(key, None)


def _check_sampling(request: InferRequest) -> None:
    """The refusals of vLLM's SamplingParams that a client meets most (the vllm engine has them all)."""
    s = request.sampling
    bad = ("max_tokens must be at least 1" if s.max_tokens < 1 and not (request.echo and s.max_tokens == 0) else
           "n must be at least 1" if s.n < 1 else
           "min_tokens must be less than or equal to max_tokens" if s.min_tokens > max(s.max_tokens, 1) else
           "temperature must be in [0, 2]" if not 0 <= s.temperature <= 2 else
           "top_p must be in (0, 1]" if not 0 < s.top_p <= 1 else
           "stop cannot contain an empty string" if any(not x for x in s.stop) else None)
    if bad:
        raise EngineError("invalid_request", bad)


class _Choice:
    def __init__(self, seed: int | None):
        self.rng = random.Random(seed)
        self.text = ""
        self.emitted = 0  # characters of ``text`` sent
        self.produced = 0
        self.finish: str | None = None


class _SimRun:
    """One request's choices, decoded as one batch per step."""

    def __init__(self, engine: SimEngine, loaded: _Loaded, request: InferRequest, prompt_tokens: int,
                 prompt_count: int, echo: list[str] | None):
        s = request.sampling
        self.engine, self.loaded, self.request, self.s = engine, loaded, request, s
        self.prompt_tokens = prompt_tokens
        self.plain = is_plain(request)
        self.top = top_logprobs_shown(request)
        self.echo = echo
        self.hide = echo is not None and s.max_tokens == 0  # echo alone: one token generated and dropped
        self.max_tokens = 1 if self.hide else s.max_tokens
        self.choices = [_Choice(None if s.seed is None else s.seed + i) for i in range(prompt_count * s.n)]
        self.stop_ids = set(s.stop_token_ids)
        self.allowed = [i for i in loaded.sample_ids if i not in self.stop_ids] or loaded.sample_ids
        self.hold = max(map(len, s.stop), default=1) - 1

    def _delta(self, text: str, choices: list[ChoiceDelta], end: str | None) -> Delta:
        echo, self.echo = self.echo, None
        produced = sum(c.produced for c in self.choices)
        return Delta(text, end, self.prompt_tokens, produced, tuple(choices), echo)

    async def decode(self, track) -> AsyncIterator[Delta]:
        step = 0
        while True:
            running = [(i, c) for i, c in enumerate(self.choices) if c.finish is None]
            if step:
                await asyncio.sleep(self.engine.profile.decode_s(self.loaded.spec.parameter_bytes, len(running)))
            step += 1
            text, out, end = "", [], None
            for i, c in running:
                piece, logprobs, stop_reason = self._token(c)
                if self.hide:
                    piece = ""
                if self.plain and stop_reason is None:
                    text += piece
                elif piece or logprobs or c.finish:
                    out.append(ChoiceDelta(index=i, text=piece, logprobs=logprobs, finish_reason=c.finish,
                                           stop_reason=stop_reason))
                if c.finish is not None:
                    end = c.finish
            track(self.prompt_tokens + sum(c.produced for c in self.choices))
            done = all(c.finish is not None for c in self.choices)
            yield self._delta(text, out, end if done else None)  # every step made tokens, if not always text
            if done:
                return

    def _token(self, c: _Choice) -> tuple[str, list[TokenLogprob] | None, int | str | None]:
        """One token of choice ``c``: the text it adds (stops cut or kept as asked), its logprobs, and the
        stop string or token id that ended the choice."""
        s, tok = self.s, self.loaded.tokenizer
        early = c.produced < s.min_tokens  # stops are masked until min_tokens, as vLLM does
        tid = c.rng.choice(self.allowed if early else self.loaded.sample_ids)
        c.produced += 1
        piece = tok.decode([tid])
        logprobs = self._logprobs(c, tid, piece) if s.logprobs is not None and not self.hide else None
        if tid in self.stop_ids and not early:
            c.finish = "stop"
            return (piece if s.include_stop_str_in_output else ""), logprobs, tid
        start = len(c.text)
        c.text += piece
        if not early:
            found = ((c.text.find(x, max(start - len(x) + 1, 0)), x) for x in s.stop)  # stops this token completed
            cut = min(((at, x) for at, x in found if at >= 0), default=None)
            if cut is not None:
                at, stop = cut
                end = at + len(stop) if s.include_stop_str_in_output else at
                c.text, c.finish = c.text[:end], "stop"
                out, c.emitted = c.text[c.emitted:], len(c.text)
                return out, logprobs, stop
        if c.produced >= self.max_tokens:
            c.finish = "length"
        # like vLLM's detokenizer, hold back what may be the start of a stop string until it is known not to be
        upto = len(c.text) if c.finish or s.include_stop_str_in_output else max(len(c.text) - self.hold, c.emitted)
        out, c.emitted = c.text[c.emitted:upto], upto
        return out, logprobs, None

    def _logprobs(self, c: _Choice, tid: int, token: str) -> list[TokenLogprob]:
        """Synthetic but finite: the chosen token, then ``top`` alternatives by rank (vLLM's order)."""
        k = self.s.logprobs if self.s.logprobs >= 0 else 5
        alternatives = c.rng.sample(self.loaded.sample_ids, min(k, len(self.loaded.sample_ids)))
        chosen = -round(c.rng.uniform(0.05, 6.0), 4)
        entries = [(tid, token, chosen)] + [(a, self.loaded.tokenizer.decode([a]), -0.5 * (r + 1))
                                           for r, a in enumerate(alternatives) if a != tid]
        shown = entries if self.top is None else entries[:self.top]
        return [TokenLogprob(token=token, logprob=chosen, bytes=list(token.encode()),
                             top=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for _, t, lp in shown])]

    async def answer(self, answer: str | ToolCallDelta) -> AsyncIterator[Delta]:
        """A structured output or forced tool call: every choice answers at once."""
        await asyncio.sleep(self.engine.profile.decode_s(self.loaded.spec.parameter_bytes, len(self.choices)))
        text = answer if isinstance(answer, str) else answer.arguments
        produced = max(len(self.loaded.tokenizer.encode(text).ids), 1)
        tools = self.request.tools
        finish = "stop" if isinstance(answer, str) or tools.named else "tool_calls"
        out = []
        for i, c in enumerate(self.choices):
            c.produced, c.finish = produced, finish
            if isinstance(answer, str):
                out.append(ChoiceDelta(index=i, text=answer, finish_reason=finish))
            else:
                call = answer.model_copy(update={"id": f"chatcmpl-tool-{uuid.uuid4().hex[:16]}"})
                out.append(ChoiceDelta(index=i, tool_calls=[call], finish_reason=finish))
        if self.plain and isinstance(answer, str):
            yield self._delta(answer, [], finish)
        else:
            yield self._delta("", out, finish)


def _answer(request: InferRequest, spec: ModelSpec) -> str | ToolCallDelta | None:
    """The one-step answer of a structured output or forced tool call (None: decode tokens as usual)."""
    tools = request.tools
    if tools is not None and tools.choice != "none":
        if tools.choice == "auto" and not tools.named:
            if not (tools.parser or spec.tool_parser):
                raise EngineError("invalid_request", f'tool_choice: "auto" needs a tool parser, and the catalog '
                                                     f"names none for {request.model} (ModelSpec.tool_parser)")
        else:
            functions = [d.get("function") or {} for d in tools.definitions if d.get("type", "function") == "function"]
            fn = next((f for f in functions if f.get("name") == tools.choice), None) if tools.named else \
                next(iter(functions), None)
            if fn is None:
                raise EngineError("invalid_request", f"tool_choice: no function {tools.choice!r} among the tools"
                                  if tools.named else "tool_choice: \"required\" needs at least one function tool")
            args = _smallest(fn.get("parameters") or {"type": "object"})
            return ToolCallDelta(index=0, name=fn["name"], arguments=json.dumps(args))
    so = request.sampling.structured
    if so is None:
        return None
    if so.choice is not None:
        if not so.choice:
            raise EngineError("invalid_request", "structured outputs: choice needs at least one value")
        return so.choice[0]
    if so.json_object:
        return "{}"
    if so.json_schema is not None:
        return json.dumps(_smallest(so.json_schema))
    raise EngineError("unsupported", "the sim engine answers structured outputs only for choice, json_object and "
                                     "simple JSON schemas; regexes and grammars need the vllm engine")


SIM_SCHEMA_SIZE = 4096  # most characters or items the sim engine makes for one minLength or minItems
SIM_SCHEMA_DEPTH = 32


def _size(schema: dict, key: str) -> int:
    """A schema's minLength or minItems, bounded: a client's schema must not make the worker build a huge answer."""
    value = schema.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SIM_SCHEMA_SIZE:
        raise EngineError("unsupported", f"the sim engine makes answers of at most {SIM_SCHEMA_SIZE} characters "
                                         f"or items per value ({key} {str(value)[:40]})")
    return value


def _smallest(schema: dict, depth: int = 0):
    """The smallest instance of a simple JSON schema (types, enum/const, required properties, minItems)."""
    if not isinstance(schema, dict):
        raise EngineError("unsupported", "the sim engine reads only JSON schemas that are objects")
    if depth > SIM_SCHEMA_DEPTH:
        raise EngineError("unsupported", f"the sim engine reads JSON schemas nested at most {SIM_SCHEMA_DEPTH} deep")
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _smallest(props.get(name, {"type": "string"}), depth + 1) for name in schema.get("required", [])}
    if kind == "array":
        item = _smallest(schema.get("items") or {"type": "string"}, depth + 1)
        return [item] * _size(schema, "minItems")
    simple = {"string": "x" * _size(schema, "minLength") if kind == "string" else "", "integer": schema.get("minimum", 0),
              "number": schema.get("minimum", 0), "boolean": False, "null": None}
    if kind in simple:
        return simple[kind]
    raise EngineError("unsupported", f"the sim engine cannot make an instance of the JSON schema "
                                     f"{json.dumps(schema)[:200]} (it knows types, enum, const, required "
                                     f"properties); use the vllm engine")
