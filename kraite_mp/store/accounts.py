"""Accounts: CRUD and the at-rest encryption of API secrets (Fernet, key from KRAITE_SECRET_KEY).

``secret_key`` may hold several comma-separated keys during a rotation: the first encrypts, every one
decrypts (``MultiFernet``); ``rotate_secrets`` re-encrypts every stored secret under the first one.
A removed account stays as a tombstone row (its orders and audit rows reference it): inactive, secret
and API key erased, name freed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from kraite_mp.logs import register_secret


class SecretKeyError(ValueError):
    """KRAITE_SECRET_KEY missing, malformed, or not the key the secrets were encrypted with."""


class DuplicateApiKey(ValueError):
    """Another (not removed) account already uses this API key."""


class AccountRemoved(ValueError):
    """The account was removed (``accounts remove``): it cannot be enabled or updated."""


#: ``credentials_error`` of a removed account (its ``api_secret`` is empty: a Fernet token never is).
REMOVED_ERROR = "removed (kraite-mp accounts remove)"


def generate_secret_key() -> str:
    return Fernet.generate_key().decode()


def split_keys(secret_key: str) -> list[str]:
    """``"new,old"`` -> ``["new", "old"]`` (spaces and empty items ignored)."""
    return [k.strip() for k in secret_key.split(",") if k.strip()]


def _fernet(secret_key: str) -> MultiFernet:
    keys = split_keys(secret_key)
    if not keys:
        raise SecretKeyError(
            "secret_key is not set (KRAITE_SECRET_KEY); generate one with `kraite-mp gen-secret-key`"
        )
    fernets = []
    for i, key in enumerate(keys):
        try:
            fernets.append(Fernet(key.encode()))
        except (ValueError, TypeError):
            which = "" if len(keys) == 1 else f" (key {i + 1} of {len(keys)})"
            raise SecretKeyError(
                f"secret_key{which}: not a valid Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
    return MultiFernet(fernets)


def check_secret_key(secret_key: str) -> None:
    """Raise SecretKeyError unless ``secret_key`` is one or more well-formed Fernet keys."""
    _fernet(secret_key)


def encrypt_secret(secret_key: str, plaintext: str) -> str:
    return _fernet(secret_key).encrypt(plaintext.encode()).decode()


def decrypt_secret(secret_key: str, token: str) -> str:
    try:
        return _fernet(secret_key).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyError(
            "cannot decrypt an account secret: secret_key (KRAITE_SECRET_KEY) is not the key it was"
            " encrypted with (after a key change: `kraite-mp rotate-secret-key`)"
        ) from None


def mask(value: str) -> str:
    """Show just enough of an API key to recognise it."""
    return value[:4] + "..." + value[-4:] if len(value) > 12 else "***"


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    exchange: str
    api_key: str
    #: Fernet token; call ``secret(key)`` for the plaintext. Not in repr.
    api_secret_token: str = field(repr=False)
    is_active: bool = True
    credentials_error: str | None = None

    @property
    def removed(self) -> bool:
        return self.api_secret_token == ""

    def secret(self, secret_key: str) -> str:
        if self.removed:
            raise AccountRemoved(f"account {self.id} was removed")
        try:
            plaintext = decrypt_secret(secret_key, self.api_secret_token)
        except SecretKeyError as e:
            raise SecretKeyError(f"account {self.id}: {e}") from None
        register_secret(plaintext)
        return plaintext

    @property
    def fingerprint(self) -> tuple[Any, ...]:
        """What, if changed, requires the account's child to restart."""
        return (self.name, self.api_key, self.api_secret_token, self.is_active)


