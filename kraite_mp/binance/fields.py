"""Field readers shared by the Binance payload parsers: exact decimals, strict ints, clear errors.

Each reader names the field in its ``FrameError`` so an audit row says what was wrong. A float is
refused (Binance sends decimals as strings; a float would be silently lossy).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any


class FrameError(ValueError):
    """A frame or REST result lacks what its handler needs (audited as invalid, never retried)."""


def dec(value: Any, field_name: str) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, float):  # never seen from Binance; refuse silently lossy input
        raise FrameError(f"{field_name}: float value, expected a decimal string")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise FrameError(f"{field_name}: not a decimal: {str(value)[:40]!r}") from None
    if not d.is_finite():
        raise FrameError(f"{field_name}: not finite")
    return d


def opt_int(value: Any, field_name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise FrameError(f"{field_name}: not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FrameError(f"{field_name}: not an integer: {str(value)[:40]!r}") from None


def req_int(value: Any, field_name: str) -> int:
    result = opt_int(value, field_name)
    if result is None:
        raise FrameError(f"{field_name}: missing")
    return result


def opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def req_str(data: Mapping[str, Any], key: str, field_name: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise FrameError(f"{field_name}: missing")
    return value


def opt_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def array(value: Any, field_name: str) -> list[Any]:
    if not value:
        return []
    if not isinstance(value, list):
        raise FrameError(f"{field_name}: not a list")
    return value


def event_time(value: Any) -> int | None:
    """``E`` as int ms (Binance sends it as int, and as a string in listenKeyExpired)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def received_at(value: Any) -> datetime:
    """``received_at`` of a queued frame: epoch ms (int or float) or an ISO string; else now."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000.0, tz=UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return datetime.now(tz=UTC)
