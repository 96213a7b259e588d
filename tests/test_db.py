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


@pytest.mark.integration
def test_check_schema_names_what_is_missing(pg_admin_url: str) -> None:
    import uuid

    name = f"kraite_schema_{uuid.uuid4().hex[:8]}"
    url = kdb.create_database(pg_admin_url, name)
    try:
        conn = kdb.connect(url)
        try:
            everything = [v for v, _ in kdb.migrations()]
            assert kdb.pending_migrations(conn) == everything
            with pytest.raises(
                kdb.SchemaNotReady,
                match=r"^the database has no kraite-mp schema: run `kraite-mp db migrate`$",
            ):
                kdb.check_schema(conn)
            kdb.migrate(conn)
            kdb.check_schema(conn)
            with conn.cursor() as cur:  # as if this release brought a migration the database has not seen
                cur.execute("DELETE FROM schema_migrations WHERE version = %s", (everything[-1],))
            conn.commit()
            with pytest.raises(
                kdb.SchemaNotReady, match=rf"behind \(1 migration\(s\) pending: {everything[-1]}\)"
            ):
                kdb.check_schema(conn)
        finally:
            conn.close()
    finally:
        kdb.drop_database(pg_admin_url, name)


@pytest.mark.unit
def test_migration_numbers_are_unique_and_contiguous_but_for_the_retired_ones() -> None:
    numbers = [int(v[:4]) for v, _ in kdb.migrations()]
    assert len(numbers) == len(set(numbers)), "two migrations with one number"
    expected = [n for n in range(1, max(numbers) + 1) if n not in kdb.RETIRED_MIGRATION_NUMBERS]
    assert numbers == expected, "a new migration takes the next number; a retired one is never reused"
