"""Process status in Redis: every child and every supervisor publishes a small JSON heartbeat, and
``kraite-mp status`` prints them all, from any host that reaches the same Redis.

Keys: ``<redis_namespace>:status:<host>:<key>`` (``key`` is the child's key, e.g. ``user-data-7``,
``mark-price``, or ``supervisor``), written with ``SET ... EX STATUS_TTL_SECS`` so that a host that
vanished leaves STALE entries for a while and then nothing.

Publishing is best effort and must never hurt a stream: the Redis client is created lazily in the
process that publishes (never inherited across ``fork``), uses short socket timeouts, and after a
failure the publisher stays quiet for a growing pause (a dead Redis costs a stream at most one short
timeout per pause). Errors are swallowed and logged at most once per ``ERROR_LOG_INTERVAL_SECS``.

Wiring: the supervisor calls ``install(settings)`` before forking (it appends ``publish_status`` to
``kraite_mp.supervisor.context.status_hooks``, which ``ChildContext.beat`` calls at most once a second), and calls
``publish_supervisor(settings, snapshot)`` from its main loop with its own snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from kraite_mp import exitcodes
from kraite_mp.logs import redact

if TYPE_CHECKING:
    import redis

    from kraite_mp.config import Settings
    from kraite_mp.supervisor.context import ChildContext

log = logging.getLogger(__name__)

#: A status key expires this long after its last write: a dead host shows STALE, then disappears.
STATUS_TTL_SECS = 600
#: A heartbeat older than this is shown as STALE (a healthy process publishes every few seconds).
STALE_AFTER_SECS = 30.0
#: Publish at most this often per process, unless its state or error changed.
PUBLISH_INTERVAL_SECS = 2.0
#: Redis socket timeouts for the publisher: a blackholed Redis must not stall a stream.
PUBLISH_SOCKET_TIMEOUT_SECS = 0.25
#: After a failed publish, pause this long (doubling up to the cap) before trying again.
FAILURE_PAUSE_SECS = 1.0
FAILURE_PAUSE_CAP_SECS = 30.0
#: At most one warning per this period about a failing Redis (with the number suppressed).
ERROR_LOG_INTERVAL_SECS = 60.0
#: Socket timeout for ``kraite-mp status`` (an interactive command may wait a little longer).
READ_SOCKET_TIMEOUT_SECS = 3.0
#: The ``key`` the supervisor publishes under.
SUPERVISOR_KEY = "supervisor"
#: Longest error text kept in a status entry.
MAX_ERROR_CHARS = 300

#: Field names children use for the columns of the table (first match wins).
FRAMES_FIELDS = ("frames", "ticks")
LAST_FIELDS = ("last", "last_frame", "last_frame_age")
BACKLOG_FIELDS = ("backlog", "spool", "spooled", "spool_backlog")
RESTARTS_FIELDS = ("restarts",)


def host_name() -> str:
    """This host's name as used in status keys (no ``:``, which separates key parts)."""
    return socket.gethostname().replace(":", "_") or "localhost"


def status_key(namespace: str, host: str, key: str) -> str:
    return f"{namespace}:status:{host}:{key}"


def status_pattern(namespace: str) -> str:
    return f"{namespace}:status:*"


