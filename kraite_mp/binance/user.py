"""User-data frames at the edge: parse, classify, scrub secrets, build frame ids.

Used on both sides of the queue: the child scrubs the listenKey out of a frame before it is
spooled (so no key ever reaches disk, Redis or a log line), the job parses and classifies the frame
and scrubs it again before the audit row is written (a second line of defence).

A frame is audited whatever it holds. ``parse_frame`` never raises: it returns a ``ParsedFrame``
whose ``kind`` says what the job can do with it:

- ``event``: a JSON object with a string ``e``; ``known`` says whether it is one of ``KNOWN_EVENTS``;
- ``malformed``: not JSON (kept as truncated raw text);
- ``not_object``: JSON, but not an object with an ``e`` (kept as payload);
- ``oversized``: longer than ``MAX_FRAME_CHARS`` (kept as truncated raw text, never parsed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from kraite_mp.logs import redact

#: Frames longer than this (characters) are not parsed; the child cuts anything longer to this + 1.
MAX_FRAME_CHARS = 1024 * 1024
#: Raw text of a malformed/oversized frame kept in the audit row (characters).
MAX_RAW_TEXT_CHARS = 8192

ORDER_TRADE_UPDATE = "ORDER_TRADE_UPDATE"
ALGO_UPDATE = "ALGO_UPDATE"
TRADE_LITE = "TRADE_LITE"
ACCOUNT_UPDATE = "ACCOUNT_UPDATE"
LISTEN_KEY_EXPIRED = "listenKeyExpired"

#: Every user-data event type we know; others are audited as ``unknown``.
KNOWN_EVENTS: frozenset[str] = frozenset(
    {
        ORDER_TRADE_UPDATE,
        ALGO_UPDATE,
        TRADE_LITE,
        ACCOUNT_UPDATE,
        "MARGIN_CALL",
        "ACCOUNT_CONFIG_UPDATE",
        "STRATEGY_UPDATE",
        "GRID_UPDATE",
        "CONDITIONAL_ORDER_TRIGGER_REJECT",
        LISTEN_KEY_EXPIRED,
    }
)
#: Payload keys whose values are secrets, wherever they appear.
SECRET_KEYS: frozenset[str] = frozenset({"listenKey"})
SCRUBBED = "***"

_EXPIRED_MARKER = '"' + LISTEN_KEY_EXPIRED + '"'
_LISTEN_KEY_FIELD_RE = re.compile(r'("listenKey"\s*:\s*")[^"]*')


@dataclass(frozen=True)
class ParsedFrame:
    kind: str
    payload: Any = None
    event_type: str | None = None
    event_time_ms: int | None = None
    known: bool = False
    #: Scrubbed JSON text to store as jsonb (the raw text when nothing needed scrubbing).
    payload_text: str | None = None
    #: Scrubbed, truncated raw text (only for malformed / oversized frames).
    raw_text: str | None = None
    error: str | None = None


def scrub_text(text: str, listen_keys: tuple[str, ...] = ()) -> str:
    """Remove listenKeys (given, registered, or in a ``"listenKey"`` field) from raw frame text."""
    for key in listen_keys:
        if key and key in text:
            text = text.replace(key, SCRUBBED)
    if "listenKey" in text:
        text = _LISTEN_KEY_FIELD_RE.sub(r"\1" + SCRUBBED, text)
    return redact(text)


def scrub_payload(value: Any) -> tuple[Any, bool]:
    """A copy of ``value`` with every ``SECRET_KEYS`` value replaced; and whether anything was."""
    if isinstance(value, dict):
        changed = False
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in SECRET_KEYS and v not in (None, SCRUBBED):
                out[k] = SCRUBBED
                changed = True
            else:
                out[k], sub_changed = scrub_payload(v)
                changed = changed or sub_changed
        return (out, True) if changed else (value, False)
    if isinstance(value, list):
        items = [scrub_payload(v) for v in value]
        if any(c for _, c in items):
            return [v for v, _ in items], True
        return value, False
    return value, False


def event_time(value: Any) -> int | None:
    """``E`` as int ms (Binance sends it as int, and as a string in listenKeyExpired)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def parse_frame(text: str) -> ParsedFrame:
    """Classify one raw frame; never raises."""
    if len(text) > MAX_FRAME_CHARS:
        return ParsedFrame(
            kind="oversized",
            raw_text=scrub_text(text[:MAX_RAW_TEXT_CHARS]),
            error=f"frame of more than {MAX_FRAME_CHARS} characters",
        )
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        return ParsedFrame(kind="malformed", raw_text=scrub_text(text[:MAX_RAW_TEXT_CHARS]),
                           error=f"invalid JSON: {str(e)[:200]}")
    changed = False
    if "listenKey" in text:  # the only secret a frame can carry; skip the walk for all other frames
        payload, changed = scrub_payload(payload)
    # keep the exact text (numbers as sent) unless something had to be scrubbed out of it
    payload_text = scrub_text(orjson.dumps(payload).decode() if changed else text)
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), str):
        return ParsedFrame(kind="not_object", payload=payload, payload_text=payload_text,
                           error="not a JSON object with an event type 'e'")
    event_type = payload["e"]
    return ParsedFrame(
        kind="event",
        payload=payload,
        event_type=event_type[:100],
        event_time_ms=event_time(payload.get("E")),
        known=event_type in KNOWN_EVENTS,
        payload_text=payload_text,
    )


def is_listen_key_expired(text: str) -> bool:
    """Cheap check in the receive path: is this frame a ``listenKeyExpired`` event?"""
    if _EXPIRED_MARKER not in text:
        return False
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, Mapping) and payload.get("e") == LISTEN_KEY_EXPIRED


