"""Config, accounts, migrations, backoff: the foundation every other piece stands on."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from kraite_mp.backoff import backoff_delay
from kraite_mp.config import ConfigError, load_settings, parse_shard
from kraite_mp.logs import redact, register_secret
from kraite_mp.store import db as kdb
from kraite_mp.store.accounts import add_account, decrypt_secret, list_accounts, set_active
from kraite_mp.supervisor.ownership import ModuloShard


@pytest.mark.unit
def test_backoff_sequence_is_capped_exponential() -> None:
    delays = [backoff_delay(a, jitter_ratio=0) for a in range(8)]
    assert delays == [1, 2, 4, 8, 16, 32, 32, 32]


@pytest.mark.unit
def test_backoff_jitter_bounded_and_varies() -> None:
    rng = random.Random(1)
    samples = [backoff_delay(3, jitter_ratio=0.1, rng=rng) for _ in range(200)]
    assert all(8 <= s <= 8.8 for s in samples)
    assert len(set(samples)) > 100
    with pytest.raises(ValueError):
        backoff_delay(-1)


@pytest.mark.unit
def test_config_defaults_are_production_binance(tmp_path) -> None:
    s = load_settings(None, environ={})
    assert s.binance.rest_url == "https://fapi.binance.com"
    assert s.binance.ws_url == "wss://fstream.binance.com"
    assert "ALGO_FILLED" in s.user_data_stream.binance.dispatched_executions
    assert "NEW" not in s.user_data_stream.binance.dispatched_executions


@pytest.mark.unit
def test_config_file_then_env_precedence(tmp_path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        'redis_url = "redis://127.0.0.1:1/0"\n[supervisor]\nhealthy_after_s = 5\n'
        '[user_data_stream.binance]\ndispatched_executions = ["TRADE"]\n'
    )
    s = load_settings(cfg, environ={"KRAITE_REDIS_URL": "redis://127.0.0.1:2/0", "KRAITE__supervisor__fatal_retry_s": "7"})
    assert s.redis_url == "redis://127.0.0.1:2/0"
    assert s.supervisor.healthy_after_s == 5.0
    assert s.supervisor.fatal_retry_s == 7.0
    assert s.user_data_stream.binance.dispatched_executions == ["TRADE"]
    shadow = load_settings(None, environ={"KRAITE__user_data_stream__binance__dispatched_executions": ""})
    assert shadow.user_data_stream.binance.dispatched_executions == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[supervisor]\nhealthy_after_s = 'soon'\n", {}, "supervisor.healthy_after_s"),
        ("[supervisor]\nno_such = 1\n", {}, "supervisor.no_such"),
        ("", {"KRAITE_BINANCE_WS_URL": "wss://fstream.binance.com/ws"}, "binance.ws_url"),
        ("", {"KRAITE__user_data_stream__binance__dispatched_executions": "TRADE,FILLD"}, "dispatched_executions"),
        ("", {"KRAITE__supervisor__shard": "3/2"}, "supervisor.shard"),
        ("not toml [", {}, "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text: str, env: dict[str, str], key: str) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_settings(cfg, environ=env)


@pytest.mark.unit
def test_check_config_cli_redacts_and_fails_clearly(tmp_path) -> None:
    env = {"KRAITE_SECRET_KEY": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=",
           "KRAITE_DATABASE_URL": "postgresql://u:hunter2pw@127.0.0.1/db", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "kraite_mp", "check-config"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "hunter2pw" not in ok.stdout and "c2VjcmV0" not in ok.stdout
    assert json.loads(ok.stdout)["database_url"] == "postgresql://u:***@127.0.0.1/db"
    bad = subprocess.run([sys.executable, "-m", "kraite_mp", "check-config"],
                         env={**env, "KRAITE__mark_price__strategy": "orm"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 78
    assert "mark_price.strategy" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.unit
def test_redaction_scrubs_registered_secrets_and_listen_keys() -> None:
    register_secret("s3cr3t-value-xyz")
    line = "GET /private/ws?listenKey=abcDEF123&events=X secret s3cr3t-value-xyz {\"listenKey\": \"zzzKEY\"}"
    out = redact(line)
    assert "abcDEF123" not in out and "s3cr3t-value-xyz" not in out and "zzzKEY" not in out


@pytest.mark.unit
def test_shard_ownership() -> None:
    assert parse_shard("all") is None
    assert parse_shard("1/4") == (1, 4)
    shard = ModuloShard(1, 4)

    class A:
        def __init__(self, i: int) -> None:
            self.id = i

    assert [i for i in range(10) if shard.owns(A(i))] == [1, 5, 9]  # type: ignore[arg-type]


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
def test_accounts_secret_encrypted_at_rest(db, secret_key: str) -> None:
    acct = add_account(db, secret_key, name="alice", api_key="AKEY1234567890", api_secret="plain-secret-42")
    with db.cursor() as cur:
        cur.execute("SELECT api_secret FROM accounts WHERE id = %s", (acct.id,))
        stored = cur.fetchone()[0]
    assert "plain-secret-42" not in stored
    assert decrypt_secret(secret_key, stored) == "plain-secret-42"
    assert "plain-secret-42" not in repr(acct)
    set_active(db, acct.id, False)
    assert list_accounts(db, active_only=True) == []


@pytest.mark.integration
def test_accounts_cli_roundtrip(kraite_env, db, tmp_path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("cli-secret-value-1\n")

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kraite_mp", *args], env=kraite_env, capture_output=True,
                              text=True, timeout=60, input=stdin)

    assert run("db", "migrate").stdout.strip() == "schema is up to date"
    r = run("accounts", "add", "--name", "bob", "--api-key", "BOBKEY0000000001", "--api-secret-file", str(secret_file))
    assert r.returncode == 0, r.stderr
    r = run("accounts", "add", "--name", "carol", "--api-key", "CAROLKEY00000001", "--api-secret-stdin",
            stdin="stdin-secret-value\n")
    assert r.returncode == 0, r.stderr
    dup = run("accounts", "add", "--name", "bob", "--api-key", "X" * 16, "--api-secret-stdin", stdin="x\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    listed = run("accounts", "list", "--json")
    data = json.loads(listed.stdout)
    assert [d["name"] for d in data] == ["bob", "carol"]
    assert "cli-secret-value-1" not in listed.stdout and "BOBKEY0000000001" not in listed.stdout
    assert run("accounts", "disable", str(data[0]["id"])).returncode == 0
    assert [d["active"] for d in json.loads(run("accounts", "list", "--json").stdout)] == [False, True]
    assert run("accounts", "enable", "999").returncode == 1
