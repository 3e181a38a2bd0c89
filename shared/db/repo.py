"""Queries the services share. Each function takes a session and commits nothing itself
unless its name says so, so callers control transactions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.admin import check_tool_parser
from shared.apikeys import hash_key, new_key
from shared.db.models import ApiKey, ForecastRecord, Model, ModelEvent, ObservedLoad, PlacementDecision, Worker
from shared.messages import (
    ApiKeyRecord, Forecast, ForecastPoint, ModelSpec, ModelStatus, PlacementPlan, WorkerEvent, WorkerState, new_id,
)
from shared.policy.forecast import WindowObservation
from shared.subjects import check_token

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # fullmatch


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def to_spec(row: Model) -> ModelSpec:
    return ModelSpec(
        slug=row.slug, path=row.path, parameter_bytes=row.parameter_bytes,
        tensor_parallel_size=row.tensor_parallel_size, max_context_tokens=row.max_context_tokens,
        status=ModelStatus(row.status), tool_parser=row.tool_parser,
    )


async def upsert_model(session: AsyncSession, spec: ModelSpec, *, keep_tool_parser: bool = False) -> ModelSpec:
    """Add or replace a catalog row; returns it as stored. ``keep_tool_parser``: a row that exists keeps its
    tool parser (registering again without naming one, as ``warmserve up`` does, clears nothing)."""
    values = dict(
        slug=spec.slug, path=spec.path, parameter_bytes=spec.parameter_bytes,
        tensor_parallel_size=spec.tensor_parallel_size, max_context_tokens=spec.max_context_tokens,
        status=spec.status.value, tool_parser=spec.tool_parser,
    )
    kept = {"slug"} | ({"tool_parser"} if keep_tool_parser else set())
    stmt = insert(Model).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Model.slug],
        set_={k: stmt.excluded[k] for k in values if k not in kept} | {"updated_at": datetime.now(timezone.utc)},
    ).returning(Model).execution_options(populate_existing=True)  # a row this session holds is refreshed
    row = (await session.execute(stmt)).scalar_one()
    return to_spec(row)


async def set_tool_parser(session: AsyncSession, slug: str, tool_parser: str | None) -> ModelSpec | None:
    """Set (or, with None, clear) a model's tool parser; None if there is no such model."""
    row = (await session.execute(
        update(Model).where(Model.slug == slug)
        .values(tool_parser=tool_parser, updated_at=datetime.now(timezone.utc)).returning(Model)
    )).scalar_one_or_none()
    return to_spec(row) if row is not None else None


async def list_models(session: AsyncSession) -> list[ModelSpec]:
    rows = (await session.execute(select(Model).order_by(Model.slug))).scalars().all()
    return [to_spec(r) for r in rows]


async def catalog_entries(session: AsyncSession) -> tuple[dict[str, ModelSpec], dict[str, str]]:
    """The catalog as placement publishes it, each row read on its own: (slug -> entry, slug -> why) for the
    rows that are valid entries and those that are not (a slug that cannot be a subject token or KV key, an
    unknown status, a malformed tool parser: rows written around the admin verbs), so one bad row cannot hold back the others."""
    rows = (await session.execute(select(Model).order_by(Model.slug))).scalars().all()
    good, bad = {}, {}
    for row in rows:
        try:
            check_token(row.slug, "model slug")
            if row.tool_parser is not None:
                check_tool_parser(row.tool_parser)
            good[row.slug] = to_spec(row)
        except ValueError as exc:
            bad[row.slug] = " ".join(str(exc).split())
    return good, bad


async def model_slugs(session: AsyncSession) -> list[str]:
    return list((await session.execute(select(Model.slug))).scalars().all())


async def remove_model(session: AsyncSession, slug: str) -> bool:
    result = await session.execute(delete(Model).where(Model.slug == slug))
    return result.rowcount > 0


