"""Operator verbs on ``warmserve.admin.<verb>``: validate, act on the catalog, answer clearly."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shared.admin import (
    PLACEMENT_VERBS, AdminError, Dispatcher, HistoryArgs, KeyArgs, KeyNameArgs, NoArgs, PinArgs, RegisterArgs, SlugArgs,
    UnpinArgs, UpdateArgs, WorkerArgs,
)
from shared.db import repo
from shared.messages import ModelSpec, OperatorHold
from shared.model_folder import max_context, weight_bytes
from shared.service import seen_workers

log = logging.getLogger("warmserve.placement")


class Admin:
    """Handlers by verb; ``service`` supplies sessions, the worker mirror and catalog sync."""

    def __init__(self, service):
        self.svc = service
        self.dispatcher = Dispatcher(PLACEMENT_VERBS, {
            "model-register": self.model_register, "model-update": self.model_update, "model-list": self.model_list,
            "model-remove": self.model_remove, "worker-list": self.worker_list,
            "placement-history": self.placement_history,
            "key-create": self.key_create, "key-list": self.key_list,
            "key-disable": self.key_disable, "key-enable": self.key_enable,
            "worker-drain": self.worker_drain, "worker-undrain": self.worker_undrain,
            "prewarm-pin": self.prewarm_pin, "prewarm-unpin": self.prewarm_unpin, "hold-list": self.hold_list,
            "placement-show": self.placement_show,
        })

    async def model_register(self, a: RegisterArgs) -> dict:
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
                         max_context_tokens=context, status=a.status, tool_parser=a.tool_parser)
        async with self.svc.sessions() as session:  # no tool_parser given: a registered model keeps its own
            spec = await repo.upsert_model(session, spec, keep_tool_parser="tool_parser" not in a.model_fields_set)
            await session.commit()
        await self.svc.sync_catalog()
        return spec.model_dump(mode="json")

    async def model_update(self, a: UpdateArgs) -> dict:
        """Set or clear a model's tool parser; the workers see it through the catalog bucket."""
        async with self.svc.sessions() as session:
            spec = await repo.set_tool_parser(session, a.slug, a.tool_parser)
            await session.commit()
        if spec is None:
            raise AdminError("not_found", f"no model {a.slug!r} in the catalog")
        await self.svc.sync_catalog()
        return spec.model_dump(mode="json")

    async def model_list(self, _: NoArgs) -> list[dict]:
        async with self.svc.sessions() as session:
            specs = await repo.list_models(session)
        return [s.model_dump(mode="json") for s in specs]

    async def model_remove(self, a: SlugArgs) -> dict:
        async with self.svc.sessions() as session:
            removed = await repo.remove_model(session, a.slug)
            await session.commit()
        if not removed:
            raise AdminError("not_found", f"no model {a.slug!r} in the catalog")
        await self.svc.sync_catalog()
        return {"removed": a.slug}

    async def worker_list(self, _: NoArgs) -> list[dict]:
        live = seen_workers(self.svc.workers, self.svc.settings.heartbeat_timeout_s)
        return [w.model_dump(mode="json") for w in live]

    async def placement_history(self, a: HistoryArgs) -> list[dict]:
        async with self.svc.sessions() as session:
            rows = await repo.recent_plans(session, a.limit)
        return [{"plan_id": r.plan_id, "created_at": r.created_at.isoformat(), "inputs": r.inputs,
                 "prewarm_set": r.prewarm_set} for r in rows]


    async def worker_drain(self, a: WorkerArgs) -> dict:
        """Take a worker out of service: no new instances or copies; its instances drain and stop, its
        prewarmed copies are evicted. Undrain puts it back."""
        if a.worker_id not in self.svc.workers.items:
            raise AdminError("not_found", f"no worker {a.worker_id!r} (warmserve workers lists them)")
        return await _hold(self.svc, OperatorHold(kind="drain", target=a.worker_id, reason=a.reason, at_s=time.time()))

    async def worker_undrain(self, a: WorkerArgs) -> dict:
        return await _release(self.svc, f"drain.{a.worker_id}", f"drain of worker {a.worker_id!r}")

    async def prewarm_pin(self, a: PinArgs) -> dict:
        """Keep ``copies`` prewarmed copies of a model whatever its forecast (they are never evicted)."""
        if a.slug not in self.svc.catalog.items:
            raise AdminError("not_found", f"no model {a.slug!r} in the catalog")
        return await _hold(self.svc, OperatorHold(kind="pin", target=a.slug, copies=a.copies, reason=a.reason,
                                                  at_s=time.time()))

    async def prewarm_unpin(self, a: UnpinArgs) -> dict:
        return await _release(self.svc, f"pin.{a.slug}", f"pin of model {a.slug!r}")

    async def hold_list(self, _: NoArgs | None = None) -> list[dict]:
        return [h.model_dump(mode="json") for _, h in sorted(self.svc.operator.items.items())]

    async def placement_show(self, _: NoArgs) -> dict:
        """The plan in force, with the newest inputs: forecasts, scores, skipped models, holds."""
        plan = self.svc.latest or self.svc.current
        if plan is None:
            return {"plan_id": None, "copies": [], "inputs": {}, "note": "no plan yet"}
        current = self.svc.current
        return {"plan_id": current.plan_id if current else None,
                "since": current.created_at_s if current else None,
                "copies": [c.model_dump() for c in (current.copies if current else [])],
                "inputs": plan.inputs, "holds": await self.hold_list()}

    async def key_create(self, a: KeyArgs) -> dict:
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

    async def key_list(self, _: NoArgs) -> list[dict]:
        async with self.svc.sessions() as session:
            rows = await repo.list_keys(session)
        return [{"name": r.name, "id": r.id, "prefix": r.prefix, "disabled": r.disabled,
                 "rate_limit_rps": r.rate_limit_rps, "max_concurrency": r.max_concurrency,
                 "created_at": r.created_at.isoformat()} for r in rows]

    async def _set_disabled(self, a: KeyNameArgs, disabled: bool) -> dict:
        name = a.name
        async with self.svc.sessions() as session:
            found = await repo.set_key_disabled(session, name, disabled)
            await session.commit()
        if not found:
            raise AdminError("not_found", f"no API key named {name!r}")
        await self.svc.sync_keys()
        return {"name": name, "disabled": disabled}

    async def key_disable(self, a: KeyNameArgs) -> dict:
        return await self._set_disabled(a, True)

    async def key_enable(self, a: KeyNameArgs) -> dict:
        return await self._set_disabled(a, False)


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
