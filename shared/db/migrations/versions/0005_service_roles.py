"""service roles: placement, orchestrator and forecaster each get a NOLOGIN role limited to their tables

Login users in these roles are created with passwords the operator supplies (``warmserve migrate`` with
WARMSERVE_DB_<SERVICE>_PASSWORD, or ``warmserve up`` with generated ones): see shared/db/roles.py.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
from sqlalchemy import text

from shared.db.roles import group_role, login_role, quote, role_exists

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# What each service does with each table (shared/db/repo.py, services/*/main.py and admin.py). Foreign-key
# checks and ON DELETE CASCADE run as the tables' owner, so removing a model needs no grant on its history.
GRANTS = {
    "placement": {  # the catalog and API keys (admin verbs, mirrored to KV), plan history
        "models": "select, insert, update, delete",
        "api_keys": "select, insert, update",
        "placement_decisions": "select, insert",
    },
    "orchestrator": {  # worker events and the workers seen
        "model_events": "select, insert",  # select: inserts return the new id
        "workers": "select, insert, update",
    },
    "forecaster": {  # known models, observed load and forecasts
        "models": "select",
        "observed_load": "select, insert, update",
        "forecasts": "select, insert, update",
    },
}
SERIAL = ("placement_decisions", "model_events", "observed_load", "forecasts")  # bigserial ids


def _names(conn):
    database = conn.execute(text("select current_database()")).scalar_one()
    schema = conn.execute(text("select current_schema()")).scalar_one()
    return database, schema


def _sequence(conn, schema: str, table: str) -> str:
    return conn.execute(text("select pg_get_serial_sequence(:t, 'id')"), {"t": f'"{schema}"."{table}"'}).scalar_one()


def upgrade() -> None:
    conn = op.get_bind()
    database, schema = _names(conn)
    for service, tables in GRANTS.items():
        name = group_role(database, service)
        role = quote(conn, name)
        if role_exists(conn, name):
            can_login = conn.execute(text("select rolcanlogin or rolsuper from pg_roles where rolname = :n"),
                                     {"n": name}).scalar_one()
            if can_login:
                raise RuntimeError(f"role {name} exists and can log in (or is a superuser): WarmServe's service "
                                   "roles are NOLOGIN groups; rename or drop that role, then migrate again")
        else:
            conn.exec_driver_sql(f"create role {role} nologin")
        conn.exec_driver_sql(f"grant connect on database {quote(conn, database)} to {role}")
        conn.exec_driver_sql(f"grant usage on schema {quote(conn, schema)} to {role}")
        for table, privileges in tables.items():
            conn.exec_driver_sql(f"grant {privileges} on table {quote(conn, schema)}.{quote(conn, table)} to {role}")
            if table in SERIAL and "insert" in privileges:
                conn.exec_driver_sql(f"grant usage on sequence {_sequence(conn, schema, table)} to {role}")


def downgrade() -> None:
    conn = op.get_bind()
    database, schema = _names(conn)
    for service, tables in GRANTS.items():
        login = login_role(database, service)
        if role_exists(conn, login):
            conn.exec_driver_sql(f"drop role {quote(conn, login)}")
        name = group_role(database, service)
        if not role_exists(conn, name):
            continue
        role = quote(conn, name)
        for table in tables:
            conn.exec_driver_sql(f"revoke all on table {quote(conn, schema)}.{quote(conn, table)} from {role}")
            if table in SERIAL:
                conn.exec_driver_sql(f"revoke all on sequence {_sequence(conn, schema, table)} from {role}")
        conn.exec_driver_sql(f"revoke all on schema {quote(conn, schema)} from {role}")
        conn.exec_driver_sql(f"revoke all on database {quote(conn, database)} from {role}")
        conn.exec_driver_sql(f"drop role {role}")