class StatusPublisher:
    """Writes status entries to Redis; never raises, never blocks longer than one short timeout."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        *,
        host: str | None = None,
        ttl_s: int = STATUS_TTL_SECS,
        interval_s: float = PUBLISH_INTERVAL_SECS,
        socket_timeout_s: float = PUBLISH_SOCKET_TIMEOUT_SECS,
    ) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.host = host or host_name()
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.socket_timeout_s = socket_timeout_s
        self._client: redis.Redis | None = None
        self._client_pid = 0
        self._lock = threading.Lock()
        #: key -> (monotonic time of the last write, (state, error) written)
        self._last: dict[str, tuple[float, tuple[Any, Any]]] = {}
        self._paused_until = 0.0
        self._pause_s = FAILURE_PAUSE_SECS
        self._last_error_log = -ERROR_LOG_INTERVAL_SECS
        self._suppressed = 0
        #: Counters for tests and for the curious.
        self.published = 0
        self.failures = 0

    # -- connection -----------------------------------------------------------------------------
    def _redis(self) -> redis.Redis:
        # a client inherited through fork() shares the parent's socket: make our own
        if self._client is None or self._client_pid != os.getpid():
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=self.socket_timeout_s,
                socket_timeout=self.socket_timeout_s,
                # one attempt: redis-py's default retries (with backoff) would multiply the worst case
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
            )
            self._client_pid = os.getpid()
        return self._client

    def forget_connection(self) -> None:
        """Drop the client without touching its socket (after fork, the socket is the parent's)."""
        self._client = None
        self._client_pid = 0

    def close(self) -> None:
        """Close the connection (the supervisor calls this before forking)."""
        client, self._client = self._client, None
        if client is not None and self._client_pid == os.getpid():
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail; nothing to do
                pass
        self._client_pid = 0

    # -- publishing -----------------------------------------------------------------------------
    def due(self, key: str, marker: tuple[Any, Any], now: float | None = None) -> bool:
        """Whether ``key`` should be written now: interval passed, or state/error changed."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        return last is None or last[1] != marker or now - last[0] >= self.interval_s

    def publish(self, key: str, payload: Mapping[str, Any], *, force: bool = False) -> bool:
        """Write one entry (throttled per key unless ``force``); True if it reached Redis."""
        marker = (payload.get("state"), payload.get("error"))
        now = time.monotonic()
        with self._lock:
            if now < self._paused_until:
                return False
            if not force and not self.due(key, marker, now):
                return False
            body = dict(payload)
            body.setdefault("key", key)
            body["host"] = self.host
            body.setdefault("ts", time.time())
            # last line of defence: nothing registered as secret leaves the process
            text = redact(json.dumps(body, default=str, separators=(",", ":")))
            try:
                self._redis().set(status_key(self.namespace, self.host, key), text, ex=self.ttl_s)
            except Exception as e:  # noqa: BLE001 - status must never take a process down
                self._failed(e, now)
                return False
            self._last[key] = (now, marker)
            self._pause_s = FAILURE_PAUSE_SECS
            self.published += 1
            return True

    def remove(self, key: str) -> bool:
        """Delete an entry (a child stopped on purpose, e.g. its account was disabled)."""
        with self._lock:
            self._last.pop(key, None)
            try:
                self._redis().delete(status_key(self.namespace, self.host, key))
                return True
            except Exception as e:  # noqa: BLE001
                self._failed(e, time.monotonic())
                return False

    def _failed(self, error: BaseException, now: float) -> None:
        self.failures += 1
        self._paused_until = now + self._pause_s
        self._pause_s = min(self._pause_s * 2, FAILURE_PAUSE_CAP_SECS)
        # a half-broken connection is useless; the next attempt reconnects
        self.close()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_SECS:
            suppressed = f" ({self._suppressed} similar errors suppressed)" if self._suppressed else ""
            log.warning("cannot publish status to Redis: %s: %s%s", type(error).__name__,
                        redact(str(error))[:200], suppressed)
            self._last_error_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1


_publisher: StatusPublisher | None = None
_publisher_lock = threading.Lock()


def _forget_after_fork() -> None:
    if _publisher is not None:
        _publisher.forget_connection()


os.register_at_fork(after_in_child=_forget_after_fork)


def get_publisher(settings: Settings) -> StatusPublisher:
    """The process-wide publisher for ``settings`` (created on first use; connects lazily)."""
    global _publisher
    with _publisher_lock:
        if (
            _publisher is None
            or _publisher.redis_url != settings.redis_url
            or _publisher.namespace != settings.redis_namespace
        ):
            if _publisher is not None:
                _publisher.close()
            _publisher = StatusPublisher(settings.redis_url, settings.redis_namespace)
        return _publisher


def child_payload(ctx: ChildContext) -> dict[str, Any]:
    """The status entry of one child: ``ctx.status()`` plus what ``status`` shows in columns."""
    data = dict(ctx.status())
    fields = dict(data.get("fields") or {})
    data["fields"] = fields
    now = time.time()
    started = data.get("started")
    data["uptime_s"] = round(now - started, 1) if isinstance(started, int | float) else None
    restarts = getattr(ctx, "restarts", None)
    if restarts is not None:
        data["restarts"] = restarts
    if data.get("error"):
        data["error"] = str(data["error"])[:MAX_ERROR_CHARS]
    return data


def publish_status(ctx: ChildContext) -> None:
    """``child.status_hooks`` entry: publish this child's status (throttled, never raises)."""
    try:
        get_publisher(ctx.settings).publish(ctx.key, child_payload(ctx))
    except Exception:  # noqa: BLE001 - belt and braces: a hook must never raise into a stream
        log.debug("status publish failed", exc_info=True)


def supervisor_key(settings: Settings) -> str:
    """``supervisor``, or ``supervisor-I-of-N`` for a shard (two shards may share a host)."""
    shard = settings.supervisor.shard
    if shard == "all":
        return SUPERVISOR_KEY
    return f"{SUPERVISOR_KEY}-" + shard.replace("/", "-of-")


def publish_supervisor(settings: Settings, snapshot: Mapping[str, Any], *, force: bool = False) -> bool:
    """Publish the supervisor's own snapshot (the dict it writes to ``<run_dir>/supervisor.json``).

    Synchronous with short timeouts (the parent has no threads and must not start any); never raises.
    """
    try:
        key = supervisor_key(settings)
        payload = supervisor_payload(snapshot, key=key, shard=settings.supervisor.shard)
        return get_publisher(settings).publish(key, payload, force=force)
    except Exception:  # noqa: BLE001
        log.debug("supervisor status publish failed", exc_info=True)
        return False


def supervisor_payload(snapshot: Mapping[str, Any], *, key: str = SUPERVISOR_KEY, shard: str = "all") -> dict[str, Any]:
    now = time.time()
    data: dict[str, Any] = {
        "key": key,
        "role": "supervisor",
        "account_id": None,
        "account_name": None,
        "pid": snapshot.get("pid", os.getpid()),
        "state": snapshot.get("state", "running"),
        "ts": now,
        "started": snapshot.get("started"),
        "error": snapshot.get("error"),
        "snapshot": dict(snapshot),
    }
    started = data["started"]
    if isinstance(started, int | float):
        data["uptime_s"] = round(now - started, 1)
    fields: dict[str, Any] = {}
    if "accounts" in snapshot:
        fields["accounts"] = snapshot["accounts"]
    children = snapshot.get("children")
    if isinstance(children, list | dict):
        fields["children"] = snapshot.get("children_alive", len(children))
    if shard != "all":
        fields["shard"] = shard
    data["fields"] = fields
    if "restarts" in snapshot:
        data["restarts"] = snapshot["restarts"]
    return data


def close_connection() -> None:
    """Close the publisher's Redis connection, if any (e.g. in the supervisor right before a fork)."""
    if _publisher is not None:
        _publisher.close()


def remove_status(settings: Settings, key: str) -> bool:
    """Delete this host's entry for ``key`` (for a child stopped on purpose)."""
    return get_publisher(settings).remove(key)


def install(settings: Settings) -> StatusPublisher:
    """Register ``publish_status`` as a child status hook; call in the supervisor before forking.

    Creates the publisher object only (no connection), so nothing crosses the fork.
    """
    from kraite_mp.supervisor import context as child

    publisher = get_publisher(settings)
    if publish_status not in child.status_hooks:
        child.status_hooks.append(publish_status)
    return publisher


def uninstall() -> None:
    from kraite_mp.supervisor import context as child

    while publish_status in child.status_hooks:
        child.status_hooks.remove(publish_status)


# -- reading ------------------------------------------------------------------------------------


class StatusUnavailable(RuntimeError):
    """Redis could not be read; the message carries no password."""


@dataclass
class StatusEntry:
    host: str
    key: str
    data: dict[str, Any]
    age_s: float
    stale: bool

    @property
    def role(self) -> str:
        return str(self.data.get("role") or self.key)

    @property
    def fields(self) -> dict[str, Any]:
        f = self.data.get("fields")
        return f if isinstance(f, dict) else {}

    def field(self, names: Iterable[str]) -> Any:
        for n in names:
            if n in self.data and n != "fields":
                return self.data[n]
            if n in self.fields:
                return self.fields[n]
        return None

    def as_json(self) -> dict[str, Any]:
        return {**self.data, "host": self.host, "key": self.key, "age_s": round(self.age_s, 1), "stale": self.stale}


def read_status(redis_url: str, namespace: str, *, stale_after_s: float = STALE_AFTER_SECS,
                now: float | None = None) -> list[StatusEntry]:
    """Every status entry in ``namespace`` (all hosts), oldest host first; raises StatusUnavailable."""
    import redis

    from kraite_mp.config import redact_url

    now = time.time() if now is None else now
    prefix = f"{namespace}:status:"
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=READ_SOCKET_TIMEOUT_SECS,
                                      socket_timeout=READ_SOCKET_TIMEOUT_SECS)
    except ValueError as e:
        raise StatusUnavailable(f"bad redis_url {redact_url(redis_url)}: {e}") from None
    try:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k)
                      for k in client.scan_iter(match=status_pattern(namespace), count=1000))
        values = client.mget(keys) if keys else []
    except redis.RedisError as e:
        raise StatusUnavailable(f"Redis unreachable at {redact_url(redis_url)}: {redact(str(e))}") from None
    finally:
        client.close()
    entries = []
    for full_key, raw in zip(keys, values, strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        host, _, key = full_key[len(prefix):].partition(":")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"state": "unreadable", "error": "status entry is not a JSON object"}
        ts = data.get("ts")
        age = now - ts if isinstance(ts, int | float) else float("inf")
        entries.append(StatusEntry(host=host, key=key, data=data, age_s=max(age, 0.0), stale=age > stale_after_s))
    entries = merge_supervisor_view(entries)
    entries.sort(key=_sort_key)
    return entries


