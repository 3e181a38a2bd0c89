"""The ``sim`` engine: modelled timings, no compute.

Used for cluster-scale tests and the simulator. It tokenizes with the model's real tokenizer (so
prompt lengths and context limits are real) and emits random vocabulary tokens on a modelled
schedule. Every timing parameter lives in ``SimProfile`` (``shared/perfmodel.py``'s ``PerfModel``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.gpu_worker.engines import Delta, EngineError, KvUsage, off_loop, prompt_chars
from shared.messages import InferRequest, ModelSpec
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
        # tokens that are whole characters on their own, so any sequence of them is valid text
        model_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        layers = int(model_cfg.get("num_hidden_layers", 1))
        heads = int(model_cfg.get("num_attention_heads", 1))
        kv_heads = int(model_cfg.get("num_key_value_heads", heads))
        head_dim = int(model_cfg.get("head_dim") or model_cfg.get("hidden_size", 64) // heads)
        self.kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2
        self.sample_ids = [i for i in range(self.tokenizer.get_vocab_size())
                           if i not in specials and "\ufffd" not in self.tokenizer.decode([i])]

    def prompt_ids(self, request: InferRequest) -> list[int]:
        """The prompt's token ids (in a thread: ``encode_batch`` releases the GIL, ``encode`` does not)."""
        return self.tokenizer.encode_batch([self.prompt_text(request)])[0].ids

    def prompt_text(self, request: InferRequest) -> str:
        if request.messages is None:
            return request.prompt or ""
        if self.template is None:
            raise EngineError("no_chat_template", f"model {self.spec.slug} has no chat template")
        return self.template.render(messages=[m.model_dump() for m in request.messages],
                                    add_generation_prompt=True, eos_token=self.eos)


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
        prompt_ids = await off_loop(prompt_chars(request), loaded.prompt_ids, request)
        s = request.sampling
        limit = loaded.spec.max_context_tokens
        if len(prompt_ids) + s.max_tokens > limit:
            raise EngineError(
                "context_length_exceeded",
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({s.max_tokens}) exceeds "
                f"the model's context of {limit} tokens",
            )
        await asyncio.sleep(self.profile.prefill_s(loaded.spec.parameter_bytes, len(prompt_ids)))
        rng = random.Random(s.seed)
        tokens = self._tokens.setdefault(request.model, {})
        key = next(self._request_keys)  # request ids may repeat; KV bookkeeping must not collide
        tokens[key] = len(prompt_ids)
        try:
            async for delta in self._decode(loaded, request, prompt_ids, rng, tokens, key):
                yield delta
        finally:
            tokens.pop(key, None)

    async def _decode(self, loaded, request, prompt_ids, rng, tokens, key) -> AsyncIterator[Delta]:
        s = request.sampling
        text, produced = "", 0
        while produced < s.max_tokens:
            if produced:
                await asyncio.sleep(self.profile.decode_s(loaded.spec.parameter_bytes))
            produced += 1
            tokens[key] = len(prompt_ids) + produced
            emitted = len(text)
            text += loaded.tokenizer.decode([rng.choice(loaded.sample_ids)])
            cut = min((text.find(st) for st in s.stop if st and st in text), default=-1)
            if cut >= 0:
                yield Delta(text[emitted:cut] if cut > emitted else "", "stop", len(prompt_ids), produced)
                return
            yield Delta(text[emitted:], "length" if produced == s.max_tokens else None, len(prompt_ids), produced)
