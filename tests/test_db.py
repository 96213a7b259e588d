"""Schema migrations on the session database (real PostgreSQL)."""

from __future__ import annotations

import pytest

from kraite_mp.store import db as kdb


@pytest.mark.integration
def test_migrate_twice_is_a_noop(database_url: str) -> None:
    conn = kdb.connect(database_url)
    try:
        assert kdb.migrate(conn) == []
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM schema_migrations")
            assert cur.fetchone()[0] == len(kdb.migrations())
            cur.execute("SELECT reloptions FROM pg_class WHERE relname = 'exchange_symbols'")
            assert any(o.startswith("fillfactor=") for o in cur.fetchone()[0])
    finally:
        conn.close()
