"""Database roles: each service that uses Postgres gets a role limited to its own tables.

Migration 0005 creates one ``NOLOGIN`` group role per service (``<database>_<service>``, e.g.
``warmserve_placement``) with the grants that service needs; a login user (``<database>_<service>_login``)
is a member of it and is what the service's URL names. The gateway and the workers get no database
access at all: API keys and the catalog reach them through NATS KV, written only by placement.

Roles are cluster-wide in Postgres, so the names carry the database's: two WarmServe databases on one
server (or the tests' many) never share a role. Tables added by later migrations need their own grants.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url

from shared.db.engine import sqlalchemy_url

SERVICES = ("placement", "orchestrator", "forecaster")
NAMEDATALEN = 63  # Postgres truncates longer identifiers


def _name(database: str, suffix: str) -> str:
    name = f"{database}_{suffix}"
    if len(name.encode()) <= NAMEDATALEN:
        return name
    digest = hashlib.sha256(database.encode()).hexdigest()[:8]  # a long database name: prefix + hash
    room = NAMEDATALEN - len(suffix) - len(digest) - 2
    prefix = database.encode()[:room].decode(errors="ignore")
    return f"{prefix}_{digest}_{suffix}"


def group_role(database: str, service: str) -> str:
    """The ``NOLOGIN`` role holding ``service``'s grants in ``database``."""
    _check(service)
    return _name(database, service)


def login_role(database: str, service: str) -> str:
    """The login user ``service`` connects as (a member of its group role)."""
    _check(service)
    return _name(database, f"{service}_login")


def _check(service: str) -> None:
    if service not in SERVICES:
        raise ValueError(f"no database role for {service!r}: only {', '.join(SERVICES)} use the database")


def quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def role_exists(conn: Connection, name: str) -> bool:
    return bool(conn.execute(text("select 1 from pg_roles where rolname = :n"), {"n": name}).scalar())


def ensure_login(url: str, service: str, password: str) -> str:
    """Create (or update the password of) ``service``'s login user in the database of ``url``, which must
    be an owner's URL with the right to create roles (the one migrations run with). Returns the
    service's URL: ``url`` with the login user and password in it. The server is sent the password's
    SCRAM-SHA-256 verifier, never the password: DDL lands in the server's log (log_statement=ddl)."""
    if not password:
        raise ValueError(f"an empty password for the {service} database user")
    target = make_url(sqlalchemy_url(url))
    engine = create_engine(target, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            database = conn.execute(text("select current_database()")).scalar_one()
            group, login = group_role(database, service), login_role(database, service)
            if not role_exists(conn, group):
                raise RuntimeError(f"role {group} is missing: bring the database to the latest schema first "
                                   "(warmserve migrate)")
            secret = _literal(conn, scram_verifier(conn, login, password))
            verb = "alter" if role_exists(conn, login) else "create"
            conn.exec_driver_sql(f"{verb} role {quote(conn, login)} login inherit nosuperuser nocreatedb "
                                 f"nocreaterole nobypassrls password {secret}")
            conn.exec_driver_sql(f"grant {quote(conn, group)} to {quote(conn, login)}")
    finally:
        engine.dispose()
    return service_url(url, login, password)


def service_url(url: str, user: str, password: str) -> str:
    """``url`` (any scheme WarmServe accepts) with another user and password."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    return parsed.set(username=user, password=password).render_as_string(hide_password=False)


def scram_verifier(conn: Connection, user: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores for ``password`` (``SCRAM-SHA-256$<iterations>:<salt>$
    <StoredKey>:<ServerKey>``), computed here by libpq (PQencryptPasswordConn) with a random salt."""
    pgconn = conn.connection.driver_connection.pgconn
    return pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()


def _literal(conn: Connection, value: str) -> str:
    """A string literal for DDL (which takes no parameters), quoted by psycopg itself."""
    from psycopg import sql

    return sql.Literal(value).as_string(conn.connection.driver_connection)
