"""Logging to stderr (for supervisord) with a last-line-of-defence secret redactor.

Code must not log secrets in the first place; the formatter (and ``RedactFilter``, for handlers we
do not configure) also scrubs every value registered with ``register_secret`` (API secrets,
listenKeys) and anything shaped like a listenKey parameter from every record, tracebacks included.
"""

from __future__ import annotations

import logging
import re
import sys
import threading

_secrets: set[str] = set()
_lock = threading.Lock()

#: listenKey=..., "listenKey":"...", X-MBX-APIKEY: ..., signature=...
_PATTERNS = (
    re.compile(r"(listenKey=)[^&\s'\"]+"),
    re.compile(r"(\"listenKey\"\s*:\s*\")[^\"]*"),
    re.compile(r"(signature=)[0-9a-fA-F]+"),
    re.compile(r"(X-MBX-APIKEY['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+", re.IGNORECASE),
)

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


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


def describe_error(e: BaseException, fallback: str | None = None) -> str:
    """The first line of ``str(e)``, redacted (``fallback``, else the class name, when empty): for log lines."""
    text = str(e).strip()
    if not text:
        return fallback or type(e).__name__
    return redact(text.splitlines()[0])


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


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


def setup_logging(level: str = "INFO", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # websocket-client logs whole URLs (with the listenKey) at DEBUG and errors at ERROR.
    logging.getLogger("websocket").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
