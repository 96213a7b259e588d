"""Accounts: secrets encrypted at rest, and the ``kraite-mp accounts`` / ``db migrate`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time

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


def _kraite(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kraite_mp", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _stored_token(db, account_id: int) -> str:
    with db.cursor() as cur:
        cur.execute("SELECT api_secret FROM accounts WHERE id = %s", (account_id,))
        token: str = cur.fetchone()[0]
    db.commit()
    return token


@pytest.mark.integration
def test_accounts_update_rename_duplicate_key_and_remove(kraite_env, db, secret_key: str) -> None:
    from kraite_mp.store.accounts import get_account, mark_credentials_invalid

    a = add_account(db, secret_key, name="alice", api_key="ALICEKEY00000001", api_secret="alice-secret-1")
    b = add_account(db, secret_key, name="bob", api_key="BOBKEY0000000001", api_secret="bob-secret-1")
    # a key another account uses is refused, by add and by update
    from kraite_mp.store.accounts import DuplicateApiKey

    with pytest.raises(DuplicateApiKey):
        add_account(
            db, secret_key, name="eve", api_key="ALICEKEY00000001", api_secret="x", unique_api_key=True
        )
    r = _kraite(
        kraite_env,
        "accounts",
        "add",
        "--name",
        "eve",
        "--api-key",
        "ALICEKEY00000001",
        "--api-secret-stdin",
        stdin="s\n",
    )
    assert r.returncode == 1 and f"account id={a.id} (alice) already uses this API key" in _one_line(r)
    r = _kraite(kraite_env, "accounts", "update", str(b.id), "--api-key", "ALICEKEY00000001")
    assert r.returncode == 1 and "already uses this API key" in _one_line(r)
    assert _kraite(kraite_env, "accounts", "update", str(b.id)).returncode == 2  # nothing to change

    # a wrong key fixed in place: new key and secret, the remembered -2015 error is cleared
    mark_credentials_invalid(db, a.id, "Binance -2015: Invalid API-key")
    r = _kraite(
        kraite_env, "accounts", "update", str(a.id), "--name", "alice2", "--api-key", "ALICEKEY00000002",
        "--api-secret-stdin", stdin="alice-secret-2\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "updated account id=" in r.stdout and "alice-secret-2" not in r.stdout + r.stderr
    updated = get_account(db, a.id)
    assert updated is not None and updated.name == "alice2" and updated.api_key == "ALICEKEY00000002"
    assert (
        updated.credentials_error is None
        and decrypt_secret(secret_key, updated.api_secret_token) == "alice-secret-2"
    )
    r = _kraite(kraite_env, "accounts", "update", str(a.id), "--name", "bob")
    assert r.returncode == 1 and "an account named 'bob' already exists" in _one_line(r)
    assert _kraite(kraite_env, "accounts", "update", "999", "--name", "zed").returncode == 1

    # removed: the stream stops (inactive), secret and key erased, name and key free again; rows stay
    r = _kraite(kraite_env, "accounts", "remove", str(b.id), "--yes")
    assert r.returncode == 0 and f"removed account {b.id}" in r.stdout, r.stderr
    gone = get_account(db, b.id)
    assert gone is not None and gone.removed and not gone.is_active and _stored_token(db, b.id) == ""
    listed = json.loads(_kraite(kraite_env, "accounts", "list", "--json").stdout)
    assert [d["id"] for d in listed] == [a.id]
    assert [
        d["removed"] for d in json.loads(_kraite(kraite_env, "accounts", "list", "--all", "--json").stdout)
    ] == [False, True]
    r = _kraite(kraite_env, "accounts", "enable", str(b.id))
    assert r.returncode == 1 and "was removed" in _one_line(r)
    r = _kraite(kraite_env, "accounts", "update", str(b.id), "--name", "bob3")
    assert r.returncode == 1 and "was removed" in _one_line(r)
    assert "already removed" in _kraite(kraite_env, "accounts", "remove", str(b.id), "--yes").stdout
    r = _kraite(
        kraite_env,
        "accounts",
        "add",
        "--name",
        "bob",
        "--api-key",
        "BOBKEY0000000001",
        "--api-secret-stdin",
        stdin="bob-secret-2\n",
    )
    assert r.returncode == 0, r.stderr
    assert _kraite(kraite_env, "accounts", "remove", str(a.id), stdin="n\n").returncode == 1  # not confirmed
    assert get_account(db, a.id).is_active  # type: ignore[union-attr]


@pytest.mark.integration
def test_rotate_secret_key(kraite_env, db, secret_key: str, simulator) -> None:
    from kraite_mp.store.accounts import SecretKeyError, generate_secret_key, get_account

    first = add_account(db, secret_key, name="a", api_key="AKEY000000000001", api_secret="secret-a-1")
    second = add_account(db, secret_key, name="b", api_key="BKEY000000000001", api_secret="secret-b-1")
    new_key = generate_secret_key()
    env = dict(kraite_env, KRAITE_SECRET_KEY=new_key)
    # the old key given once (here through a variable), all secrets re-encrypted under the new one
    r = _kraite(dict(env, OLD_KEY=secret_key), "rotate-secret-key", "--old-key-env", "OLD_KEY")
    assert r.returncode == 0 and "re-encrypted 2 account secret(s)" in r.stdout, r.stderr
    assert secret_key not in r.stdout + r.stderr and new_key not in r.stdout + r.stderr
    for acct, plain in ((first, "secret-a-1"), (second, "secret-b-1")):
        assert decrypt_secret(new_key, _stored_token(db, acct.id)) == plain
        with pytest.raises(SecretKeyError):
            decrypt_secret(secret_key, _stored_token(db, acct.id))
    # "NEW,OLD" in the configuration: both decrypt while the rotation runs, the first encrypts
    newer = generate_secret_key()
    r = _kraite(dict(kraite_env, KRAITE_SECRET_KEY=f"{newer},{new_key}"), "rotate-secret-key")
    assert r.returncode == 0 and "re-encrypted 2" in r.stdout, r.stderr
    assert decrypt_secret(newer, _stored_token(db, first.id)) == "secret-a-1"
    # a key that decrypts nothing: one line naming the account, exit 78, nothing changed
    before = _stored_token(db, first.id)
    r = _kraite(
        dict(kraite_env, KRAITE_SECRET_KEY=generate_secret_key()),
        "rotate-secret-key",
        "--old-key-stdin",
        stdin=new_key + "\n",
    )
    assert r.returncode == 78 and f"account {first.id}: its secret decrypts under none" in _one_line(r)
    assert _stored_token(db, first.id) == before
    # and the reason a stream would give with the wrong key names the account and the remedy
    account = get_account(db, first.id)
    assert account is not None
    with pytest.raises(SecretKeyError, match=rf"account {first.id}: .*`kraite-mp rotate-secret-key`"):
        account.secret(new_key)
    env = dict(kraite_env, KRAITE_SECRET_KEY=new_key, KRAITE_BINANCE_REST_URL=simulator.rest_url)
    r = _kraite(env, "check-config", "--connect")
    assert r.returncode == 78 and "secret_key cannot decrypt the API secret of account(s)" in _one_line(r)


@pytest.mark.integration
def test_enable_clears_fatal_at_the_next_accounts_refresh(db, settings, secret_key: str) -> None:
    """A child FATAL for invalid credentials waits fatal_retry_s, unless the error it recorded is cleared."""
    from kraite_mp import exitcodes
    from kraite_mp.store.accounts import mark_credentials_invalid
    from kraite_mp.supervisor.arbiter import Arbiter
    from kraite_mp.supervisor.process import ChildState, change_state

    acct = add_account(
        db, secret_key, name="wrong-key", api_key="WRONGKEY00000001", api_secret="s-0123456789"
    )
    mark_credentials_invalid(db, acct.id, "Binance -2015: Invalid API-key")
    settings.supervisor.mark_price = False
    arbiter = Arbiter(settings, targets={})
    arbiter.refresh_accounts("start")
    child = arbiter.children[f"user-data-{acct.id}"]
    # as process.finish leaves a child that exited 77
    change_state(child, ChildState.FATAL, 0.0, reason="Binance -2015", delay_s=3600.0)
    child.last_exit_code = exitcodes.EXIT_FATAL_CREDENTIALS
    arbiter.refresh_accounts("periodic")
    assert child.state == ChildState.FATAL  # still marked: keeps waiting
    set_active(db, acct.id, True)  # what `accounts enable` does
    arbiter.refresh_accounts("periodic")
    assert child.state == ChildState.PENDING and child.due_at <= time.monotonic()  # due now, not in an hour
