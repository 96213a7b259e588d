"""The Binance error family: what went wrong on the way to Binance, with the policy in the class.

``InvalidCredentials`` is fatal for the account; ``RateLimited`` (429/418) means no call before
``retry_after_s``; ``TransientError`` is retried later with backoff. A message never holds a secret.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from kraite_mp.logs import redact

#: Retry-After assumed when a 429 carries none.
DEFAULT_429_RETRY_AFTER_S = 60.0
#: Retry-After assumed when a 418 carries none (Binance's shortest ban).
DEFAULT_418_RETRY_AFTER_S = 120.0

#: Error codes that no retry can fix: the key or secret is wrong, or lacks permissions.
CREDENTIAL_ERROR_CODES: frozenset[int] = frozenset({-2015, -2014, -1022})
#: Timestamp outside recvWindow: re-measure the server-time offset and retry once.
TIMESTAMP_ERROR_CODE = -1021
LISTEN_KEY_NOT_FOUND_CODE = -1125
ORDER_NOT_FOUND_CODE = -2013


class BinanceError(Exception):
    """An error answered by (or on the way to) Binance. The message never holds secrets."""

    def __init__(self, http_status: int, code: int | None, msg: str) -> None:
        self.http_status = http_status
        self.code = code
        self.msg = redact(msg)
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"HTTP {self.http_status}" if self.http_status else "no reply"
        code = f" code {self.code}" if self.code is not None else ""
        return f"{where}{code}: {self.msg}"


class InvalidCredentials(BinanceError):
    """-2015 / HTTP 401 (also -2014, -1022): the key or secret is wrong or lacks permissions. Fatal for the account."""


class ListenKeyNotFound(BinanceError):
    """-1125: the listenKey does not exist (expired or deleted); create a new one with POST."""


class OrderNotFound(BinanceError):
    """-2013: no such order (or it aged out: 3 days for unfilled CANCELED/EXPIRED, 90 days for any)."""


class RateLimited(BinanceError):
    """HTTP 429 (request weight exceeded) or 418 (IP banned); no call is sent before ``retry_after_s`` passed."""

    def __init__(self, http_status: int, code: int | None, msg: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(http_status, code, msg)

    @property
    def banned(self) -> bool:
        return self.http_status == 418


class TransientError(BinanceError):
    """Connection error, timeout or 5xx: retry later with backoff."""


def parse_retry_after(value: str | None, default: float) -> float:
    """Retry-After as seconds (delta-seconds or an HTTP date); ``default`` when absent or unreadable."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return default


def reply_error(
    where: str, status: int, code: int | None, text: str, retry_after: str | None
) -> BinanceError:
    """The error of the family that a failed reply means: HTTP ``status``, Binance's ``code``, its (scrubbed)
    ``text`` and the ``Retry-After`` header; ``where`` is the call (``GET /fapi/v1/order``)."""
    if status in (429, 418):
        default = DEFAULT_418_RETRY_AFTER_S if status == 418 else DEFAULT_429_RETRY_AFTER_S
        retry_after_s = parse_retry_after(retry_after, default)
        what = "IP banned" if status == 418 else "rate limited"
        return RateLimited(
            status, code, f"{where}: {what}, retry after {retry_after_s:.0f}s ({text})", retry_after_s
        )
    if status == 401 or code in CREDENTIAL_ERROR_CODES:
        hint = {
            -1022: "the API secret does not match the API key (signature rejected)",
            -2014: "the API key is malformed",
        }.get(code or 0, "invalid API key, IP not whitelisted, or missing permissions")
        return InvalidCredentials(status, code, f"{where}: credentials rejected: {hint} ({text})")
    if code == LISTEN_KEY_NOT_FOUND_CODE:
        return ListenKeyNotFound(status, code, f"{where}: {text}")
    if code == ORDER_NOT_FOUND_CODE:
        return OrderNotFound(status, code, f"{where}: {text}")
    if status >= 500 or status == 408:
        return TransientError(status, code, f"{where}: server error ({text})")
    return BinanceError(status, code, f"{where}: {text}")