#: Supervisor child states (supervisor.json) in which the child's own heartbeat is not expected to be fresh.
_NOT_RUNNING_STATES = frozenset({"PENDING", "BACKOFF", "FATAL", "STOPPING", "EXITED"})


def merge_supervisor_view(entries: list[StatusEntry]) -> list[StatusEntry]:
    """Combine each child's own heartbeat with what its supervisor knows about it.

    A child in BACKOFF or FATAL is not running, so only its supervisor can report it; a one-shot
    ``sync-orders`` child that finished is EXITED, not STALE; restart counts live in the supervisor.
    A supervisor counts as authoritative while its own entry is fresh or says it stopped.
    """
    by_host: dict[str, list[StatusEntry]] = {}
    for e in entries:
        by_host.setdefault(e.host, []).append(e)
    merged: list[StatusEntry] = []
    for host, host_entries in by_host.items():
        supervisors = [e for e in host_entries if e.role == "supervisor"]
        for sup in supervisors:
            if sup.stale and sup.data.get("state") == "stopped":
                sup.stale = False  # stopped on purpose: an old entry is expected
        authoritative = [s for s in supervisors if not s.stale]
        known: dict[str, tuple[StatusEntry, dict[str, Any]]] = {}
        for sup in authoritative:
            snapshot = sup.data.get("snapshot")
            children = snapshot.get("children") if isinstance(snapshot, dict) else None
            for ch in children if isinstance(children, list) else []:
                if isinstance(ch, dict) and isinstance(ch.get("key"), str):
                    known[ch["key"]] = (sup, ch)
        seen: set[str] = set()
        for e in host_entries:
            if e.role == "supervisor":
                merged.append(e)
                continue
            seen.add(e.key)
            info = known.get(e.key)
            if info is None:
                if authoritative and e.stale:
                    # no supervisor on this host runs it any more (account removed, mark-price moved)
                    e.data["state"] = "gone"
                    e.stale = False
                merged.append(e)
                continue
            _, ch = info
            if "restarts" not in e.data and ch.get("restarts") is not None:
                e.data["restarts"] = ch["restarts"]
            sup_state = str(ch.get("state") or "").upper()
            if sup_state in _NOT_RUNNING_STATES or (ch.get("pid") is not None and ch.get("pid") != e.data.get("pid")):
                # the entry is the last word of a process that is gone: the supervisor knows better
                if sup_state in _NOT_RUNNING_STATES:
                    e.data["state"] = sup_state.lower()
                    e.data["pid"] = ch.get("pid")
                    e.stale = False
                reason = ch.get("fatal_reason") or (f"last exit: {ch['last_exit']}" if ch.get("last_exit") else None)
                if reason and sup_state in ("BACKOFF", "FATAL"):
                    e.data["error"] = reason
            merged.append(e)
        for key, (sup, ch) in known.items():
            if key in seen:
                continue
            sup_state = str(ch.get("state") or "?")
            merged.append(StatusEntry(
                host=host,
                key=key,
                data={
                    "role": ch.get("role"),
                    "account_id": ch.get("account_id"),
                    "account_name": ch.get("account_name"),
                    "pid": ch.get("pid"),
                    "state": sup_state.lower(),
                    "restarts": ch.get("restarts"),
                    "error": ch.get("fatal_reason") or (f"last exit: {ch['last_exit']}" if ch.get("last_exit") else None),
                    "source": "supervisor",
                },
                age_s=sup.age_s,
                stale=False,
            ))
    return merged


