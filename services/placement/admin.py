"""Operator verbs on ``warmserve.admin.<verb>``: validate, act on the catalog, answer clearly."""

from __future__ import annotations

import logging

import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from shared.db import repo
from shared.messages import AdminReply, AdminRequest, ErrorInfo, ModelSpec, ModelStatus, OperatorHold
from shared.model_folder import max_context, weight_bytes
from shared.policy.cluster import live_workers
from shared.subjects import check_token


log = logging.getLogger("warmserve.placement")


# identifiers that end up in NATS subjects and KV keys: validated once, here
Slug = Annotated[str, AfterValidator(lambda v: check_token(v, "model slug"))]
WorkerId = Annotated[str, AfterValidator(lambda v: check_token(v, "worker id"))]


class RegisterArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: Slug
    path: str
    parameter_bytes: int | None = Field(None, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    max_context_tokens: int | None = Field(None, ge=16)
    status: ModelStatus = ModelStatus.ACTIVE


class SlugArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slug: str


class KeyArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    rate_limit_rps: float | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, ge=1, le=100_000)


class WorkerArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker_id: WorkerId
    reason: str = Field("", max_length=200)


class PinArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slug: Slug
    copies: int = Field(1, ge=1, le=64)
    reason: str = Field("", max_length=200)


