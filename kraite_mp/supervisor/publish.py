"""Status reporting: hooks the supervisor and its children call, and the Redis status publisher.

Every child and every supervisor publishes a small JSON entry under
``<redis_namespace>:status:<host>:<key>`` (``key``: ``user-data-7``, ``mark-price``, ``supervisor``
...), with ``SET ... EX STATUS_TTL_S``, so that a host that vanished leaves STALE entries for a
while and then nothing; ``kraite-mp status`` (``kraite_mp.ops.status``) reads them.

Publishing is best effort and must never hurt a stream: the client is created lazily in the process
that publishes (never used across ``fork``), has short socket timeouts, and after a failure the
publisher pauses (growing, capped) before it tries again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kraite_mp.backoff import backoff_delay
from kraite_mp.logs import redact

if TYPE_CHECKING:
    import redis

    from kraite_mp.config import Settings
    from kraite_mp.supervisor.context import ChildContext
    from kraite_mp.supervisor.runfiles import Heartbeat, Snapshot

log = logging.getLogger(__name__)

#: A status key expires this long after its last write: a dead host shows STALE, then disappears.
STATUS_TTL_S = 600
#: Publish at most this often per process, unless its state or error changed.
PUBLISH_INTERVAL_S = 2.0
#: Redis socket timeouts for the publisher: a blackholed Redis must not stall a stream.
PUBLISH_SOCKET_TIMEOUT_S = 0.25
#: After a failed publish, pause this long (doubling with each failure in a row) before trying again ...
FAILURE_PAUSE_S = 1.0
#: ... but never longer than this.
FAILURE_PAUSE_CAP_S = 30.0
#: At most one warning per this period about a failing Redis (with the number suppressed).
ERROR_LOG_INTERVAL_S = 60.0
#: The ``key`` the supervisor publishes under.
SUPERVISOR_KEY = "supervisor"
#: Longest error text kept in a status entry.
MAX_ERROR_CHARS = 300


class Reporter:
    """Status hooks, each named for its moment; this base does nothing. A hook may raise: the
    ``Reporters`` that call it log the failure and go on."""

    #: The supervisor reads its children's heartbeat files for ``on_child_beats`` only if a reporter wants
    #: them.
    relays_child_beats = False

    def before_fork(self) -> None:
        """In the supervisor, right before each fork: nothing connected may cross it."""

    def after_fork(self, ctx: ChildContext) -> None:
        """First thing in a new child (from ``ChildContext.after_fork``)."""

    def on_beat(self, ctx: ChildContext) -> None:
        """In a child, from ``ChildContext.beat``, at most once a second or on a state change."""

    def on_snapshot(self, settings: Settings, snapshot: Snapshot, *, force: bool) -> None:
        """In the supervisor, with each ``supervisor.json`` it writes (``force``: the last one)."""

    def on_child_beats(self, settings: Settings, beats: list[Heartbeat]) -> None:
        """In the supervisor, after a heartbeat check: the heartbeats its children wrote since the last one
        (only with ``relays_child_beats``)."""

    def on_forget(self, settings: Settings, key: str) -> None:
        """In the supervisor, when a child was stopped for good (account removed or disabled)."""

    def on_shutdown(self) -> None:
        """In the supervisor, once its children are gone."""


class Reporters:
    """The reporters of a process, called in order; a failing hook is logged, never raised."""

    def __init__(self, reporters: Iterable[Reporter] = ()) -> None:
        self.reporters = list(reporters)

    def _emit(self, hook: str, call: Callable[[Reporter], None]) -> None:
        for reporter in self.reporters:
            try:
                call(reporter)
            except Exception:  # noqa: BLE001 - status reporting never takes a process down
                log.debug("status hook %s of %r failed", hook, reporter, exc_info=True)

    def before_fork(self) -> None:
        self._emit("before_fork", lambda r: r.before_fork())

    def after_fork(self, ctx: ChildContext) -> None:
        self._emit("after_fork", lambda r: r.after_fork(ctx))

    def on_beat(self, ctx: ChildContext) -> None:
        self._emit("on_beat", lambda r: r.on_beat(ctx))

    def on_snapshot(self, settings: Settings, snapshot: Snapshot, *, force: bool) -> None:
        self._emit("on_snapshot", lambda r: r.on_snapshot(settings, snapshot, force=force))

    @property
    def relays_child_beats(self) -> bool:
        return any(r.relays_child_beats for r in self.reporters)

    def on_child_beats(self, settings: Settings, beats: list[Heartbeat]) -> None:
        self._emit("on_child_beats", lambda r: r.on_child_beats(settings, beats))

    def on_forget(self, settings: Settings, key: str) -> None:
        self._emit("on_forget", lambda r: r.on_forget(settings, key))

    def on_shutdown(self) -> None:
        self._emit("on_shutdown", lambda r: r.on_shutdown())


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
        ttl_s: int = STATUS_TTL_S,
        interval_s: float = PUBLISH_INTERVAL_S,
        socket_timeout_s: float = PUBLISH_SOCKET_TIMEOUT_S,
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
        #: Failures since the last successful write: the exponent of the next pause.
        self._failures_in_row = 0
        self._last_error_log = -ERROR_LOG_INTERVAL_S
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

            from kraite_mp.messages import redis_driver_info

            self._client = redis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=self.socket_timeout_s,
                socket_timeout=self.socket_timeout_s,
                # one attempt: redis-py's default retries (with backoff) would multiply the worst case
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
                driver_info=redis_driver_info(),
            )
            self._client_pid = os.getpid()
        return self._client

    def forget_connection(self) -> None:
        """Drop the client without touching its socket (after fork, the socket is the parent's)."""
        self._client = None
        self._client_pid = 0

    def close(self) -> None:
        """Close the connection (the supervisor does before forking)."""
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
        return self.publish_many([(key, payload)], force=force) == 1

    def publish_many(self, entries: Sequence[tuple[str, Mapping[str, Any]]], *, force: bool = False) -> int:
        """Write entries (each throttled per key unless ``force``) in one round trip: how many reached
        Redis (all that were due, or none)."""
        now = time.monotonic()
        with self._lock:
            if now < self._paused_until:
                return 0
            due = []
            for key, payload in entries:
                marker = (payload.get("state"), payload.get("error"))
                if force or self.due(key, marker, now):
                    due.append((key, marker, self._text(key, payload)))
            if not due:
                return 0
            try:
                client = self._redis()
                if len(due) == 1:
                    key, _, text = due[0]
                    client.set(status_key(self.namespace, self.host, key), text, ex=self.ttl_s)
                else:
                    pipe = client.pipeline(transaction=False)
                    for key, _, text in due:
                        pipe.set(status_key(self.namespace, self.host, key), text, ex=self.ttl_s)
                    pipe.execute()
            except Exception as e:  # noqa: BLE001 - status must never take a process down
                self._failed(e, now)
                return 0
            for key, marker, _ in due:
                self._last[key] = (now, marker)
            self._failures_in_row = 0
            self.published += len(due)
            return len(due)

    def _text(self, key: str, payload: Mapping[str, Any]) -> str:
        body = dict(payload)
        body.setdefault("key", key)
        body["host"] = self.host
        body.setdefault("ts", time.time())
        # last line of defence: nothing registered as secret leaves the process
        return redact(json.dumps(body, default=str, separators=(",", ":")))

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
        pause = backoff_delay(self._failures_in_row, base_s=FAILURE_PAUSE_S, jitter_ratio=0.0)
        self._paused_until = now + min(pause, FAILURE_PAUSE_CAP_S)
        self._failures_in_row += 1
        # a half-broken connection is useless; the next attempt reconnects
        self.close()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            suppressed = f" ({self._suppressed} similar errors suppressed)" if self._suppressed else ""
            log.warning(
                "cannot publish status to Redis: %s: %s%s",
                type(error).__name__,
                redact(str(error))[:200],
                suppressed,
            )
            self._last_error_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1


def child_payload(ctx: ChildContext) -> dict[str, Any]:
    """The status entry of one child: its heartbeat record plus its uptime."""
    return beat_payload(ctx.status())


def beat_payload(beat: Mapping[str, Any]) -> dict[str, Any]:
    """The status entry of a heartbeat record (its child's, or the file the supervisor read): plus uptime."""
    data: dict[str, Any] = dict(beat)
    data["fields"] = dict(data.get("fields") or {})
    started = data.get("started")
    data["uptime_s"] = round(time.time() - started, 1) if isinstance(started, int | float) else None
    if data.get("error"):
        data["error"] = str(data["error"])[:MAX_ERROR_CHARS]
    return data


def supervisor_key(settings: Settings) -> str:
    """``supervisor``, or ``supervisor-I-of-N`` for a shard (two shards may share a host)."""
    shard = settings.supervisor.shard
    if shard == "all":
        return SUPERVISOR_KEY
    return f"{SUPERVISOR_KEY}-" + shard.replace("/", "-of-")


def supervisor_payload(
    snapshot: Mapping[str, Any], *, key: str = SUPERVISOR_KEY, shard: str = "all"
) -> dict[str, Any]:
    """The supervisor's status entry, built from its ``supervisor.json`` snapshot."""
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


class RedisStatus(Reporter):
    """The built-in reporter: every beat and every snapshot to Redis, for ``kraite-mp status``.

    Connects nothing until the first publish, so building it before the fork is safe. Settings come
    with each hook: after a reload to another Redis URL or namespace, a new publisher takes over.

    ``relay_children`` (``kraite-mp run``): the children's beats reach Redis through the supervisor,
    which reads their heartbeat files at each heartbeat check and publishes what changed in one round trip
    (``on_child_beats``); a child then publishes nothing and holds no Redis connection for status, and an
    idle child's beat is a file write and a title. An entry is at most one heartbeat check
    (``heartbeat_timeout_s / 10``, at most 5 s) behind its file; its ``ts`` is still the child's.
    """

    def __init__(self, *, relay_children: bool = False) -> None:
        self.publisher: StatusPublisher | None = None
        self.relays_child_beats = relay_children

    def publisher_for(self, settings: Settings) -> StatusPublisher:
        pub = self.publisher
        host = settings.supervisor.host_id or host_name()  # a fleet member's status is under its host id
        if (
            pub is None
            or pub.redis_url != settings.redis_url
            or pub.namespace != settings.redis_namespace
            or pub.host != host
        ):
            if pub is not None:
                pub.close()
            pub = self.publisher = StatusPublisher(settings.redis_url, settings.redis_namespace, host=host)
        return pub

    def before_fork(self) -> None:
        if self.publisher is not None:
            self.publisher.close()  # no socket crosses the fork

    def after_fork(self, ctx: ChildContext) -> None:
        if self.publisher is not None:
            self.publisher.forget_connection()

    def on_beat(self, ctx: ChildContext) -> None:
        if not self.relays_child_beats:
            self.publisher_for(ctx.settings).publish(ctx.key, child_payload(ctx))

    def on_child_beats(self, settings: Settings, beats: list[Heartbeat]) -> None:
        entries = [(str(beat.get("key")), beat_payload(beat)) for beat in beats if beat.get("key")]
        self.publisher_for(settings).publish_many(entries)

    def on_snapshot(self, settings: Settings, snapshot: Snapshot, *, force: bool) -> None:
        # synchronous with short timeouts: the parent has no threads and must not start any
        key = supervisor_key(settings)
        payload = supervisor_payload(snapshot, key=key, shard=settings.supervisor.shard)
        self.publisher_for(settings).publish(key, payload, force=force)

    def on_forget(self, settings: Settings, key: str) -> None:
        self.publisher_for(settings).remove(key)

    def on_shutdown(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