def _sort_key(e: StatusEntry) -> tuple[Any, ...]:
    account = e.data.get("account_id")
    return (e.host, e.role != "supervisor", e.role != "mark-price", e.role != "sync-orders",
            account if isinstance(account, int) else -1, e.key)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


#: Fields shown in their own column, left out of DETAILS.
_COLUMN_FIELDS = frozenset(FRAMES_FIELDS + LAST_FIELDS + BACKLOG_FIELDS + RESTARTS_FIELDS)


def format_table(entries: list[StatusEntry]) -> str:
    header = ["HOST", "PROCESS", "ACCOUNT", "PID", "STATE", "UPTIME", "FRAMES", "LAST", "RESTARTS",
              "BACKLOG", "BEAT", "DETAILS / ERROR"]
    rows = [header]
    for e in entries:
        account = e.data.get("account_id")
        name = e.data.get("account_name")
        account_cell = f"{account} {name}" if account is not None and name else _cell(account)
        state = str(e.data.get("state") or "?")
        if e.stale:
            state = f"STALE ({state})"
        last = e.field(LAST_FIELDS)
        details = " ".join(f"{k}={v}" for k, v in e.fields.items() if k not in _COLUMN_FIELDS)
        error = e.data.get("error")
        if error:
            details = (details + " " if details else "") + f"error: {error}"
        rows.append([
            e.host,
            e.key,
            account_cell,
            _cell(e.data.get("pid")),
            state,
            _duration(e.data.get("uptime_s")),
            _cell(e.field(FRAMES_FIELDS)),
            _duration(last) if isinstance(last, int | float) else _cell(last),
            _cell(e.field(RESTARTS_FIELDS)),
            _cell(e.field(BACKLOG_FIELDS)),
            _duration(e.age_s) + " ago",
            details or "-",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return "\n".join(line.rstrip() for line in lines)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--stale-after", type=click.FloatRange(min=0.1), default=STALE_AFTER_SECS, show_default=True,
              help="Seconds after which a heartbeat shows as STALE.")
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable).")
@click.option("--check", is_flag=True, help="Exit 1 when any process is STALE or FATAL (for monitoring).")
@click.pass_context
def status_command(ctx: click.Context, as_json: bool, stale_after: float, hosts: tuple[str, ...],
                   check: bool) -> None:
    """Show every kraite-mp process on every host that publishes to this Redis."""
    from kraite_mp.ops.cli import get_settings

    settings = get_settings(ctx)
    try:
        entries = read_status(settings.redis_url, settings.redis_namespace, stale_after_s=stale_after)
    except StatusUnavailable as e:
        click.echo(f"kraite-mp status: {e}", err=True)
        ctx.exit(exitcodes.EXIT_TEMPFAIL)
    if hosts:
        entries = [e for e in entries if e.host in hosts]
    stale = sum(1 for e in entries if e.stale)
    fatal = sum(1 for e in entries if str(e.data.get("state", "")).lower() == "fatal")
    if as_json:
        click.echo(json.dumps([e.as_json() for e in entries], default=str))
    elif not entries:
        click.echo(f"no kraite-mp process has published status under {settings.redis_namespace}:status:* "
                   f"in the last {STATUS_TTL_SECS} s", err=True)
    else:
        click.echo(format_table(entries))
        summary = f"{len(entries)} process(es) on {len({e.host for e in entries})} host(s)"
        if stale:
            summary += f", {stale} STALE (no heartbeat for more than {stale_after:g} s)"
        if fatal:
            summary += f", {fatal} FATAL"
        click.echo(summary)
    if check and (stale or fatal or not entries):
        ctx.exit(exitcodes.EXIT_ERROR)
