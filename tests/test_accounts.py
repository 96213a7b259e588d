"""Accounts: secrets encrypted at rest, and the ``kraite-mp accounts`` / ``db migrate`` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kraite_mp.store.accounts import add_account, decrypt_secret, list_accounts, set_active


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
        return subprocess.run(
            [sys.executable, "-m", "kraite_mp", *args],
            env=kraite_env,
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
        )

    assert run("db", "migrate").stdout.strip() == "schema is up to date"
    r = run(
        "accounts",
        "add",
        "--name",
        "bob",
        "--api-key",
        "BOBKEY0000000001",
        "--api-secret-file",
        str(secret_file),
    )
    assert r.returncode == 0, r.stderr
    r = run(
        "accounts",
        "add",
        "--name",
        "carol",
        "--api-key",
        "CAROLKEY00000001",
        "--api-secret-stdin",
        stdin="stdin-secret-value\n",
    )
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
