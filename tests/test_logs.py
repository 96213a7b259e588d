"""Log lines: the text and JSON formats, redaction in both, the startup summary, and Dramatiq's worker lines
coming out in kraite-mp's format (see docs/LOGGING.md)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import ProcessGroup, wait_for

from kraite_mp.config import Settings
from kraite_mp.logs import (
    LOG_FORMAT,
    RedactFilter,
    adopt_handlers,
    forget_secret,
    iso_time,
    make_formatter,
    redact,
    register_secret,
    setup_logging,
    startup_summary,
)

#: ``2026-12-01T16:43:36.730+00:00 INFO [4776] kraite_mp.x: msg``
TEXT_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) "
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) \[(?P<pid>\d+)\] (?P<logger>\S+): (?P<message>.*)$"
)
#: ISO-8601 with milliseconds and a UTC offset (as in the JSON ``time`` field).
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
#: A line in the Dramatiq CLI's own format (its ``LOGFORMAT``): only its main process may still write one.
DRAMATIQ_LINE = re.compile(r"^\[[^\]]+\] \[PID \d+\] \[[^\]]+\] \[(?P<logger>[^\]]+)\] \[[A-Z]+\] ")
#: A value that must never reach a log line once registered.
SECRET = "s3cr3t-for-test-logs-Zq9"
FORMATS = ("text", "json")


@pytest.fixture()
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture()
def secret() -> Iterator[str]:
    register_secret(SECRET)
    try:
        yield SECRET
    finally:
        forget_secret(SECRET)


def _log_to(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    setup_logging("DEBUG", stream, fmt)
    return logging.getLogger("kraite_mp.test_logs"), stream


@dataclass
class _Holder:
    """An object whose repr carries a secret, as an ``extra=`` value might."""

    token: str


# -- text -----------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_redaction_scrubs_registered_secrets_and_listen_keys() -> None:
    register_secret("s3cr3t-value-xyz")
    line = 'GET /private/ws?listenKey=abcDEF123&events=X secret s3cr3t-value-xyz {"listenKey": "zzzKEY"}'
    out = redact(line)
    assert "abcDEF123" not in out and "s3cr3t-value-xyz" not in out and "zzzKEY" not in out


@pytest.mark.unit
def test_text_line_has_iso_time_with_offset_level_pid_logger_and_message(root_logger: logging.Logger) -> None:
    log, stream = _log_to("text")
    before = datetime.now().astimezone()
    log.info("stream %s disconnected", "account=7")
    (line,) = stream.getvalue().splitlines()
    m = TEXT_LINE.match(line)
    assert m, line
    assert (m["level"], int(m["pid"]), m["logger"]) == ("INFO", os.getpid(), "kraite_mp.test_logs")
    assert m["message"] == "stream account=7 disconnected"
    stamp = datetime.fromisoformat(m["time"])
    assert stamp.tzinfo is not None and abs(stamp - before) < timedelta(seconds=5)
    assert re.search(r"INFO .*disconnected", line)  # what the existing tests grep in child logs


@pytest.mark.unit
def test_times_are_local_with_the_zones_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "IST-05:30")  # POSIX TZ string: no tzdata needed
    time.tzset()
    try:
        assert iso_time(0.25) == "1970-01-01T05:30:00.250+05:30"
    finally:
        monkeypatch.undo()
        time.tzset()
    assert ISO_TIME.match(iso_time(time.time()))


@pytest.mark.unit
def test_text_traceback_follows_its_line(root_logger: logging.Logger) -> None:
    log, stream = _log_to("text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert TEXT_LINE.match(first) and first.endswith("kraite_mp.test_logs: failed")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "RuntimeError: boom"


# -- json -----------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_json_lines_parse_and_carry_the_fields(root_logger: logging.Logger) -> None:
    log, stream = _log_to("json")
    log.warning("order %s filled", "42", extra={"account": 7, "symbol": "BTCUSDT", "price": "50000.10"})
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.error("frame rejected", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    plain, failed = (json.loads(line) for line in lines)
    assert plain["level"] == "WARNING" and plain["logger"] == "kraite_mp.test_logs"
    assert plain["pid"] == os.getpid() and plain["thread"] == "MainThread"
    assert plain["message"] == "order 42 filled"
    assert (plain["account"], plain["symbol"], plain["price"]) == (7, "BTCUSDT", "50000.10")
    assert ISO_TIME.match(plain["time"]) and datetime.fromisoformat(plain["time"]).tzinfo is not None
    assert "exc_info" not in plain
    assert list(plain)[:6] == ["time", "level", "pid", "thread", "logger", "message"]
    assert failed["message"] == "frame rejected"
    assert failed["exc_info"].startswith("Traceback") and failed["exc_info"].endswith("ValueError: bad frame")


@pytest.mark.unit
def test_json_stays_valid_where_a_pattern_meets_json_escapes(root_logger: logging.Logger) -> None:
    log, stream = _log_to("json")
    log.info('connect url="wss://x/ws?listenKey=AbCdEf123" header {"listenKey": "ZzZ987"} \\')
    (record,) = (json.loads(line) for line in stream.getvalue().splitlines())
    assert record["message"] == 'connect url="wss://x/ws?listenKey=***" header {"listenKey": "***"} \\'


@pytest.mark.unit
def test_unknown_format_is_refused(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="xml"):
        make_formatter("xml")
    with pytest.raises(ValueError, match="xml"):
        setup_logging("INFO", io.StringIO(), "xml")


# -- redaction in both formats --------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_registered_secret_is_absent_from_every_part_of_a_line(
    fmt: str, root_logger: logging.Logger, secret: str
) -> None:
    log, stream = _log_to(fmt)
    log.info("secret in the message " + secret)
    log.info("secret in the args %s %r", secret, {"key": secret})
    log.info(
        "secret in extra fields",
        extra={"api_secret": secret, "nested": {"deep": [secret, (1, secret)]}, "holder": _Holder(secret)},
    )
    log.info("listen key in extra", extra={"url": "wss://x/ws?listenKey=LkLkLk999"})
    try:
        raise RuntimeError(f"signing with {secret} failed")
    except RuntimeError as e:
        log.exception("secret in the exception")
        log.error("secret in an exception object", extra={"error": e})
    log.info("secret in a stack", stack_info=True, extra={"note": secret})
    out = stream.getvalue()
    assert secret not in out and "LkLkLk999" not in out
    if fmt == "json":
        records = [json.loads(line) for line in out.splitlines()]
        assert len(records) == 7
        assert records[2]["api_secret"] == "***" and records[2]["nested"] == {"deep": ["***", [1, "***"]]}
        assert "RuntimeError: signing with *** failed" in records[4]["exc_info"]


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_adopt_handlers_reformats_a_dramatiq_style_handler_and_keeps_its_stream(
    fmt: str, root_logger: logging.Logger, secret: str
) -> None:
    stream = io.StringIO()
    # what dramatiq's CLI does in every worker process before importing kraite_mp.jobs
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"
        )
    )
    root_logger.handlers[:] = [handler]
    root_logger.setLevel(logging.INFO)
    assert adopt_handlers(fmt) == 1
    assert root_logger.handlers == [handler] and handler.stream is stream
    assert any(isinstance(f, RedactFilter) for f in handler.filters)
    logging.getLogger("dramatiq.worker.WorkerThread").error("Failed to process message with %s", secret)
    (line,) = stream.getvalue().splitlines()
    assert secret not in line
    if fmt == "text":
        m = TEXT_LINE.match(line)
        assert m and m["logger"] == "dramatiq.worker.WorkerThread"
        assert m["message"] == "Failed to process message with ***"
    else:
        record = json.loads(line)
        assert record["logger"] == "dramatiq.worker.WorkerThread" and record["level"] == "ERROR"
        assert record["message"] == "Failed to process message with ***"
    assert root_logger.level == logging.INFO  # dramatiq's -v decides the level


@pytest.mark.unit
def test_text_format_constant_keeps_the_greppable_tail() -> None:
    assert LOG_FORMAT.endswith("%(levelname)s [%(process)d] %(name)s: %(message)s")


# -- startup summary ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_startup_summary_names_the_sources_and_endpoints_without_secrets() -> None:
    settings = Settings(
        database_url="postgresql://kraite:pg-Pa55word@db.internal:6543/kraite_prod?sslmode=require",
        redis_url="redis://:redis-Pa55word@cache.internal:6380/2?password=q-Pa55word",
        redis_namespace="kraite-eu",
        secret_key="fernet-key-" + "x" * 33,
        source="defaults + /etc/kraite-mp.toml + environment",
    )
    settings.binance.rest_url = "https://user:rest-Pa55word@fapi.binance.com"
    settings.binance.ws_url = "wss://fstream.binance.com/ws?listenKey=abcdef"
    line = startup_summary(settings)
    assert "\n" not in line
    for secret in ("Pa55word", "fernet-key", "x" * 33, "abcdef", "kraite:", "user:"):
        assert secret not in line
    assert line.startswith("settings from defaults + /etc/kraite-mp.toml + environment: ")
    assert "database=db.internal:6543/kraite_prod" in line
    assert "redis=redis://cache.internal:6380/2" in line
    assert "namespace=kraite-eu" in line
    assert "binance_rest=https://fapi.binance.com " in line
    assert "binance_ws=wss://fstream.binance.com/ws" in line


@pytest.mark.unit
def test_startup_summary_of_the_defaults_and_a_unix_socket_database() -> None:
    settings = Settings(database_url="postgresql:///kraite?host=/var/run/postgresql")
    line = startup_summary(settings)
    assert "database=/var/run/postgresql:5432/kraite" in line
    assert "redis=redis://127.0.0.1:6379/0" in line and "namespace=kraite" in line
    assert line.startswith("settings from defaults: ")


# -- the Dramatiq worker --------------------------------------------------------------------------------
def _is_ours(line: str, fmt: str) -> dict[str, Any] | None:
    """The fields of a line in kraite-mp's ``fmt``, or None."""
    if fmt == "text":
        m = TEXT_LINE.match(line)
        return m.groupdict() if m else None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not ISO_TIME.match(str(record.get("time", ""))):
        return None
    return record


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", FORMATS)
def test_dramatiq_worker_lines_come_out_in_the_configured_format(
    fmt: str, kraite_env: dict[str, str], processes: ProcessGroup, tmp_path: Path
) -> None:
    env = {
        **kraite_env,
        "KRAITE_LOG_FORMAT": fmt,
        # a queue of its own (keys under the session namespace, deleted with it)
        "KRAITE_REDIS_NAMESPACE": f"{kraite_env['KRAITE_REDIS_NAMESPACE']}-logs-{fmt}-{os.getpid()}",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        worker = processes.start(
            [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--processes", "1", "--threads", "2"],
            env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    wait_for(lambda: "is ready for action" in log_path.read_text(), 60, message="worker ready")
    os.kill(worker.pid, signal.SIGTERM)  # the main process only: it stops its workers itself
    worker.wait(timeout=30)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    ours = [(line, _is_ours(line, fmt)) for line in lines]
    # the main dramatiq process never imports kraite_mp.jobs: its few lines keep dramatiq's format
    strays = [line for line, fields in ours if fields is None and not _is_dramatiq_main(line)]
    assert not strays, "\n".join(lines)
    records = [fields for _, fields in ours if fields is not None]
    ready = [r for r in records if r["message"] == "Worker process is ready for action."]
    assert len(ready) == 1, "\n".join(lines)
    assert ready[0]["logger"] == "dramatiq.WorkerProcess(0)" and ready[0]["level"] == "INFO"
    assert int(ready[0]["pid"]) != worker.pid  # a forked worker process, writing through dramatiq's pipe
    assert any(r["message"] == "Stopping worker process..." for r in records), "\n".join(lines)


def _is_dramatiq_main(line: str) -> bool:
    m = DRAMATIQ_LINE.match(line)
    return m is not None and m["logger"] == "dramatiq.MainProcess"