_COLUMNS = "id, name, exchange, api_key, api_secret, is_active, credentials_error"
_SELECT = "SELECT " + _COLUMNS + " FROM accounts"  # noqa: S608 - constant column list
_INSERT = "INSERT INTO accounts (name, exchange, api_key, api_secret) VALUES (%s, %s, %s, %s) RETURNING "
_INSERT += _COLUMNS
_UPDATE = (
    "UPDATE accounts SET name = COALESCE(%s, name), api_key = COALESCE(%s, api_key),"
    " api_secret = COALESCE(%s, api_secret), updated_at = now(),"
    " credentials_invalid_at = CASE WHEN %s THEN NULL ELSE credentials_invalid_at END,"
    " credentials_error = CASE WHEN %s THEN NULL ELSE credentials_error END"
    " WHERE id = %s RETURNING "
)
_UPDATE += _COLUMNS
#: SET expressions read the old row: a second remove keeps the name it got the first time.
_REMOVE = (
    "UPDATE accounts SET is_active = false, api_secret = '', api_key = '',"
    " name = CASE WHEN api_secret = '' THEN name ELSE name || ' (removed #' || id || ')' END,"
    " credentials_error = %s, credentials_invalid_at = COALESCE(credentials_invalid_at, now()),"
    " updated_at = now() WHERE id = %s RETURNING "
)
_REMOVE += _COLUMNS


def _row(r: tuple[Any, ...]) -> Account:
    return Account(
        id=r[0],
        name=r[1],
        exchange=r[2],
        api_key=r[3],
        api_secret_token=r[4],
        is_active=r[5],
        credentials_error=r[6],
    )


@contextmanager
def _locked(conn: Any) -> Iterator[Any]:
    """A cursor in one transaction that holds a lock serialising the writers that check API-key
    uniqueness (readers are not blocked); committed at the end, rolled back on error. Works on an
    autocommit connection too (autocommit is off for the block)."""
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE")
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = autocommit


def _refuse_duplicate_key(cur: Any, api_key: str, account_id: int | None) -> None:
    cur.execute(
        "SELECT id, name FROM accounts WHERE api_key = %s AND api_secret <> ''"
        " AND (%s::bigint IS NULL OR id <> %s) ORDER BY id LIMIT 1",
        (api_key, account_id, account_id),
    )
    row = cur.fetchone()
    if row is not None:
        raise DuplicateApiKey(f"account id={row[0]} ({row[1]}) already uses this API key")


def add_account(
    conn: Any,
    secret_key: str,
    *,
    name: str,
    api_key: str,
    api_secret: str,
    exchange: str = "binance",
    unique_api_key: bool = False,
) -> Account:
    """Insert an account (a unique name is the database's job). ``unique_api_key``: DuplicateApiKey if
    another account uses ``api_key`` (``kraite-mp accounts add`` always asks; tests build such pairs)."""
    if not name.strip():
        raise ValueError("name must not be empty")
    if not api_key.strip() or not api_secret.strip():
        raise ValueError("api key and secret must not be empty")
    token = encrypt_secret(secret_key, api_secret.strip())
    with _locked(conn) as cur:
        if unique_api_key:
            _refuse_duplicate_key(cur, api_key.strip(), None)
        cur.execute(
            _INSERT,
            (name.strip(), exchange, api_key.strip(), token),
        )
        row = cur.fetchone()
    return _row(row)


def update_account(
    conn: Any,
    secret_key: str,
    account_id: int,
    *,
    name: str | None = None,
    api_key: str | None = None,
    api_secret: str | None = None,
) -> Account | None:
    """Change name and/or credentials (None = keep); new credentials clear a remembered -2015 error.

    The supervisor sees the new fingerprint at its next accounts refresh and restarts the stream.
    Returns None when there is no such account; AccountRemoved, DuplicateApiKey, ValueError otherwise.
    """
    if name is not None and not name.strip():
        raise ValueError("name must not be empty")
    if (api_key is not None and not api_key.strip()) or (api_secret is not None and not api_secret.strip()):
        raise ValueError("api key and secret must not be empty")
    token = encrypt_secret(secret_key, api_secret.strip()) if api_secret is not None else None
    new_credentials = api_key is not None or api_secret is not None
    with _locked(conn) as cur:
        cur.execute(_SELECT + " WHERE id = %s", (account_id,))
        row = cur.fetchone()
        if row is None:
            return None
        if _row(row).removed:
            raise AccountRemoved(f"account {account_id} was removed; add it again with `accounts add`")
        if api_key is not None:
            _refuse_duplicate_key(cur, api_key.strip(), account_id)
        cur.execute(
            _UPDATE,
            (
                name.strip() if name is not None else None,
                api_key.strip() if api_key is not None else None,
                token,
                new_credentials,
                new_credentials,
                account_id,
            ),
        )
        row = cur.fetchone()
    return _row(row)