async def touch_worker(session: AsyncSession, state: WorkerState) -> None:
    stmt = insert(Worker).values(
        id=state.worker_id, node=state.node, device=state.device,
        memory_budget_bytes=state.memory_budget_bytes, last_seen=_ts(state.heartbeat_at_s),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Worker.id],
        set_={"node": stmt.excluded.node, "device": stmt.excluded.device,
              "memory_budget_bytes": stmt.excluded.memory_budget_bytes, "last_seen": stmt.excluded.last_seen},
    )
    await session.execute(stmt)


async def record_event(session: AsyncSession, event: WorkerEvent) -> None:
    """Store a worker event once (replays of the same event_id are ignored)."""
    stmt = insert(ModelEvent).values(
        event_id=event.event_id, at=_ts(event.at_s), worker_id=event.worker_id, model=event.model,
        from_state=event.from_state.value, to_state=event.to_state.value, bytes=event.bytes,
        seconds=event.seconds, reason=event.reason[:255],
    ).on_conflict_do_nothing(index_elements=[ModelEvent.event_id])
    await session.execute(stmt)


async def record_plan(session: AsyncSession, plan: PlacementPlan) -> None:
    stmt = insert(PlacementDecision).values(
        plan_id=plan.plan_id, created_at=_ts(plan.created_at_s), inputs=plan.inputs,
        prewarm_set=[c.model_dump(exclude_defaults=True) for c in plan.copies],  # devices only for groups
    ).on_conflict_do_nothing(index_elements=[PlacementDecision.plan_id])
    await session.execute(stmt)


async def record_forecast(session: AsyncSession, fc: Forecast) -> None:
    """Store (or refresh) a forecast: one row per window of its horizon, keyed by model, window and lead."""
    points = fc.points or [ForecastPoint(window_start_s=fc.window_start_s, avg=fc.predicted_avg,
                                         avg_upper=fc.predicted_avg_upper, peak=fc.predicted_peak,
                                         peak_upper=fc.predicted_peak_upper)]
    rows = [dict(model=fc.model, window_start=_ts(p.window_start_s), window_s=fc.window_s, lead=lead,
                 method=fc.method, method_avg=fc.method_avg or None, predicted_avg=p.avg,
                 predicted_avg_upper=p.avg_upper, predicted_peak=p.peak, predicted_peak_upper=p.peak_upper,
                 note=fc.note[:255] or None, made_at=_ts(fc.made_at_s))
            for lead, p in enumerate(points, start=1)]
    stmt = insert(ForecastRecord).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ForecastRecord.model, ForecastRecord.window_start, ForecastRecord.lead],
        set_={k: stmt.excluded[k] for k in ("method", "method_avg", "predicted_avg", "predicted_avg_upper",
                                            "predicted_peak", "predicted_peak_upper", "note", "made_at")},
    )
    await session.execute(stmt)


async def record_observed(session: AsyncSession, model: str, window_start_s: float,
                          observed_avg: float, observed_peak: float) -> None:
    """Fill in what actually happened in a window on every forecast made for it."""
    await session.execute(update(ForecastRecord).where(
        ForecastRecord.model == model, ForecastRecord.window_start == _ts(window_start_s),
    ).values(observed_avg=observed_avg, observed_peak=observed_peak))


async def record_observations(session: AsyncSession, model: str, window_s: float,
                              observations: Sequence[WindowObservation], source: str = "live") -> int:
    """Store observed windows. Live rows replace what is there (a replayed window is the same window);
    imported rows never overwrite anything. Returns the rows written."""
    if not observations:
        return 0
    written = 0
    for chunk in range(0, len(observations), 1000):
        rows = [dict(model=model, window_start=_ts(o.start_s), window_s=window_s, avg=o.avg, peak=o.peak,
                     arrivals=o.arrivals, source=source) for o in observations[chunk:chunk + 1000]]
        stmt = insert(ObservedLoad).values(rows)
        keys = [ObservedLoad.model, ObservedLoad.window_start]
        if source == "live":
            stmt = stmt.on_conflict_do_update(index_elements=keys, set_={
                k: stmt.excluded[k] for k in ("window_s", "avg", "peak", "arrivals", "source")})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=keys)
        written += len((await session.execute(stmt.returning(ObservedLoad.id))).all())
    return written


