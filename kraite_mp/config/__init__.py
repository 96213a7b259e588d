"""The settings model: one dataclass per section, their built-in defaults (production Binance URLs),
``ConfigError`` and the redaction that ``kraite-mp check-config`` prints.

Loading (TOML file, then environment) and the checks live in ``kraite_mp.config.load``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# the domain lists have one home, the Binance edge; the model takes its default event list from there
from kraite_mp.binance.user import USER_DATA_EVENTS

#: Binance's production endpoints (2026 routes: the WS base is split into /private, /market, /public).
BINANCE_REST_URL = "https://fapi.binance.com"
BINANCE_WS_URL = "wss://fstream.binance.com"

#: The seed system's production allowlist of dispatched execution types.
DEFAULT_DISPATCHED_EXECUTIONS: tuple[str, ...] = (
    "TRADE",
    "AMENDMENT",
    "CANCELED",
    "EXPIRED",
    "ALGO_NEW",
    "ALGO_CANCELED",
    "ALGO_EXPIRED",
    "ALGO_FILLED",
)


class ConfigError(ValueError):
    """Bad configuration; the message names the offending key."""


@dataclass
class BinanceSettings:
    rest_url: str = BINANCE_REST_URL
    ws_url: str = BINANCE_WS_URL
    recv_window_ms: int = 5000
    #: REST timeouts: a hung call must never hang a process forever.
    rest_timeout_s: float = 10.0
    #: Stay under Binance's 2400/min request weight; slow down above this share of it.
    weight_limit_per_min: int = 2400
    weight_slowdown_ratio: float = 0.8
    #: Share of weight_limit_per_min that all kraite-mp processes of one egress IP spend together (through
    #: Redis); the rest is left to the trading back end on the same IP.
    weight_share: float = 0.5
    #: Names the egress IP whose budget this process shares; "" = this host's name. Hosts behind one NAT
    #: give the same name.
    egress_id: str = ""
    #: PEM file of the certificate authorities trusted for wss:// and https:// (a TLS-terminating proxy, the
    #: simulator's test certificate); "" = the system's store.
    ca_file: str = ""
    #: WebSocket connection attempts per IP per connection_window_s (Binance: 300 per 5 min; every attempt
    #: counts: first connects, reconnects, planned rollovers).
    connection_limit: int = 300
    connection_window_s: float = 300.0
    #: Share of connection_limit that all kraite-mp streams of one egress IP take together (through Redis),
    #: its own setting: the back end's connections are not its REST weight.
    connection_share: float = 0.5
    #: A reconnect after a disconnect the stream did not choose itself waits up to this much longer (uniform
    #: random), so that the streams of a mass drop do not reconnect in the same instant.
    reconnect_spread_s: float = 2.0


@dataclass
class SupervisorSettings:
    #: Re-read the owned accounts this often (also on SIGHUP).
    accounts_refresh_s: float = 30.0
    #: A child that stayed up this long gets its restart counter reset.
    healthy_after_s: float = 60.0
    #: A child that exited FATAL (invalid credentials) is retried only after this long.
    fatal_retry_s: float = 300.0
    #: A child whose heartbeat is older than this is killed and restarted.
    heartbeat_timeout_s: float = 60.0
    #: SIGTERM -> wait this long -> SIGKILL.
    graceful_timeout_s: float = 10.0
    #: Backoff: delay = base * 2^min(attempt, cap) + jitter.
    backoff_base_s: float = 1.0
    backoff_cap_exponent: int = 5
    backoff_jitter_ratio: float = 0.1
    #: Forks per second (token bucket) and at once: the host's start-up CPU. Connection attempts have their
    #: own cap, the egress's connection budget (binance.connection_share), which is what Binance counts.
    spawn_rate_per_s: float = 5.0
    spawn_burst: int = 100
    #: Before the first fork, make the objects the supervisor holds immortal (CPython 3.12 and 3.13), so that
    #: children stop copying the pages those objects sit on (kraite_mp.supervisor.immortal). Those objects are
    #: never freed afterwards. Elsewhere it does nothing.
    immortalize_before_fork: bool = True
    #: Fork the user-data children from a fork server started right after the warm-up, whose heap stays as
    #: the first child saw it (kraite_mp.supervisor.forkserver), instead of from the supervisor itself.
    fork_server: bool = True
    #: Periodic REST reconciliation of all owned accounts (0 disables).
    sync_interval_s: float = 300.0
    #: Periodic sync: a full sweep (positions, balances, openOrders/openAlgoOrders without symbol: weight 90,
    #: plus history) at least this often per account; targeted per-symbol sweeps (weight ~1 per symbol) in
    #: between.
    sync_full_interval_s: float = 3600.0
    #: A reconnect whose gap (disconnect -> reconnect) is known and at most this long is reconciled with the
    #: gap sweep, which pays only for what the gap can hide (GET /fapi/v3/account, 5, plus 1 per listed
    #: symbol, and 10 per symbol whose history shows a change the stream did not deliver); a longer or unknown
    #: one gets a full sweep (90 + 10 per active symbol). 0: always a full sweep.
    gap_sweep_max_s: float = 3600.0
    #: What the gap sweep leaves to others: "deferred" (a background sweep then reads the order history,
    #: allOrders + allAlgoOrders from the gap start, 10 per symbol, of every symbol a full sweep reads, using
    #: at most half the REST budget: nothing is missed that a full sweep finds) or "evidence" (nothing more:
    #: orders placed and ended unfilled inside the gap wait for the next full sweep).
    gap_sweep_history: str = "deferred"
    #: A periodic sync child still running after this long is stopped.
    sync_timeout_s: float = 900.0
    #: Which accounts this supervisor owns with ownership = "shard": "all" or "I/N" (account id modulo
    #: N == I).
    shard: str = "all"
    #: "all" (every active account, one host), "shard" (``shard``) or "fleet" (hosts share the accounts
    #: through Redis: membership, rendezvous hashing, a lease per account; see kraite_mp.supervisor.fleet).
    #: A shard other than "all" with ownership "all" means "shard" (configurations written before this).
    ownership: str = "all"
    #: This supervisor's name in the fleet and in status keys; "" = the host name.
    host_id: str = ""
    #: Run the mark-price child in this supervisor; with ownership = "fleet": may lead it (one per fleet).
    mark_price: bool = True


@dataclass
class BinanceUserDataSettings:
    dispatched_executions: list[str] = field(default_factory=lambda: list(DEFAULT_DISPATCHED_EXECUTIONS))


@dataclass
class UserDataStreamSettings:
    keepalive_interval_s: float = 1800.0
    ping_interval_s: float = 30.0
    pong_timeout_s: float = 10.0
    #: Reconnect proactively before Binance's 24 h connection limit.
    max_connection_age_s: float = 23.5 * 3600
    #: Each account reconnects at its own age within the last this share of max_connection_age_s (fixed per
    #: account id, evenly spread; 0.085 = the last 2 h of 23.5 h), so that daily rollovers never synchronise.
    max_connection_age_jitter_ratio: float = 0.085
    #: On stop and planned reconnect: after our close frame, spool what the server still sends until its
    #: close frame, this long at most (1 s to notice the stop + this + 6 s of sender drain
    #: < graceful_timeout_s).
    drain_timeout_s: float = 2.0
    #: Write-ahead spool of every frame (one subdirectory per account), drained to Redis in order.
    spool_dir: str = "var/spool"
    #: fsync the spool after every frame: survives power loss, not just a child crash (costs latency).
    spool_fsync: bool = False
    #: A spool keeps every frame until its audit row is committed (end-to-end acknowledgement), so that a
    #: broker that lost its data can be replayed. Past this many bytes per account the oldest frames that
    #: Redis accepted (but no worker acknowledged yet) are dropped from the spool, never unsent ones.
    spool_max_bytes: int = 256 * 1024 * 1024
    #: The active segment rotates at this size or age, so acknowledged frames of an idle account are
    #: deleted too.
    spool_segment_bytes: int = 4 * 1024 * 1024
    spool_segment_max_age_s: float = 60.0
    #: While the disk refuses writes (full, read-only), frames wait in memory, this many at most, and go
    #: straight to Redis; write-ahead resumes once the disk takes them again.
    spool_memory_frames: int = 100_000
    queue_name: str = "user-data-stream"
    events: list[str] = field(default_factory=lambda: list(USER_DATA_EVENTS))
    binance: BinanceUserDataSettings = field(default_factory=BinanceUserDataSettings)


@dataclass
class MarkPriceSettings:
    #: No tick for this long means the stream is dead: reconnect.
    watchdog_s: float = 5.0
    reload_s: float = 60.0
    ping_interval_s: float = 20.0
    pong_timeout_s: float = 10.0
    #: Rows per UPDATE statement; 0 = one statement per tick.
    chunk_size: int = 0
    strategy: str = "unnest"
    include_coin_m: bool = False
    #: Mark prices are rewritten every second, so the writer's session commits without waiting for
    #: the WAL flush (a crash loses at most the last tick); true restores the server default.
    synchronous_commit: bool = False


@dataclass
class JobsSettings:
    #: Dotted paths of observers called with (old, new) after each committed status change.
    observers: list[str] = field(default_factory=lambda: ["kraite_mp.observers.publish_transition"])
    transitions_channel: str = "order-transitions"
    #: Retries of a job that failed for a reason of its own; a transient one (dramatiq.Retry) has no limit.
    max_retries: int = 20
    #: Retry backoff of failed jobs (PostgreSQL down): min, max (ms).
    retry_min_backoff_ms: int = 1000
    retry_max_backoff_ms: int = 300_000
    #: Fallback poll cap of the user-data-stream consumer (ms): its sleep between fetches while the doorbell
    #: is unavailable, and its longest wait for a free prefetch slot; with the doorbell an idle consumer
    #: blocks on it up to the worker timeout (see kraite_mp.broker).
    idle_poll_ms: int = 5
    #: A worker that stopped heartbeating this long ago is dead: its unacknowledged messages are
    #: requeued (Dramatiq's default is 60 s). Every live worker heartbeats about once per second.
    heartbeat_timeout_s: float = 10.0


@dataclass
class MetricsSettings:
    #: host:port of the Prometheus endpoint (/metrics, /healthz, /readyz) a small child of `kraite-mp run`
    #: serves for every process of the host; "" disables metrics.
    listen: str = "127.0.0.1:9464"


@dataclass
class FleetSettings:
    #: A dead host's accounts stream elsewhere within about this long (leases and membership expire at
    #: two thirds of it and are renewed every sixth).
    failover_s: float = 15.0
    #: A handover (the assigned host streams, the old holder waits for it) ends after this long anyway.
    handover_timeout_s: float = 30.0


@dataclass
class AuditSettings:
    #: ``api_data_stream`` keeps this many days of frames (daily partitions; older ones are dropped whole by
    #: every periodic sync pass and by ``kraite-mp db prune``). Far longer than any message can wait for a
    #: retry.
    retention_days: int = 30


@dataclass
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/kraite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_namespace: str = "kraite"
    #: Fernet key that encrypts account secrets at rest.
    secret_key: str = ""
    #: A file holding ``secret_key`` (one line), for secret stores that mount files; not both.
    secret_key_file: str = ""
    log_level: str = "INFO"
    #: "text" (one line per record, ISO-8601 times with offset) or "json" (one object per line, for log
    #: shippers); the same for kraite-mp's and Dramatiq's lines.
    log_format: str = "text"
    #: Heartbeat files and other per-host runtime state.
    run_dir: str = "var/run"
    binance: BinanceSettings = field(default_factory=BinanceSettings)
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    user_data_stream: UserDataStreamSettings = field(default_factory=UserDataStreamSettings)
    mark_price: MarkPriceSettings = field(default_factory=MarkPriceSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    #: Where the settings came from (for check-config).
    source: str = "defaults"

    def redacted(self) -> dict[str, Any]:
        """The effective settings as a dict, secrets and URL passwords masked."""
        data = dataclasses.asdict(self)
        data["secret_key"] = "***" if self.secret_key else ""
        data["database_url"] = redact_url(self.database_url)
        data["redis_url"] = redact_url(self.redis_url)
        return data


def redact_url(url: str) -> str:
    """``postgresql://u:pw@h/db`` -> ``postgresql://u:***@h/db``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
