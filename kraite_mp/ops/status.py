"""``kraite-mp status``: every kraite-mp process on every host that publishes to this Redis.

Reads the entries ``kraite_mp.supervisor.publish`` writes (each child's heartbeat record and each
supervisor's snapshot), merges each child with what its supervisor knows about it, prints a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import click

from kraite_mp import exitcodes
from kraite_mp.logs import redact
from kraite_mp.supervisor.publish import STATUS_TTL_S, host_name, status_pattern

if TYPE_CHECKING:
    from kraite_mp.config import Settings

#: A heartbeat older than this is shown as STALE (a healthy process publishes every few seconds).
STALE_AFTER_S = 30.0
#: Socket timeout for ``kraite-mp status`` (an interactive command may wait a little longer).
READ_SOCKET_TIMEOUT_S = 3.0

#: Heartbeat ``fields`` shown in their own column: the children's counters of frames or ticks ...
FRAMES_FIELDS = ("frames", "ticks")
#: ... the age of the last frame (user-data) ...
LAST_FIELDS = ("last",)
#: ... the frames spooled but not yet queued (user-data) ...
BACKLOG_FIELDS = ("backlog",)
#: ... and the restarts (from the supervisor's view of the child).
RESTARTS_FIELDS = ("restarts",)


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

    def field(self, names: tuple[str, ...]) -> Any:
        for n in names:
            if n in self.data and n != "fields":
                return self.data[n]
            if n in self.fields:
                return self.fields[n]
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            **self.data,
            "host": self.host,
            "key": self.key,
            "age_s": round(self.age_s, 1),
            "stale": self.stale,
        }


def read_status(
    redis_url: str, namespace: str, *, stale_after_s: float = STALE_AFTER_S, now: float | None = None
) -> list[StatusEntry]:
    """Every status entry in ``namespace`` (all hosts), oldest host first; raises StatusUnavailable."""
    import redis

    from kraite_mp.config import redact_url

    now = time.time() if now is None else now
    prefix = f"{namespace}:status:"
    try:
        client = redis.Redis.from_url(
            redis_url, socket_connect_timeout=READ_SOCKET_TIMEOUT_S, socket_timeout=READ_SOCKET_TIMEOUT_S
        )
    except ValueError as e:
        raise StatusUnavailable(f"bad redis_url {redact_url(redis_url)}: {e}") from None
    try:
        keys = sorted(
            k.decode() if isinstance(k, bytes) else str(k)
            for k in client.scan_iter(match=status_pattern(namespace), count=1000)
        )
        # redis-py >= 6 types its commands for the sync and async clients alike; this one is sync
        values = cast("list[bytes | None]", client.mget(keys)) if keys else []
    except redis.RedisError as e:
        raise StatusUnavailable(f"Redis unreachable at {redact_url(redis_url)}: {redact(str(e))}") from None
    finally:
        client.close()
    entries = []
    for full_key, raw in zip(keys, values, strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        host, _, key = full_key[len(prefix) :].partition(":")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"state": "unreadable", "error": "status entry is not a JSON object"}
        ts = data.get("ts")
        age = now - ts if isinstance(ts, int | float) else float("inf")
        entries.append(
            StatusEntry(host=host, key=key, data=data, age_s=max(age, 0.0), stale=age > stale_after_s)
        )
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
            if sup_state in _NOT_RUNNING_STATES or (
                ch.get("pid") is not None and ch.get("pid") != e.data.get("pid")
            ):
                # the entry is the last word of a process that is gone: the supervisor knows better
                if sup_state in _NOT_RUNNING_STATES:
                    e.data["state"] = sup_state.lower()
                    e.data["pid"] = ch.get("pid")
                    e.stale = False
                    e.data.update(_down_since(ch))
                reason = ch.get("fatal_reason") or (
                    f"last exit: {ch['last_exit']}" if ch.get("last_exit") else None
                )
                if reason and sup_state in ("BACKOFF", "FATAL"):
                    e.data["error"] = reason
            merged.append(e)
        for key, (sup, ch) in known.items():
            if key in seen:
                continue
            sup_state = str(ch.get("state") or "?")
            merged.append(
                StatusEntry(
                    host=host,
                    key=key,
                    data={
                        "role": ch.get("role"),
                        "account_id": ch.get("account_id"),
                        "account_name": ch.get("account_name"),
                        "pid": ch.get("pid"),
                        "state": sup_state.lower(),
                        "restarts": ch.get("restarts"),
                        "error": ch.get("fatal_reason")
                        or (f"last exit: {ch['last_exit']}" if ch.get("last_exit") else None),
                        "source": "supervisor",
                        **_down_since(ch),
                    },
                    age_s=sup.age_s,
                    stale=False,
                )
            )
    return merged


def _sort_key(e: StatusEntry) -> tuple[Any, ...]:
    account = e.data.get("account_id")
    return (
        e.host,
        e.role != "supervisor",
        e.role != "mark-price",
        e.role != "sync-orders",
        account if isinstance(account, int) else -1,
        e.key,
    )


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


def _down_since(ch: Mapping[str, Any]) -> dict[str, Any]:
    """``uptime_s`` None and ``down_s`` (since the last exit) for a child the supervisor has not running."""
    if str(ch.get("state") or "").upper() not in _NOT_RUNNING_STATES:
        return {}
    at = ch.get("last_exit_at")
    down = round(max(0.0, time.time() - at), 1) if isinstance(at, int | float) else None
    return {"uptime_s": None, "down_s": down}


def _uptime_cell(data: Mapping[str, Any]) -> str:
    """UPTIME: how long it runs, or ``down 5m`` for a child that is not running (FATAL, BACKOFF, ...)."""
    if "down_s" in data:
        down = data.get("down_s")
        return f"down {_duration(down)}" if isinstance(down, int | float) else "-"
    return _duration(data.get("uptime_s"))


def format_table(entries: list[StatusEntry]) -> str:
    header = [
        "HOST",
        "PROCESS",
        "ACCOUNT",
        "PID",
        "STATE",
        "UPTIME",
        "FRAMES",
        "LAST",
        "RESTARTS",
        "BACKLOG",
        "BEAT",
        "DETAILS / ERROR",
    ]
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
        rows.append(
            [
                e.host,
                e.key,
                account_cell,
                _cell(e.data.get("pid")),
                state,
                _uptime_cell(e.data),
                _cell(e.field(FRAMES_FIELDS)),
                _duration(last) if isinstance(last, int | float) else _cell(last),
                _cell(e.field(RESTARTS_FIELDS)),
                _cell(e.field(BACKLOG_FIELDS)),
                _duration(e.age_s) + " ago",
                details or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return "\n".join(line.rstrip() for line in lines)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0.1),
    default=STALE_AFTER_S,
    show_default=True,
    help="Seconds after which a heartbeat shows as STALE.",
)
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable).")
@click.option("--check", is_flag=True, help="Exit 1 when any process is STALE or FATAL (for monitoring).")
@click.pass_context
def status_command(
    ctx: click.Context, as_json: bool, stale_after: float, hosts: tuple[str, ...], check: bool
) -> None:
    """Show every kraite-mp process on every host that publishes to this Redis."""
    from kraite_mp.ops.cli import get_settings

    settings = get_settings(ctx)
    try:
        entries = read_status(settings.redis_url, settings.redis_namespace, stale_after_s=stale_after)
    except StatusUnavailable as e:
        click.echo(f"kraite-mp status: {e}", err=True)
        ctx.exit(exitcodes.EXIT_TEMPFAIL)
    seen_hosts = sorted({e.host for e in entries})
    if hosts:
        entries = [e for e in entries if e.host in hosts]
    stale = sum(1 for e in entries if e.stale)
    fatal = sum(1 for e in entries if str(e.data.get("state", "")).lower() == "fatal")
    dead = dead_letter_counts(settings)
    if as_json:
        click.echo(json.dumps([e.as_json() for e in entries], default=str))
    elif not entries and hosts and seen_hosts:
        click.echo(
            f"no kraite-mp process of host {', '.join(hosts)} has published status in the last"
            f" {STATUS_TTL_S} s; hosts that have: {', '.join(seen_hosts)}",
            err=True,
        )
    elif not entries:
        click.echo(
            f"no kraite-mp process has published status under {settings.redis_namespace}:status:* "
            f"in the last {STATUS_TTL_S} s",
            err=True,
        )
    else:
        click.echo(format_table(entries))
        summary = f"{len(entries)} process(es) on {len({e.host for e in entries})} host(s)"
        if stale:
            summary += f", {stale} STALE (no heartbeat for more than {stale_after:g} s)"
        if fatal:
            summary += f", {fatal} FATAL"
        click.echo(summary)
    if not as_json and (not hosts or host_name() in hosts):  # the budget of this host's egress
        click.echo(egress_line(egress_summary(settings)))
    if any(dead.values()) and not as_json:
        listed = ", ".join(f"{q} {n}" for q, n in dead.items() if n)
        click.echo(f"DEAD LETTERS: {listed} (see `kraite-mp dead-letters list`, then `replay --all`)")
    if check and (stale or fatal or not entries or any(dead.values())):
        ctx.exit(exitcodes.EXIT_ERROR)


def egress_summary(settings: Settings) -> dict[str, Any]:
    """This host's egress budget as every process of it sees it in Redis: REST weight used of kraite-mp's
    share this minute, WebSocket connection attempts left in their window, streams waiting for one, and a
    429/418 in force (``ban``: status and seconds left, or None) and the background history sweeps waiting
    for weight in the egress's line."""
    from kraite_mp.binance.budget import egress_id, shared_budget
    from kraite_mp.binance.connections import connection_budget
    from kraite_mp.reconcile.background import HistoryLine

    weight, connections = shared_budget(settings), connection_budget(settings)
    weight_left, attempts_left = weight.remaining(), connections.remaining()
    block = weight.blocked()
    return {
        "egress": egress_id(settings),
        "weight_used": None if weight_left is None else weight.limit - weight_left,
        "weight_share": weight.limit,
        "weight_limit": settings.binance.weight_limit_per_min,
        "connections_left": attempts_left,
        "connections_share": connections.limit,
        "connection_window_s": connections.window_s,
        "waiting": connections.waiting(),
        "history_waiting": HistoryLine(weight).waiting(),
        "ban": None if block is None else {"status": block.status, "left_s": round(block.left_s, 1)},
        "shared": weight.shared and not weight.fallback,
    }


