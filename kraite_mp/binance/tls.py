"""One TLS client context per process for both clients (``wss://`` streams and ``https://`` REST), made once.

Without it, websocket-client builds a new ``SSLContext`` and loads the system's trust store on every
connect, and requests/urllib3 load certifi's bundle into a context of each connection pool: 2.4 MB of C
heap in every child with TLS (issue 17) and a store parsed again on each reconnect. The supervisor makes
this context before its first fork (``supervisor.process.prepare_to_fork``), so its pages are shared by
every child; a child that never had one (the sync child, a worker) makes its own on first use.

Trust: ``binance.ca_file`` (a PEM bundle: a TLS-terminating proxy's authority, the simulator's test
certificate) or, when empty, the system's store; a system without one (a bare container) falls back to
certifi's bundle, the one requests would use. Hostnames are always checked.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

from requests.adapters import HTTPAdapter

_contexts: dict[str, ssl.SSLContext] = {}
_lock = threading.Lock()


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """This process's context for ``ca_file`` ("" = the system's store), made on first use."""
    with _lock:  # a forked child finds the parent's, made before the fork
        ctx = _contexts.get(ca_file)
        if ctx is None:
            ctx = _contexts[ca_file] = _make(ca_file)
        return ctx


def _make(ca_file: str) -> ssl.SSLContext:
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"binance.ca_file {ca_file!r}: cannot load the certificates: {e}") from None
    ctx = ssl.create_default_context()
    if not ctx.get_ca_certs() and not _has_capath():
        import certifi

        ctx.load_verify_locations(cafile=certifi.where())
    return ctx


def _has_capath() -> bool:
    """True if the system store is a directory OpenSSL reads lazily (``get_ca_certs`` lists none of it)."""
    paths = ssl.get_default_verify_paths()
    return bool(paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath))


def websocket_sslopt(url: str, ctx: ssl.SSLContext | None) -> dict[str, Any]:
    """``create_connection(..., sslopt=...)`` for ``url``: the shared context for ``wss://``."""
    if ctx is None or not url.lower().startswith("wss://"):
        return {}
    return {"context": ctx}


class SharedContextAdapter(HTTPAdapter):
    """requests' adapter on the shared context: urllib3 is given the context and no CA path, so it does not
    load a bundle into it for every new connection (requests' own ``cert_verify`` would name certifi's)."""

    def __init__(self, ctx: ssl.SSLContext, **kwargs: Any) -> None:
        self._ctx = ctx
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ctx
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._ctx
        return super().proxy_manager_for(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if url.lower().startswith("https") and verify:
            conn.ca_certs = None  # the shared context holds the trust already
            conn.ca_cert_dir = None
