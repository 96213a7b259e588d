"""Logging to stderr (for supervisord) in one format for every process, with a last-line-of-defence secret
redactor.

Two formats (``settings.log_format``), the same for ``kraite-mp`` and the ``dramatiq kraite_mp.jobs`` workers
(whose CLI installs its own handlers: ``adopt_handlers`` re-formats them); docs/LOGGING.md shows both:

- ``text``: ``2026-12-01T16:43:36.730+00:00 INFO [4776] kraite_mp.jobs: message``, ISO-8601 local time with
  milliseconds and UTC offset, then level, pid, logger name and message (tests grep the ``LEVEL [pid] name:``
  tail);
- ``json``: one object per line (python-json-logger) with ``time``, ``level``, ``pid``, ``thread``, ``logger``,
  ``message``, ``exc_info``/``stack_info`` when present, and every field passed with ``extra=``.

Code must not log secrets in the first place; both formatters (and ``RedactFilter``, for handlers we do not
configure) also scrub every value registered with ``register_secret`` (API secrets, listenKeys) and anything
shaped like a listenKey parameter from every record: message, tracebacks and, in JSON, every field.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pythonjsonlogger.json import JsonEncoder, JsonFormatter

if TYPE_CHECKING:
    from kraite_mp.config import Settings

_secrets: set[str] = set()
_lock = threading.Lock()

#: listenKey=..., "listenKey":"...", X-MBX-APIKEY: ..., signature=...
_PATTERNS = (
    re.compile(r"(listenKey=)[^&\s'\"]+"),
    re.compile(r"(\"listenKey\"\s*:\s*\")[^\"]*"),
    re.compile(r"(signature=)[0-9a-fA-F]+"),
    re.compile(r"(X-MBX-APIKEY['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+", re.IGNORECASE),
)

#: The ``text`` format; ``asctime`` is ISO-8601 with milliseconds and offset (``IsoTimeMixin``).
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
#: The values of ``settings.log_format``.
LOG_FORMATS = ("text", "json")
#: LogRecord attribute -> JSON key of the fields every ``json`` line carries, in this order.
JSON_FIELDS = {
    "asctime": "time",
    "levelname": "level",
    "process": "pid",
    "threadName": "thread",
    "name": "logger",
    "message": "message",
}


def register_secret(value: str | None) -> None:
    """Scrub ``value`` from every log line from now on (only values of 8+ chars are tracked)."""
    if value and len(value) >= 8:
        with _lock:
            _secrets.add(value)


def forget_secret(value: str | None) -> None:
    with _lock:
        _secrets.discard(value or "")


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(r"\1***", text)
    with _lock:
        secrets = tuple(_secrets)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def redact_value(value: Any) -> Any:
    """``value`` with every string in it (dict keys too, through lists and tuples) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def describe_error(e: BaseException, fallback: str | None = None) -> str:
    """The first line of ``str(e)``, redacted (``fallback``, else the class name, when empty): for log lines."""
    text = str(e).strip()
    if not text:
        return fallback or type(e).__name__
    return redact(text.splitlines()[0])


def iso_time(created: float) -> str:
    """``2026-12-01T16:43:36.730+00:00``: a record's time in the local zone, milliseconds and UTC offset."""
    # from an aware UTC time: a naive local one is ambiguous in the hour a DST change repeats
    return datetime.fromtimestamp(created, tz=UTC).astimezone().isoformat(timespec="milliseconds")


class IsoTimeMixin(logging.Formatter):
    """``asctime`` as ``iso_time`` unless a ``datefmt`` is given."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt:
            return super().formatTime(record, datefmt)
        return iso_time(record.created)


class RedactingFormatter(IsoTimeMixin):
    """The ``text`` format: the whole line (traceback included) is redacted."""

    def __init__(self, fmt: str | None = LOG_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _RedactingJsonEncoder(JsonEncoder):
    """Objects python-json-logger turns into JSON (exceptions, dataclasses, anything via ``str``) are
    redacted too: a secret inside an ``extra=`` object's repr must not escape."""

    def default(self, o: Any) -> Any:
        return redact_value(super().default(o))


class RedactingJsonFormatter(IsoTimeMixin, JsonFormatter):
    """The ``json`` format: one object per line, every value redacted before it is serialized.

    Redacting the serialized line instead could break its JSON (a pattern eating an escaping backslash), so
    the values are scrubbed one by one and the encoder scrubs whatever it converts itself.
    """

    def __init__(self) -> None:
        super().__init__(
            list(JSON_FIELDS),
            rename_fields=dict(JSON_FIELDS),
            json_encoder=_RedactingJsonEncoder,
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        scrubbed: dict[str, Any] = redact_value(super().process_log_record(log_data))
        return scrubbed


def make_formatter(fmt: str = "text") -> logging.Formatter:
    """The formatter of ``fmt`` (``"text"`` or ``"json"``), redacting and with ISO-8601 times."""
    if fmt == "text":
        return RedactingFormatter()
    if fmt == "json":
        return RedactingJsonFormatter()
    raise ValueError(f"log format: expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")


class RedactFilter(logging.Filter):
    """Scrub secrets from records of any logger (Dramatiq logs failed messages with their arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left to the handler
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Add ``RedactFilter`` to every root handler (the ``dramatiq`` CLI configures its own handlers)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def _quiet_chatty_loggers() -> None:
    # websocket-client logs whole URLs (with the listenKey) at DEBUG and errors at ERROR.
    logging.getLogger("websocket").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def setup_logging(level: str = "INFO", stream: IO[str] | None = None, fmt: str = "text") -> None:
    """One handler on the root logger, writing ``fmt`` lines to ``stream`` (stderr)."""
    formatter = make_formatter(fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _quiet_chatty_loggers()


def adopt_handlers(fmt: str = "text") -> int:
    """Give every root handler the ``fmt`` formatter and ``RedactFilter``; returns how many there are.

    For the ``dramatiq`` CLI, which installs its own handler and format in each worker and fork process
    before importing ``kraite_mp.jobs``: its handler (and stream, a pipe to the main dramatiq process) stays,
    only the lines change. The level stays too (dramatiq's ``-v``).
    """
    formatter = make_formatter(fmt)
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.setFormatter(formatter)
    install_log_redaction()
    _quiet_chatty_loggers()
    return len(handlers)


def _endpoint(url: str) -> str:
    """``scheme://host:port/path`` of ``url``: no user, password, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def _database(url: str) -> str:
    """``host:port/dbname`` of a PostgreSQL URL (host from ``?host=`` for a Unix socket); no user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
        query = parse_qs(parts.query)
    except ValueError:
        return "(unparsable)"
    host = host or (query.get("host") or ["localhost"])[0]
    port_text = str(port) if port is not None else (query.get("port") or ["5432"])[0]
    dbname = parts.path.lstrip("/") or (query.get("dbname") or [""])[0]
    return f"{host}:{port_text}/{dbname}"


def startup_summary(settings: Settings) -> str:
    """One line for the top of ``run``'s and the workers' logs: where the settings came from and what this
    process talks to. No secret: no password, no query string, no key."""
    fields = {
        "database": _database(settings.database_url),
        "redis": _endpoint(settings.redis_url),
        "namespace": settings.redis_namespace,
        "binance_rest": _endpoint(settings.binance.rest_url),
        "binance_ws": _endpoint(settings.binance.ws_url),
        "log_format": settings.log_format,
    }
    return redact(f"settings from {settings.source}: " + " ".join(f"{k}={v}" for k, v in fields.items()))
