"""Loading and checking the settings: TOML file, then environment variables on top.

Precedence (last wins): built-in defaults (production Binance URLs) < TOML file < environment.

Environment variables:
- the named ones in ``ENV_VARS`` (``KRAITE_DATABASE_URL``, ``KRAITE_REDIS_URL``, ...);
- any setting by path with double underscores: ``KRAITE__supervisor__healthy_after_s=5``.
  Lists are comma-separated (``KRAITE__user_data_stream__binance__dispatched_executions=TRADE,CANCELED``;
  an empty value is an empty list).

Every error names the key that is wrong (``ConfigError``); ``kraite-mp check-config`` prints the
effective settings with secrets redacted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# the domain lists have one home, the Binance edge; config only validates against them
from kraite_mp.binance.user import KNOWN_DISPATCH_KEYS
from kraite_mp.config import ConfigError, Settings, redact_url

#: The config file used when ``--config`` is not given and this file exists.
DEFAULT_CONFIG_PATH = "etc/kraite-mp.toml"
#: Without ``--config`` or ``KRAITE_CONFIG``, the first of these files that exists is read
#: (``{KRAITE_MP_HOME}`` is skipped when that variable is unset): the working directory's, the installation's,
#: the system's.
CONFIG_SEARCH_PATH: tuple[str, ...] = (
    DEFAULT_CONFIG_PATH,
    "{KRAITE_MP_HOME}/etc/kraite-mp.toml",
    "/etc/kraite-mp/kraite-mp.toml",
)

#: supervisor.gap_sweep_history's values (kraite_mp.reconcile.fetch._fetch_gap)
GAP_SWEEP_HISTORY = ("deferred", "evidence")

#: Named environment variables -> setting path.
ENV_VARS: dict[str, str] = {
    "KRAITE_DATABASE_URL": "database_url",
    "KRAITE_REDIS_URL": "redis_url",
    "KRAITE_REDIS_NAMESPACE": "redis_namespace",
    "KRAITE_SECRET_KEY": "secret_key",
    "KRAITE_LOG_LEVEL": "log_level",
    "KRAITE_LOG_FORMAT": "log_format",
    "KRAITE_BINANCE_REST_URL": "binance.rest_url",
    "KRAITE_BINANCE_WS_URL": "binance.ws_url",
    "KRAITE_RUN_DIR": "run_dir",
}


def _coerce(path: str, value: Any, target: Any) -> Any:
    """Check/convert one leaf value against the dataclass field type."""
    origin = typing.get_origin(target)
    if origin is list:
        (item_type,) = typing.get_args(target)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_coerce(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if target is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if target is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if target is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__}")
        return value
    raise ConfigError(f"{path}: unsupported setting type {target!r}")  # pragma: no cover


def _apply(obj: Any, data: Mapping[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)} - {"source"}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{path}: unknown setting")
        target = hints[key]
        if dataclasses.is_dataclass(target):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a table")
            _apply(getattr(obj, key), value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, target))


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: conflicts with a non-table value")
    node[leaf] = value


#: Largest secret or URL file read (``*_FILE`` variables, ``secret_key_file``): a key is a line.
MAX_VALUE_FILE_BYTES = 64 * 1024


def read_value_file(path: str, what: str) -> str:
    """The one value a secret file holds (surrounding whitespace and the final newline dropped);
    ConfigError naming ``what`` and the file when it is missing, unreadable, not UTF-8 or empty."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_VALUE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path}: is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(f"{what}: {path}: {e.strerror or e}") from None
    if len(raw) > MAX_VALUE_FILE_BYTES:
        raise ConfigError(f"{what}: {path}: larger than {MAX_VALUE_FILE_BYTES} bytes, not a secret file")
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path}: not UTF-8 (byte {e.start})") from None
    if not value:
        raise ConfigError(f"{what}: {path}: empty")
    if "\n" in value:
        raise ConfigError(f"{what}: {path}: more than one line")
    return value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the environment sets: named variables (``KRAITE_X``, or ``KRAITE_X_FILE`` naming a
    file that holds the value), then ``KRAITE__section__key`` paths."""
    data: dict[str, Any] = {}
    for name, path in ENV_VARS.items():
        file_name = f"{name}_FILE"
        if name in environ and file_name in environ:
            raise ConfigError(f"{name} and {file_name} are both set: give the value or the file, not both")
        if name in environ:
            _set_path(data, path, environ[name])
        elif environ.get(file_name):
            _set_path(data, path, read_value_file(environ[file_name], file_name))
    for name, value in environ.items():
        if name.startswith("KRAITE__"):
            _set_path(data, name[len("KRAITE__") :].replace("__", ".").lower(), value)
    return data


def parse_listen(spec: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError naming what is wrong."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (empty disables it), got {spec!r}")
    return host.strip("[]"), int(port)


def parse_shard(spec: str) -> tuple[int, int] | None:
    """``"all"`` -> None; ``"I/N"`` -> (I, N) with 0 <= I < N."""
    if spec == "all":
        return None
    try:
        index_s, count_s = spec.split("/")
        index, count = int(index_s), int(count_s)
    except ValueError:
        raise ValueError(f"expected 'all' or 'I/N', got {spec!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"expected 0 <= I < N, got {spec!r}")
    return index, count


#: Duration settings (``*_s``) that must be > 0: zero would mean "never wait" (a kill-and-restart loop, a
#: busy loop or an instant timeout). Every other ``*_s``/``*_ms`` setting must be >= 0 (0 = off where the
#: README says so).
POSITIVE_DURATIONS: frozenset[str] = frozenset(
    {
        "binance.rest_timeout_s",
        "supervisor.accounts_refresh_s",
        "supervisor.heartbeat_timeout_s",
        "supervisor.graceful_timeout_s",
        "supervisor.sync_timeout_s",
        "supervisor.backoff_base_s",
        "user_data_stream.keepalive_interval_s",
        "user_data_stream.ping_interval_s",
        "user_data_stream.pong_timeout_s",
        "user_data_stream.max_connection_age_s",
        "user_data_stream.drain_timeout_s",
        "mark_price.watchdog_s",
        "mark_price.reload_s",
        "mark_price.ping_interval_s",
        "mark_price.pong_timeout_s",
    }
)


def _durations(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every ``*_s``/``*_ms`` number of ``obj`` (recursively), as (dotted path, value)."""
    found: list[tuple[str, float]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += _durations(value, f"{prefix}{f.name}.")
        elif (
            f.name.endswith(("_s", "_ms")) and isinstance(value, int | float) and not isinstance(value, bool)
        ):
            found.append((f"{prefix}{f.name}", float(value)))
    return found


def _check_durations(settings: Settings) -> None:
    for path, value in _durations(settings):
        if path in POSITIVE_DURATIONS and not 0 < value < math.inf:
            raise ConfigError(f"{path}: must be > 0, got {value!r}")
        if math.isnan(value) or value < 0:
            raise ConfigError(f"{path}: must be >= 0, got {value!r}")


def _check_redis_url(url: str) -> None:
    """The URL parses the way redis-py will parse it in every child (port, database number, options)."""
    from redis.connection import parse_url

    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise ConfigError(f"redis_url: {e} ({redact_url(url)})") from None
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"redis_url: a unix:// URL needs a socket path ({redact_url(url)})")
        return
    if not parts.hostname:
        raise ConfigError(f"redis_url: no host ({redact_url(url)})")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"redis_url: the path must be a database number such as /0, got /{db}")


