"""PostgreSQL access: connections, versioned migrations, database create/drop for tests.

psycopg2 directly (no ORM): the hot paths write raw parametrized SQL.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

log = logging.getLogger(__name__)

#: Fail fast when PostgreSQL is down instead of hanging a child.
CONNECT_TIMEOUT_S = 5
#: Serialises concurrent `db migrate` runs (arbitrary constant).
MIGRATION_LOCK_ID = 0x6B7261697465

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL could not be reached; the message carries no password."""


#: psycopg2 errors that mean "the server is gone (or the transaction lost a deadlock): try again later".
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    DatabaseUnavailable,
)


def is_transient(e: BaseException) -> bool:
    """The one answer to "is the database down?": True for an outage, a dropped connection, a deadlock.

    Anything else (a constraint, a missing table, bad SQL) is a bug or a schema problem, not an outage.
    """
    return isinstance(e, _TRANSIENT_ERRORS)


def connect(url: str, *, application_name: str = "kraite-mp", autocommit: bool = False) -> Any:
    """A new connection; raises DatabaseUnavailable (password-free message) when it fails."""
    try:
        conn = psycopg2.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name=application_name)
    except psycopg2.OperationalError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "connection failed"
        raise DatabaseUnavailable(f"PostgreSQL unavailable: {first_line}") from None
    conn.autocommit = autocommit
    return conn


def migrations() -> list[tuple[str, str]]:
    """(version, sql) for every bundled migration, in order."""
    found = []
    for entry in resources.files("kraite_mp.store.migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            found.append((entry.name[:-4], entry.read_text()))
    return sorted(found)


def migrate(conn: Any) -> list[str]:
    """Apply pending migrations, each in its own transaction; return the versions applied."""
    applied_now: list[str] = []
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        try:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.commit()
            cur.execute("SELECT version FROM schema_migrations")
            done = {r[0] for r in cur.fetchall()}
            for version, text in migrations():
                if version in done:
                    continue
                log.info("applying migration %s", version)
                cur.execute(text)
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                conn.commit()
                applied_now.append(version)
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
            conn.commit()
    return applied_now


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database (handles ?host=/socket/dir URLs)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def create_database(admin_url: str, dbname: str) -> str:
    conn = connect(admin_url, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    finally:
        conn.close()
    return with_database(admin_url, dbname)


def drop_database(admin_url: str, dbname: str) -> None:
    conn = connect(admin_url, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
    finally:
        conn.close()