def remove_account(conn: Any, account_id: int) -> Account | None:
    """Retire an account for good: inactive, secret and API key erased, name freed; its orders, audit
    rows, balances and positions stay (they reference the row). None when there is no such account."""
    with conn.cursor() as cur:
        cur.execute(
            _REMOVE,
            (REMOVED_ERROR, account_id),
        )
        row = cur.fetchone()
    conn.commit()
    return _row(row) if row else None


def rotate_secrets(conn: Any, secret_key: str, old_keys: list[str]) -> int:
    """Re-encrypt every stored secret under the first key of ``secret_key``; all or nothing.

    ``old_keys`` (and every key of ``secret_key``) may decrypt. Returns the number of secrets rewritten;
    SecretKeyError (naming the account, nothing changed) when one decrypts under none of them.
    """
    new = _fernet(secret_key)
    every = _fernet(",".join([*split_keys(secret_key), *old_keys]))
    rotated = 0
    with _locked(conn) as cur:  # no account is added or updated meanwhile
        cur.execute("SELECT id, api_secret FROM accounts WHERE api_secret <> '' ORDER BY id")
        for account_id, token in cur.fetchall():
            try:
                plaintext = every.decrypt(token.encode())
            except InvalidToken:
                raise SecretKeyError(
                    f"account {account_id}: its secret decrypts under none of the given keys; nothing changed"
                ) from None
            cur.execute(
                "UPDATE accounts SET api_secret = %s, updated_at = now() WHERE id = %s",
                (new.encrypt(plaintext).decode(), account_id),
            )
            rotated += 1
    return rotated


def undecryptable_accounts(conn: Any, secret_key: str) -> list[int]:
    """Ids of the (not removed) accounts whose secret ``secret_key`` cannot decrypt (check-config --connect)."""
    fernet = _fernet(secret_key)
    bad = []
    for account in list_accounts(conn):
        try:
            fernet.decrypt(account.api_secret_token.encode())
        except InvalidToken:
            bad.append(account.id)
    return bad


def list_accounts(
    conn: Any, *, active_only: bool = False, exchange: str | None = None, include_removed: bool = False
) -> list[Account]:
    with conn.cursor() as cur:
        cur.execute(
            _SELECT + " WHERE (NOT %s OR is_active) AND (%s::text IS NULL OR exchange = %s)"
            " AND (%s OR api_secret <> '') ORDER BY id",
            (active_only, exchange, exchange, include_removed),
        )
        rows = cur.fetchall()
    conn.commit()
    return [_row(r) for r in rows]


def get_account(conn: Any, account_id: int) -> Account | None:
    with conn.cursor() as cur:
        cur.execute(_SELECT + " WHERE id = %s", (account_id,))
        row = cur.fetchone()
    conn.commit()
    return _row(row) if row else None


def set_active(conn: Any, account_id: int, active: bool) -> bool:
    """Enable (clearing a remembered -2015 error) or disable; False when there is no such account.

    AccountRemoved when enabling a removed account.
    """
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE accounts SET is_active = %s, updated_at = now(),"
            " credentials_invalid_at = CASE WHEN %s THEN NULL ELSE credentials_invalid_at END,"
            " credentials_error = CASE WHEN %s THEN NULL ELSE credentials_error END"
            " WHERE id = %s AND (api_secret <> '' OR NOT %s)",
            (active, active, active, account_id, active),
        )
        found: bool = cur.rowcount == 1
        if not found and active:
            cur.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))
            if cur.fetchone() is not None:
                conn.rollback()
                raise AccountRemoved(f"account {account_id} was removed; add it again with `accounts add`")
    conn.commit()
    return found


def mark_credentials_invalid(conn: Any, account_id: int, error: str) -> None:
    """The exchange said -2015: remember it (shown by `accounts list` and `status`); the account stays active."""
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE accounts SET credentials_invalid_at = now(), credentials_error = %s, updated_at = now()"
            " WHERE id = %s",
            (error[:500], account_id),
        )
    conn.commit()