#: KRAITE_* variables kraite-mp reads that are not settings (or belong to the test and bench tooling).
OTHER_ENV_VARS: frozenset[str] = frozenset({"KRAITE_CONFIG", "KRAITE_MP_HOME"})
#: Prefixes of variables that are never settings: the tests' and benchmarks' own, and the path form.
OTHER_ENV_PREFIXES: tuple[str, ...] = ("KRAITE__", "KRAITE_TEST_", "KRAITE_BENCH_")


def env_typos(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, closest known name) for each ``KRAITE_*`` variable that is unknown but close to a known
    one."""
    import difflib

    known = set(ENV_VARS) | OTHER_ENV_VARS
    known_or_file = known | {f"{name}_FILE" for name in ENV_VARS}
    typos = []
    for name in sorted(environ):
        if not name.startswith("KRAITE_") or name.startswith(OTHER_ENV_PREFIXES) or name in known_or_file:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        if close:
            typos.append((name, close[0]))
    return typos


def validate(settings: Settings) -> None:
    """Cross-field checks that the type coercion cannot do."""
    for key in ("database_url",):
        if not urlsplit(settings.database_url).scheme.startswith("postgres"):
            raise ConfigError(f"{key}: expected a postgresql:// URL")
    if urlsplit(settings.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis_url: expected a redis://, rediss:// or unix:// URL")
    _check_redis_url(settings.redis_url)
    _check_durations(settings)
    for key, url, schemes in (
        ("binance.rest_url", settings.binance.rest_url, ("http", "https")),
        ("binance.ws_url", settings.binance.ws_url, ("ws", "wss")),
    ):
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.netloc:
            raise ConfigError(f"{key}: expected a {'/'.join(schemes)} URL, got {url!r}")
        if parts.path not in ("", "/"):
            raise ConfigError(
                f"{key}: give the base URL only (routes such as /private are added), got {url!r}"
            )
    unknown = set(settings.user_data_stream.binance.dispatched_executions) - KNOWN_DISPATCH_KEYS
    if unknown:
        raise ConfigError(
            f"user_data_stream.binance.dispatched_executions: unknown execution types {sorted(unknown)}"
        )
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            f"log_level: expected DEBUG/INFO/WARNING/ERROR/CRITICAL, got {settings.log_level!r}"
        )
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {settings.log_format!r}")
    if not 2 <= settings.audit.retention_days <= 3650:
        raise ConfigError(
            f"audit.retention_days: must be >= 2 and <= 3650, got {settings.audit.retention_days!r}"
        )
    # kept so that existing config files still load; the writer has one strategy (bench/ compares others)
    if settings.mark_price.strategy != "unnest":
        raise ConfigError(
            f"mark_price.strategy: only 'unnest' is supported, got {settings.mark_price.strategy!r}"
        )
    if settings.mark_price.chunk_size < 0:
        raise ConfigError("mark_price.chunk_size: must be >= 0")
    if not settings.user_data_stream.drain_timeout_s > 0:
        raise ConfigError("user_data_stream.drain_timeout_s: must be > 0")
    if uds_bad := [
        k
        for k in ("spool_max_bytes", "spool_segment_bytes", "spool_segment_max_age_s", "spool_memory_frames")
        if not getattr(settings.user_data_stream, k) > 0
    ]:
        raise ConfigError(f"user_data_stream.{uds_bad[0]}: must be > 0")
    if settings.user_data_stream.spool_max_bytes < 2 * settings.user_data_stream.spool_segment_bytes:
        raise ConfigError("user_data_stream.spool_max_bytes: must be at least twice spool_segment_bytes")
    if not settings.jobs.heartbeat_timeout_s >= 2:
        raise ConfigError(
            f"jobs.heartbeat_timeout_s: must be >= 2 s, got {settings.jobs.heartbeat_timeout_s!r}"
        )
    if settings.supervisor.backoff_cap_exponent < 0:
        raise ConfigError("supervisor.backoff_cap_exponent: must be >= 0")
    if not 0 < settings.binance.weight_share <= 1:
        raise ConfigError(
            f"binance.weight_share: must be > 0 and <= 1, got {settings.binance.weight_share!r}"
        )
    if settings.binance.ca_file and not os.path.isfile(settings.binance.ca_file):
        raise ConfigError(f"binance.ca_file: no such file {settings.binance.ca_file!r}")
    if settings.binance.egress_id != settings.binance.egress_id.strip() or (
        settings.binance.egress_id and not settings.binance.egress_id.isprintable()
    ):
        raise ConfigError(
            "binance.egress_id: must not start or end with spaces or hold control characters"
            " (leave it empty for this host's name)"
        )
    b = settings.binance
    if b.connection_limit < 1:
        raise ConfigError(f"binance.connection_limit: must be >= 1, got {b.connection_limit!r}")
    if not 1 <= b.connection_window_s < math.inf:
        raise ConfigError(f"binance.connection_window_s: must be >= 1 s, got {b.connection_window_s!r}")
    if not 0 < b.connection_share <= 1 or b.connection_limit * b.connection_share < 1:
        raise ConfigError(
            f"binance.connection_share: must be > 0 and <= 1 and leave at least one attempt per window,"
            f" got {b.connection_share!r}"
        )
    if not 0 <= b.reconnect_spread_s <= 600:
        raise ConfigError(
            f"binance.reconnect_spread_s: must be >= 0 and <= 600, got {b.reconnect_spread_s!r}"
        )
    uds = settings.user_data_stream
    if not 0 <= uds.max_connection_age_jitter_ratio < 1:
        raise ConfigError(
            "user_data_stream.max_connection_age_jitter_ratio: must be >= 0 and < 1,"
            f" got {uds.max_connection_age_jitter_ratio!r}"
        )
    if settings.supervisor.spawn_rate_per_s <= 0 or settings.supervisor.spawn_burst < 1:
        raise ConfigError("supervisor.spawn_rate_per_s/spawn_burst: must be positive")
    try:
        parse_shard(settings.supervisor.shard)
    except ValueError as e:
        raise ConfigError(f"supervisor.shard: {e}") from None
    if settings.supervisor.gap_sweep_history not in GAP_SWEEP_HISTORY:
        raise ConfigError(
            "supervisor.gap_sweep_history: expected deferred/evidence,"
            f" got {settings.supervisor.gap_sweep_history!r}"
        )
    if settings.supervisor.ownership not in ("all", "shard", "fleet"):
        raise ConfigError(
            f"supervisor.ownership: expected all/shard/fleet, got {settings.supervisor.ownership!r}"
        )
    host_id = settings.supervisor.host_id
    if host_id and (host_id != host_id.strip() or ":" in host_id or not host_id.isprintable()):
        raise ConfigError(
            "supervisor.host_id: no ':', control characters or surrounding spaces (empty: the host name)"
        )
    if not 3 <= settings.fleet.failover_s <= 3600:
        raise ConfigError(f"fleet.failover_s: must be >= 3 and <= 3600 s, got {settings.fleet.failover_s!r}")
    if not settings.fleet.handover_timeout_s > 0:
        raise ConfigError("fleet.handover_timeout_s: must be > 0")
    from kraite_mp.binance.user import check_events

    event_errors, _warnings = check_events(settings.user_data_stream.events)
    if event_errors:
        raise ConfigError(f"user_data_stream.events: {'; '.join(event_errors)}")
    if settings.metrics.listen:
        try:
            parse_listen(settings.metrics.listen)
        except ValueError as e:
            raise ConfigError(f"metrics.listen: {e}") from None


def find_config(environ: Mapping[str, str], search: Iterable[str] = CONFIG_SEARCH_PATH) -> str | None:
    """The first file of ``search`` that exists (``{KRAITE_MP_HOME}`` filled in from ``environ``), or None."""
    for pattern in search:
        if "{KRAITE_MP_HOME}" in pattern:
            home = environ.get("KRAITE_MP_HOME", "")
            if not home:
                continue
            pattern = pattern.replace("{KRAITE_MP_HOME}", home.rstrip("/") or "/")
        if Path(pattern).is_file():
            return pattern
    return None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    search: Iterable[str] | None = None,
) -> Settings:
    """Load defaults < TOML file < environment; raise ConfigError naming the bad key.

    The file is ``path``, else ``KRAITE_CONFIG``, else the first of ``search`` (``CONFIG_SEARCH_PATH``) that
    exists; none at all is fine (defaults and environment)."""
    environ = os.environ if environ is None else environ
    settings = Settings()
    sources = []
    if path is None and environ.get("KRAITE_CONFIG"):
        path = environ["KRAITE_CONFIG"]
    if path is None:
        path = find_config(environ, CONFIG_SEARCH_PATH if search is None else search)
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 (byte {e.start}): {e.reason}") from None
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from None
        _apply(settings, data)
        sources.append(str(path))
        if settings.secret_key and settings.secret_key_file:
            raise ConfigError(
                f"config file {path}: secret_key and secret_key_file are both set: give the key or the file"
            )
    overrides = env_overrides(environ)
    if overrides:
        if "secret_key" in overrides:  # the environment's key wins over the file's, whichever form
            settings.secret_key_file = ""
        elif overrides.get("secret_key_file"):
            settings.secret_key = ""
        _apply(settings, overrides)
        sources.append("environment")
    if settings.secret_key_file and not settings.secret_key:
        settings.secret_key = read_value_file(settings.secret_key_file, "secret_key_file")
    settings.log_level = settings.log_level.upper()
    settings.source = " + ".join(["defaults", *sources])
    validate(settings)
    return settings