class AdminError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Admin:
    """Handlers by verb; ``service`` supplies sessions, the worker mirror and catalog sync."""

    def __init__(self, service):
        self.svc = service
        self.verbs = {
            "model-register": self.model_register, "model-list": self.model_list,
            "model-remove": self.model_remove, "worker-list": self.worker_list,
            "placement-history": self.placement_history,
            "key-create": self.key_create, "key-list": self.key_list,
            "key-disable": self.key_disable, "key-enable": self.key_enable,
            "worker-drain": self.worker_drain, "worker-undrain": self.worker_undrain,
            "prewarm-pin": self.prewarm_pin, "prewarm-unpin": self.prewarm_unpin, "hold-list": self.hold_list,
            "placement-show": self.placement_show,
        }

    async def handle(self, verb: str, data: bytes) -> AdminReply:
        handler = self.verbs.get(verb)
        if handler is None:
            return _error("unknown_verb", f"unknown admin verb {verb!r}; known: {', '.join(sorted(self.verbs))}")
        try:
            req = AdminRequest.decode(data) if data else AdminRequest()
            return AdminReply(ok=True, result=await handler(req.args))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            return _error("bad_request", f"{verb}: {where + ': ' if where else ''}{err['msg']}")
        except ValueError as exc:
            return _error("bad_request", f"{verb}: {exc}")
        except AdminError as exc:
            return _error(exc.code, str(exc))
        except Exception as exc:  # Postgres away, unreadable folder...: answer, never leave the caller waiting
            return _error("internal", f"{verb} failed: {str(exc).splitlines()[0] if str(exc) else repr(exc)}")

    async def model_register(self, args: dict[str, Any]) -> dict:
        a = RegisterArgs.model_validate(args)
        path = Path(a.path)
        size, context = a.parameter_bytes, a.max_context_tokens
        if size is None or context is None:
            if not (path / "config.json").exists():
                raise AdminError("bad_request", f"{a.path} is not a model folder here; pass parameter_bytes "
                                                "and max_context_tokens if it only exists on the workers")
            size = size or weight_bytes(path)
            context = context or max_context(path)
        if not size:
            raise AdminError("bad_request", f"{a.path} holds no *.safetensors weights")
        spec = ModelSpec(slug=a.slug, path=str(path), parameter_bytes=size, tensor_parallel_size=a.tensor_parallel_size,
                         max_context_tokens=context, status=a.status)
        async with self.svc.sessions() as session:
            await repo.upsert_model(session, spec)
            await session.commit()
        await self.svc.sync_catalog()
        return spec.model_dump(mode="json")

    async def model_list(self, args: dict[str, Any]) -> list[dict]:
        async with self.svc.sessions() as session:
            specs = await repo.list_models(session)
        return [s.model_dump(mode="json") for s in specs]

    async def model_remove(self, args: dict[str, Any]) -> dict:
        a = SlugArgs.model_validate(args)
        async with self.svc.sessions() as session:
            removed = await repo.remove_model(session, a.slug)
            await session.commit()
        if not removed:
            raise AdminError("not_found", f"no model {a.slug!r} in the catalog")
        await self.svc.sync_catalog()
        return {"removed": a.slug}

    async def worker_list(self, args: dict[str, Any]) -> list[dict]:
        live = live_workers(self.svc.workers.items.values(), time.time(), self.svc.settings.heartbeat_timeout_s)
        return [w.model_dump(mode="json") for w in live]

    async def placement_history(self, args: dict[str, Any]) -> list[dict]:
        limit = int(args.get("limit", 10))
        async with self.svc.sessions() as session:
            rows = await repo.recent_plans(session, max(1, min(limit, 100)))
        return [{"plan_id": r.plan_id, "created_at": r.created_at.isoformat(), "inputs": r.inputs,
                 "prewarm_set": r.prewarm_set} for r in rows]


    async def worker_drain(self, args: dict[str, Any]) -> dict:
        """Take a worker out of service: no new instances or copies; its instances drain and stop, its
        prewarmed copies are evicted. Undrain puts it back."""
        a = WorkerArgs.model_validate(args)
        if a.worker_id not in self.svc.workers.items:
            raise AdminError("not_found", f"no worker {a.worker_id!r} (warmserve workers lists them)")
        return await _hold(self.svc, OperatorHold(kind="drain", target=a.worker_id, reason=a.reason, at_s=time.time()))

    async def worker_undrain(self, args: dict[str, Any]) -> dict:
        a = WorkerArgs.model_validate(args)
        return await _release(self.svc, f"drain.{a.worker_id}", f"drain of worker {a.worker_id!r}")

    async def prewarm_pin(self, args: dict[str, Any]) -> dict:
        """Keep ``copies`` prewarmed copies of a model whatever its forecast (they are never evicted)."""
        a = PinArgs.model_validate(args)
        if a.slug not in self.svc.catalog.items:
            raise AdminError("not_found", f"no model {a.slug!r} in the catalog")
        return await _hold(self.svc, OperatorHold(kind="pin", target=a.slug, copies=a.copies, reason=a.reason,
                                                  at_s=time.time()))

    async def prewarm_unpin(self, args: dict[str, Any]) -> dict:
        a = SlugArgs.model_validate({"slug": args.get("slug", "")})
        return await _release(self.svc, f"pin.{a.slug}", f"pin of model {a.slug!r}")

    async def hold_list(self, args: dict[str, Any]) -> list[dict]:
        return [h.model_dump(mode="json") for _, h in sorted(self.svc.operator.items.items())]

    async def placement_show(self, args: dict[str, Any]) -> dict:
        """The plan in force, with the newest inputs: forecasts, scores, skipped models, holds."""
        plan = self.svc.latest or self.svc.current
        if plan is None:
            return {"plan_id": None, "copies": [], "inputs": {}, "note": "no plan yet"}
        current = self.svc.current
        return {"plan_id": current.plan_id if current else None,
                "since": current.created_at_s if current else None,
                "copies": [c.model_dump() for c in (current.copies if current else [])],
                "inputs": plan.inputs, "holds": await self.hold_list({})}

    async def key_create(self, args: dict[str, Any]) -> dict:
        a = KeyArgs.model_validate(args)
        from sqlalchemy.exc import IntegrityError

        try:
            async with self.svc.sessions() as session:
                row, plaintext = await repo.create_key(session, a.name, a.rate_limit_rps, a.max_concurrency)
                await session.commit()
        except IntegrityError:
            raise AdminError("conflict", f"an API key named {a.name!r} exists already") from None
        try:
            await self.svc.sync_keys()
        except Exception as exc:  # the key is stored; the periodic sync publishes it. Never lose the plaintext.
            log.warning("API key %s stored; publishing it to gateways waits for the next sync (%s)", a.name, exc)
        return {"name": row.name, "id": row.id, "key": plaintext,
                "note": "store this key now: only its hash is kept"}

    async def key_list(self, args: dict[str, Any]) -> list[dict]:
        async with self.svc.sessions() as session:
            rows = await repo.list_keys(session)
        return [{"name": r.name, "id": r.id, "prefix": r.prefix, "disabled": r.disabled,
                 "rate_limit_rps": r.rate_limit_rps, "max_concurrency": r.max_concurrency,
                 "created_at": r.created_at.isoformat()} for r in rows]

    async def _set_disabled(self, args: dict[str, Any], disabled: bool) -> dict:
        name = KeyArgs.model_validate({"name": args.get("name", "")}).name
        async with self.svc.sessions() as session:
            found = await repo.set_key_disabled(session, name, disabled)
            await session.commit()
        if not found:
            raise AdminError("not_found", f"no API key named {name!r}")
        await self.svc.sync_keys()
        return {"name": name, "disabled": disabled}

    async def key_disable(self, args: dict[str, Any]) -> dict:
        return await self._set_disabled(args, True)

    async def key_enable(self, args: dict[str, Any]) -> dict:
        return await self._set_disabled(args, False)


async def _hold(svc, hold: OperatorHold) -> dict:
    await svc.operator_kv.put(hold.key, hold.encode())
    svc.changed.set()
    return hold.model_dump(mode="json")


async def _release(svc, key: str, what: str) -> dict:
    if key not in svc.operator.items:
        raise AdminError("not_found", f"{what} is not set")
    await svc.operator_kv.delete(key)
    svc.changed.set()
    return {"released": key}


def _error(code: str, message: str) -> AdminReply:
    return AdminReply(ok=False, error=ErrorInfo(code=code, message=message))