async def observed_history(session: AsyncSession, since_s: float) -> dict[str, list[WindowObservation]]:
    """Every model's observed windows since ``since_s``, oldest first."""
    q = (select(ObservedLoad.model, ObservedLoad.window_start, ObservedLoad.avg, ObservedLoad.peak,
                ObservedLoad.arrivals)
         .where(ObservedLoad.window_start >= _ts(since_s))
         .order_by(ObservedLoad.model, ObservedLoad.window_start))
    out: dict[str, list[WindowObservation]] = {}
    for model, start, avg, peak, arrivals in (await session.execute(q)).all():
        out.setdefault(model, []).append(WindowObservation(start.timestamp(), avg, peak, arrivals))
    return out


async def first_observed(session: AsyncSession, model: str) -> float | None:
    """Start of a model's oldest observed window (an import goes before it)."""
    value = (await session.execute(select(func.min(ObservedLoad.window_start))
                                   .where(ObservedLoad.model == model))).scalar_one_or_none()
    return value.timestamp() if value is not None else None


async def forecast_accuracy(session: AsyncSession, since_s: float, lead: int = 1) -> list[dict]:
    """Per model and method: forecasts with observed values since ``since_s`` (the inputs of MAPE)."""
    q = (select(ForecastRecord.model, ForecastRecord.method, ForecastRecord.predicted_avg,
                ForecastRecord.predicted_peak, ForecastRecord.predicted_peak_upper,
                ForecastRecord.observed_avg, ForecastRecord.observed_peak)
         .where(ForecastRecord.window_start >= _ts(since_s), ForecastRecord.lead == lead,
                ForecastRecord.observed_peak.is_not(None))
         .order_by(ForecastRecord.model, ForecastRecord.window_start))
    return [dict(r._mapping) for r in (await session.execute(q)).all()]


async def newest_plan_at(session: AsyncSession) -> float | None:
    """When the newest stored plan was made (plan history resumes from there after a restart)."""
    value = (await session.execute(select(func.max(PlacementDecision.created_at)))).scalar_one_or_none()
    return value.timestamp() if value is not None else None


async def recent_plans(session: AsyncSession, limit: int = 10) -> list[PlacementDecision]:
    q = select(PlacementDecision).order_by(PlacementDecision.id.desc()).limit(limit)
    return list((await session.execute(q)).scalars().all())


async def create_key(session: AsyncSession, name: str, rate_limit_rps: float | None = None,
                     max_concurrency: int | None = None) -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned here and nowhere else."""
    plaintext = new_key()
    row = ApiKey(id=new_id(), name=name, key_hash=hash_key(plaintext), prefix=plaintext[:8], disabled=False,
                 rate_limit_rps=rate_limit_rps, max_concurrency=max_concurrency)
    session.add(row)
    await session.flush()
    return row, plaintext


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list((await session.execute(select(ApiKey).order_by(ApiKey.name))).scalars().all())


async def set_key_disabled(session: AsyncSession, name: str, disabled: bool) -> bool:
    row = (await session.execute(select(ApiKey).where(ApiKey.name == name))).scalar_one_or_none()
    if row is None:
        return False
    row.disabled = disabled
    return True


async def key_records(session: AsyncSession) -> tuple[dict[str, ApiKeyRecord], dict[str, str]]:
    """API keys as placement publishes them, each row read on its own: (hash -> record, name -> why) for the
    rows that are valid and those that are not (a hash that is no SHA-256 hex digest cannot be a KV key)."""
    good, bad = {}, {}
    for row in await list_keys(session):
        try:
            if not isinstance(row.key_hash, str) or not _SHA256_HEX.fullmatch(row.key_hash):
                raise ValueError("its key_hash is not a SHA-256 hex digest")
            good[row.key_hash] = key_record(row)
        except ValueError as exc:
            bad[row.name] = " ".join(str(exc).split())
    return good, bad


def key_record(row: ApiKey) -> ApiKeyRecord:
    return ApiKeyRecord(id=row.id, name=row.name, disabled=row.disabled, rate_limit_rps=row.rate_limit_rps,
                        max_concurrency=row.max_concurrency)
