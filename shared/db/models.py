"""Tables. Postgres is the system of record for the catalog and for history; current state
lives in NATS KV."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Model(Base):
    """The model catalog: what can be placed and served."""

    __tablename__ = "models"

    slug: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    parameter_bytes: Mapped[int] = mapped_column(BigInteger)
    tensor_parallel_size: Mapped[int] = mapped_column(Integer, default=1)
    max_context_tokens: Mapped[int] = mapped_column(Integer, default=2048)
    status: Mapped[str] = mapped_column(String(16), default="active")
    tool_parser: Mapped[str | None] = mapped_column(String(64), nullable=True)  # vLLM's, for tool_choice "auto"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Worker(Base):
    """Workers ever seen; ``last_seen`` is refreshed from their heartbeats."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(64))
    memory_budget_bytes: Mapped[int] = mapped_column(BigInteger)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PlacementDecision(Base):
    """One row per placement plan: a summary of its inputs and the resulting prewarm set."""

    __tablename__ = "placement_decisions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    plan_id: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    inputs: Mapped[dict] = mapped_column(JSONB)
    prewarm_set: Mapped[list] = mapped_column(JSONB)


class ModelEvent(Base):
    """Prewarm and instance history: load, activate, evict... with bytes and seconds."""

    __tablename__ = "model_events"
    __table_args__ = (Index("ix_model_events_model_at", "model", "at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64), ForeignKey("models.slug", ondelete="CASCADE"))
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(String(255), default="")


class ForecastRecord(Base):
    """A forecast for one model, window and lead (1 = the next window when it was made); the observed
    values are filled in when the window ends, so accuracy is a query."""

    __tablename__ = "forecasts"
    __table_args__ = (Index("ix_forecasts_model_window_lead", "model", "window_start", "lead", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64), ForeignKey("models.slug", ondelete="CASCADE"))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_s: Mapped[float] = mapped_column(Float)
    lead: Mapped[int] = mapped_column(Integer, default=1)
    method: Mapped[str] = mapped_column(String(64))
    method_avg: Mapped[str | None] = mapped_column(String(64), nullable=True)
    predicted_avg: Mapped[float] = mapped_column(Float)
    predicted_avg_upper: Mapped[float | None] = mapped_column(Float, nullable=True)
    predicted_peak: Mapped[float] = mapped_column(Float)
    predicted_peak_upper: Mapped[float] = mapped_column(Float)
    note: Mapped[str | None] = mapped_column(String(255), nullable=True)
    observed_avg: Mapped[float | None] = mapped_column(Float, nullable=True)
    observed_peak: Mapped[float | None] = mapped_column(Float, nullable=True)
    made_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ObservedLoad(Base):
    """A model's observed concurrency per window: the forecaster's history. ``source`` is ``live`` (from
    gateways) or ``import`` (seeded from a trace file); live rows are never overwritten by imports."""

    __tablename__ = "observed_load"
    __table_args__ = (Index("ix_observed_load_model_window", "model", "window_start", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64), ForeignKey("models.slug", ondelete="CASCADE"))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_s: Mapped[float] = mapped_column(Float)
    avg: Mapped[float] = mapped_column(Float)
    peak: Mapped[float] = mapped_column(Float)
    arrivals: Mapped[int] = mapped_column(BigInteger, default=0)
    source: Mapped[str] = mapped_column(String(16), default="live")


class ApiKey(Base):
    """Client API keys. Only a SHA-256 hash is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    rate_limit_rps: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
