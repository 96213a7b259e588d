"""Accounts: CRUD and the at-rest encryption of API secrets (Fernet, key from KRAITE_SECRET_KEY)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from kraite_mp.logs import register_secret


class SecretKeyError(ValueError):
    """KRAITE_SECRET_KEY missing, malformed, or not the key the secrets were encrypted with."""


def generate_secret_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(secret_key: str) -> Fernet:
    if not secret_key:
        raise SecretKeyError(
            "secret_key is not set (KRAITE_SECRET_KEY); generate one with `kraite-mp gen-secret-key`"
        )
    try:
        return Fernet(secret_key.encode())
    except (ValueError, TypeError):
        raise SecretKeyError(
            "secret_key: not a valid Fernet key (32 url-safe base64-encoded bytes)"
        ) from None


def encrypt_secret(secret_key: str, plaintext: str) -> str:
    return _fernet(secret_key).encrypt(plaintext.encode()).decode()


def decrypt_secret(secret_key: str, token: str) -> str:
    try:
        return _fernet(secret_key).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyError(
            "cannot decrypt an account secret: wrong secret_key (KRAITE_SECRET_KEY)"
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

    def secret(self, secret_key: str) -> str:
        plaintext = decrypt_secret(secret_key, self.api_secret_token)
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


def add_account(
    conn: Any, secret_key: str, *, name: str, api_key: str, api_secret: str, exchange: str = "binance"
) -> Account:
    if not name.strip():
        raise ValueError("name must not be empty")
    if not api_key.strip() or not api_secret.strip():
        raise ValueError("api key and secret must not be empty")
    token = encrypt_secret(secret_key, api_secret.strip())
    with conn.cursor() as cur:
        cur.execute(
            _INSERT,
            (name.strip(), exchange, api_key.strip(), token),
        )
        row = cur.fetchone()
    conn.commit()
    return _row(row)


def list_accounts(conn: Any, *, active_only: bool = False, exchange: str | None = None) -> list[Account]:
    with conn.cursor() as cur:
        cur.execute(
            _SELECT + " WHERE (NOT %s OR is_active) AND (%s::text IS NULL OR exchange = %s) ORDER BY id",
            (active_only, exchange, exchange),
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
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE accounts SET is_active = %s, updated_at = now(),"
            " credentials_invalid_at = CASE WHEN %s THEN NULL ELSE credentials_invalid_at END,"
            " credentials_error = CASE WHEN %s THEN NULL ELSE credentials_error END WHERE id = %s",
            (active, active, active, account_id),
        )
        found: bool = cur.rowcount == 1
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
