"""Forecaster verbs on ``warmserve.admin.forecast.<verb>``: status, import (seed a model's history from a
trace) and reload (rebuild every forecaster from stored history)."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from shared.admin import FORECASTER_VERBS, Dispatcher, ImportArgs, NoArgs
from shared.db import repo
from shared.policy.forecast import WindowObservation
from shared.policy.history import align_before, place_before

log = logging.getLogger("warmserve.forecaster")


class ForecasterAdmin:
    """The verbs, over the service's core, history and publishing (``svc`` is the ``Forecaster`` shell)."""

    def __init__(self, svc):
        self.svc = svc
        self.dispatcher = Dispatcher(FORECASTER_VERBS, {"status": self._status, "reload": self._reload,
                                                        "import": self._import})

    async def on_admin(self, msg: Msg) -> None:
        await self.dispatcher.on_message(self.svc.nc, msg)

    async def _status(self, _: NoArgs) -> dict:
        return self.status()

    async def _reload(self, _: NoArgs) -> dict:
        async with self.svc.busy:
            return await self.reload()

    async def _import(self, args: ImportArgs) -> dict:
        async with self.svc.busy:
            return await self.import_history(args)

    def status(self) -> dict:
        models = []
        for model in sorted(set(self.svc.catalog.items) | set(self.svc.core.series)):
            fc = self.svc.core.latest.get(model)
            pair = self.svc.core.series.get(model)
            models.append({
                "model": model, "history_windows": len(pair.peak.history) if pair else 0,
                "method": fc.method if fc else None, "method_avg": fc.method_avg if fc else None,
                "note": fc.note if fc else "no forecast yet",
                "next": fc.points[0].model_dump() if fc and fc.points else None,
                "peak_errors": pair.peak.errors() if pair else {},
            })
        return {"window_s": self.svc.settings.window_s, "caught_up": self.svc.caught_up.is_set(),
                "late_samples": self.svc.core.book.late, "pending_writes": len(self.svc.outbox), "rounds": self.svc.rounds,
                "models": models}

    async def import_history(self, args: ImportArgs) -> dict:
        """Seed a model's history from a trace: the trace's windows go right before its oldest stored
        window (or before the current window), keeping time of day; nothing stored is overwritten."""
        if args.model not in self.svc.catalog.items:
            raise ValueError(f"model {args.model!r} is not in the catalog (warmserve model list)")
        if abs(args.window_s - self.svc.settings.window_s) > 1e-6:
            raise ValueError(f"the trace was cut into {args.window_s:g} s windows; this forecaster uses "
                             f"{self.svc.settings.window_s:g} s (WARMSERVE_WINDOW_S)")
        w = self.svc.settings.window_s
        async with self.svc.sessions() as session:
            first = await repo.first_observed(session, args.model)
        end = first if first is not None else self.svc.core.book.next_start.get(args.model, self.svc.core.book.window_of(time.time()))
        series = [WindowObservation(i * w, a, p, n) for i, (a, p, n) in enumerate(args.windows)]
        aligned = (place_before if args.align == "end" else align_before)(series, w, end)
        async with self.svc.sessions() as session:
            written = await repo.record_observations(session, args.model, w, aligned, source="import")
            await session.commit()
        self.svc.core.book.resume(args.model, end)  # live samples before the imported history are not expected
        rebuilt = await self.reload([args.model])
        return {"model": args.model, "windows_written": written, "from_s": aligned[0].start_s,
                "to_s": aligned[-1].start_s + w, "source": args.source, **rebuilt}

    async def reload(self, models: list[str] | None = None) -> dict:
        """Re-read history (after ``warmserve forecast import``) and rebuild every model's forecaster."""
        await self.svc.flush()
        if len(self.svc.outbox):
            raise RuntimeError("Postgres is not taking writes; reload would lose queued windows")
        history = await self.svc.load_history(asyncio.Event())
        if models is not None:
            history = {m: history[m] for m in models if m in history}
        await asyncio.to_thread(self.svc.core.rebuild, history)
        targets = sorted(self.svc.catalog.items) if models is None else models
        await self.svc.publish(await asyncio.to_thread(self.svc.core.forecast, targets, time.time()))
        await self.svc.flush()
        return {"models": len(history), "windows": sum(len(v) for v in history.values())}
