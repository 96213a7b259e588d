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
#: Numbers that no migration has: the seed schema skipped 0002 (no migration ever had it). A deployed database records the
#: versions it applied, so numbers are never renumbered or reused; every new migration takes the next one.
RETIRED_MIGRATION_NUMBERS = frozenset({2})


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL could not be reached; the message carries no password."""


class DatabaseRefused(DatabaseUnavailable):
    """The server answered but refuses this ``database_url`` (no such database or role, wrong password,
    no pg_hba.conf entry): a configuration error, not an outage, for a command that starts."""


#: Connection errors in which the server itself refused the URL's database, user or password.
_REFUSED_PATTERNS = (
    re.compile(r'database ".*" does not exist'),
    re.compile(r'role ".*" does not exist'),
    re.compile(r"password authentication failed"),
    re.compile(r"no pg_hba\.conf entry"),
)


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


class TripCursor(psycopg2.extensions.cursor):  # type: ignore[misc]
    """One transaction on an autocommit connection, in as few round trips as its statements allow.

    psycopg2 sends BEGIN and COMMIT as round trips of their own: six for a streamed order frame (BEGIN,
    the audit insert, the order's select-for-update, its update, the transition insert, COMMIT), each a
    wake-up of the worker and of its PostgreSQL backend. Here ``begin()`` makes BEGIN travel with the next
    statement, ``defer()`` holds a statement whose result nobody reads until the next one or the COMMIT,
    and ``commit()`` / ``rollback()`` end the transaction (in autocommit mode the connection's own do
    nothing). The same frame then takes four round trips. Statements sent together run as one simple
    query: the first error stops the rest, and the transaction is left aborted until it is rolled back.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ahead: list[str] = []

    def begin(self) -> None:
        self._ahead.append("BEGIN")

    def defer(self, query: str, params: Any = None) -> None:
        """``query`` sent with the next statement (or the COMMIT): for a result nobody reads."""
        codec = psycopg2.extensions.encodings[self.connection.encoding]
        self._ahead.append(self.mogrify(query, params).decode(codec))

    def execute(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - psycopg2's own parameter name
        if self._ahead:
            ahead = "; ".join(self._ahead) + "; "
            self._ahead = []
            if vars is not None:  # the statements ahead are already bound: their % signs are text
                ahead = ahead.replace("%", "%%")
            query = ahead + (query if isinstance(query, str) else query.as_string(self))
        super().execute(query, vars)

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self._ahead = []
        super().execute("ROLLBACK")


def execute_later(cur: Any, query: str, params: Any = None) -> None:
    """Run ``query``, whose result nobody reads, now, or with the next statement on a ``TripCursor``."""
    defer = getattr(cur, "defer", None)
    if defer is not None:
        defer(query, params)
    else:
        cur.execute(query, params)


def end_transaction(conn: Any) -> None:
    """Roll back whatever transaction ``conn`` is in, autocommit (a ``TripCursor``'s) or not."""
    if not conn.autocommit:
        conn.rollback()
    elif conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")


def connect(url: str, *, application_name: str = "kraite-mp", autocommit: bool = False) -> Any:
    """A new connection; raises DatabaseUnavailable (password-free message) when it fails."""
    try:
        conn = psycopg2.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name=application_name)
    except psycopg2.OperationalError as e:
        text = str(e).strip()
        first_line = text.splitlines()[0] if text else "connection failed"
        refused = next((m.group(0) for m in (p.search(text) for p in _REFUSED_PATTERNS) if m), None)
        if refused is not None:
            raise DatabaseRefused(f"PostgreSQL refused database_url: {refused}") from None
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


class SchemaNotReady(RuntimeError):
    """The database has no kraite-mp schema, or bundled migrations are not applied yet."""


def pending_migrations(conn: Any) -> list[str]:
    """The bundled migrations this database has not applied (all of them on an empty database)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done: set[str] = set()
        if cur.fetchone()[0]:
            cur.execute("SELECT version FROM schema_migrations")
            done = {r[0] for r in cur.fetchall()}
    conn.commit()
    return [version for version, _ in migrations() if version not in done]


def check_schema(conn: Any) -> None:
    """Raise SchemaNotReady (one line that says what to run) unless every bundled migration is applied."""
    pending = pending_migrations(conn)
    if not pending:
        return
    if len(pending) == len(migrations()):
        raise SchemaNotReady("the database has no kraite-mp schema: run `kraite-mp db migrate`")
    raise SchemaNotReady(
        f"the database schema is behind ({len(pending)} migration(s) pending: {', '.join(pending)}):"
        " run `kraite-mp db migrate`"
    )


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
