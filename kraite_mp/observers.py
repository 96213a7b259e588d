"""Built-in order observers (``settings.jobs.observers`` holds dotted paths to functions like these).

An observer is called by ``kraite_mp.store.orders.run_observers`` with ``(old, new)`` (the order row
before and after a committed status change, as column dicts; ``old`` is None for a first
sighting), plus ``settings=`` when it accepts it. It runs after COMMIT, in the worker thread: keep
it quick, and let it raise freely (the caller logs the failure with the order id).
"""

from __future__ import annotations

import os
import threading
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import redis

if TYPE_CHECKING:
    from kraite_mp.config import Settings

#: Never let a slow or dead Redis stall a worker thread for long.
REDIS_SOCKET_TIMEOUT_S = 2.0

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


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
                client = redis.Redis.from_url(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                                              socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S)
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
