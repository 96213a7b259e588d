"""The metrics child: one small HTTP server per host, forked by ``kraite-mp run`` (``metrics.listen``).

- ``/metrics``: every series of every process of the host (the supervisor, its children and the workers
  that share ``PROMETHEUS_MULTIPROC_DIR``), merged by prometheus_client's ``MultiProcessCollector``,
  plus ``kraite_dead_letters`` read from Redis at scrape time.
- ``/healthz``: 200 while this process answers (the supervisor restarts it like any child).
- ``/readyz``: 200 when PostgreSQL and Redis answer and every owned account streams or is legitimately
  FATAL (as ``supervisor.json`` says); else 503 with one line per reason.

The parent holds no socket: the listening one lives here.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from kraite_mp import exitcodes
from kraite_mp.config.load import parse_listen
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from collections.abc import Iterator

    from kraite_mp.config import Settings
    from kraite_mp.supervisor.context import ChildContext

log = logging.getLogger(__name__)

#: A readiness probe gives PostgreSQL and Redis this long each.
PROBE_TIMEOUT_S = 2.0
#: Child states that are fine for readiness: streaming, or not retried for a reason an operator must fix.
READY_STATES = frozenset({"RUNNING", "FATAL"})


class DeadLetters:
    """A collector: the dead-lettered frames and reconcile requests in Redis, at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from kraite_mp.messages import RECONCILE_QUEUE, broker_namespace, redis_client

        family = GaugeMetricFamily(
            "kraite_dead_letters",
            "Messages Dramatiq dead-lettered (retries exhausted), by queue.",
            labels=["queue"],
        )
        client = redis_client(self.settings.redis_url)
        try:
            for queue in (self.settings.user_data_stream.queue_name, RECONCILE_QUEUE):
                count: Any = client.zcard(f"{broker_namespace(self.settings)}:{queue}.XQ")
                family.add_metric([queue], float(count))
        except Exception as e:  # noqa: BLE001 - Redis down: /readyz says so, the scrape still works
            log.debug("dead letters not read: %s", e)
            return
        finally:
            client.close()
        yield family


def readiness(settings: Settings) -> list[str]:
    """What keeps the host from being ready (empty: ready)."""
    problems: list[str] = []
    try:
        from kraite_mp.store.db import connect

        conn = connect(settings.database_url, application_name="kraite-mp metrics")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()
    except Exception as e:  # noqa: BLE001
        problems.append(f"postgresql: {type(e).__name__}")
    try:
        from kraite_mp.messages import redis_client

        client = redis_client(settings.redis_url)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001
        problems.append(f"redis: {type(e).__name__}")
    snapshot: Any = runfiles.read_snapshot(settings.run_dir) or {}
    for child in snapshot.get("children", []):
        if child.get("role") == runfiles.ROLE_USER_DATA and child.get("state") not in READY_STATES:
            problems.append(f"{child.get('key')}: {str(child.get('state')).lower()}")
    if not snapshot:
        problems.append("supervisor: no snapshot yet")
    return problems


def make_handler(settings: Settings, registry: Any) -> type[BaseHTTPRequestHandler]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        server_version = "kraite-mp-metrics"

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                problems = readiness(settings)
                body = ("ready\n" if not problems else "".join(f"{p}\n" for p in problems)).encode()
                self._send(200 if not problems else 503, body)
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def run_metrics_child(ctx: ChildContext) -> int:
    """Entry point of the metrics child (called in the forked child by ``run_child``)."""
    from prometheus_client import CollectorRegistry, multiprocess

    from kraite_mp.metrics import multiprocess_dir

    settings = ctx.settings
    directory = multiprocess_dir()
    if not settings.metrics.listen or directory is None:
        ctx.fail("metrics child started without metrics.listen or a metrics directory")
        return exitcodes.EXIT_FATAL_CONFIG
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(DeadLetters(settings))
    host, port = parse_listen(settings.metrics.listen)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(settings, registry))
    except OSError as e:
        ctx.fail(f"metrics.listen {settings.metrics.listen}: {e.strerror}")
        ctx.beat("failed", force=True)
        log.error("cannot listen on %s: %s", settings.metrics.listen, e.strerror)
        return exitcodes.EXIT_TEMPFAIL
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    thread.start()
    log.info("serving /metrics, /healthz and /readyz on %s", settings.metrics.listen)
    try:
        while not ctx.stop.wait(1.0):
            ctx.beat("serving", listen=settings.metrics.listen)
    finally:
        server.shutdown()
        server.server_close()
    return exitcodes.EXIT_OK