def egress_line(summary: Mapping[str, Any]) -> str:
    """``EGRESS host: weight 120/1200 this minute (of 2400), connections 148/150 left per 300 s, ...``."""
    ban = summary["ban"]
    parts = [
        f"EGRESS {summary['egress']}: REST weight {_cell(summary['weight_used'])}/{summary['weight_share']} used"
        f" this minute (the IP's limit {summary['weight_limit']})",
        f"connection attempts {_cell(summary['connections_left'])}/{summary['connections_share']} left per"
        f" {summary['connection_window_s']:g} s",
        f"{_cell(summary['waiting'])} stream(s) waiting for one",
        f"{_cell(summary.get('history_waiting'))} history sweep(s) waiting for weight",
        "no 429/418 in force"
        if ban is None
        else f"Binance said {ban['status']}: no calls for {ban['left_s']:g} s",
    ]
    if not summary["shared"]:
        parts.append("(Redis unreachable: this process's local view)")
    return ", ".join(parts)


def dead_letter_counts(settings: Settings) -> dict[str, int]:
    """Dead letters per queue (``<ns>:dramatiq:<queue>.XQ``); {} when Redis cannot be read just now."""
    from kraite_mp.messages import RECONCILE_QUEUE, broker_namespace
    from kraite_mp.ops.deadletters import DeadLettersUnavailable, counts

    queues = [settings.user_data_stream.queue_name, RECONCILE_QUEUE]
    try:
        return counts(settings.redis_url, broker_namespace(settings), queues)
    except DeadLettersUnavailable:
        return {}
