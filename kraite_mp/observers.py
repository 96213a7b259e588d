"""Order observers: ``run_observers`` calls each ``settings.jobs.observers`` path after COMMIT.

An observer is called with ``(old, new)`` (the order row before and after a committed status change,
as column dicts; ``old`` is None for a first sighting), plus ``settings=`` when it accepts it. It runs
in the worker thread: keep it quick, and let it raise freely (a failure is logged with the order id,
never raised: the audit and the update are already committed). ``publish_transition`` is built in.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import redis

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.orders import Transition

log = logging.getLogger(__name__)

#: An observer: ``fn(old, new)`` or ``fn(old, new, settings=...)``.
Observer = Callable[..., Any]

#: Never let a slow or dead Redis stall a worker thread for long.
REDIS_SOCKET_TIMEOUT_S = 2.0

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()
_observer_cache: dict[str, tuple[Observer, bool]] = {}


def load_observer(path: str) -> tuple[Observer, bool]:
    """Resolve ``package.module.attr``; the flag says whether it accepts ``settings=``."""
    if path not in _observer_cache:
        module_name, _, attr = path.rpartition(".")
        if not module_name:
            raise ValueError(f"observer {path!r}: expected a dotted path module.attribute")
        fn = getattr(importlib.import_module(module_name), attr)
        if not callable(fn):
            raise ValueError(f"observer {path!r}: not callable")
        try:
            wants_settings = "settings" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            wants_settings = False
        _observer_cache[path] = (fn, wants_settings)
    return _observer_cache[path]


def run_observers(settings: Settings, transitions: list[Transition]) -> None:
    """Call every configured observer with (old, new) for each committed transition; never raises."""
    for transition in transitions:
        for path in settings.jobs.observers:
            try:
                fn, wants_settings = load_observer(path)
                if wants_settings:
                    fn(transition.old, transition.new, settings=settings)
                else:
                    fn(transition.old, transition.new)
            except Exception:  # noqa: BLE001 - a failing observer must never undo or retry the frame
                log.exception(
                    "observer %s failed for order id=%s account=%s exchange_order_id=%s",
                    path,
                    transition.new.get("id"),
                    transition.new.get("account_id"),
                    transition.new.get("exchange_order_id"),
                )


def transitions_channel(settings: Settings) -> str:
    """The pub/sub channel of order transitions: ``<redis_namespace>:<jobs.transitions_channel>``."""
    return f"{settings.redis_namespace}:{settings.jobs.transitions_channel}"


def _redis(url: str) -> redis.Redis:
    # one client (thread-safe pool) per process and URL; a forked child must not reuse the parent's
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                    socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
                )
                _clients[key] = client
    return client


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact, never through float
    raise TypeError(f"cannot serialise {type(value).__name__}")


def transition_message(old: dict[str, Any] | None, new: dict[str, Any]) -> bytes:
    """``{"account_id", "kind", "exchange_order_id", "order_id", "symbol", "from", "to", "order"}`` as JSON."""
    return orjson.dumps(
        {
            "account_id": new.get("account_id"),
            "kind": new.get("kind"),
            "exchange_order_id": new.get("exchange_order_id"),
            "order_id": new.get("id"),
            "symbol": new.get("symbol"),
            "from": old.get("status") if old else None,
            "to": new.get("status"),
            "execution_type": new.get("last_execution_type"),
            "order": new,
        },
        default=_default,
    )


def publish_transition(old: dict[str, Any] | None, new: dict[str, Any], *, settings: Settings) -> None:
    """Publish the transition on Redis pub/sub (``transitions_channel(settings)``) for real-time consumers."""
    _redis(settings.redis_url).publish(transitions_channel(settings), transition_message(old, new))
