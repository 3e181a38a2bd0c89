"""Run Alembic migrations from code (``warmserve migrate`` and ``warmserve up`` call this)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from shared.db.engine import sqlalchemy_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # alembic's ini interpolation treats % specially
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def ensure_database(url: str) -> None:
    """Create the URL's database if the server lacks it (a fresh embedded or CI Postgres)."""
    target = sqlalchemy_url(url)
    from sqlalchemy.engine import make_url

    parsed = make_url(target)
    name = parsed.database or "postgres"
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("select 1 from pg_database where datname = :n"), {"n": name}).scalar()
            if not exists:
                conn.execute(text(f'create database "{name}"'))
    finally:
        admin.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    ensure_database(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
