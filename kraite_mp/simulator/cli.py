"""``kraite-mp simulate``: run the exchange simulator as a process.

Prints exactly one JSON line on stdout once listening (URLs and account credentials), logs to
stderr, and serves until SIGTERM or SIGINT, then exits 0. The signal handlers only record the
signal; the main thread does the stopping.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from types import FrameType

import click

from kraite_mp.simulator.server import LOOPBACK_HOSTS, Simulator

log = logging.getLogger("kraite_mp.simulator.cli")

#: How often the main thread wakes up while waiting for a signal.
WAIT_SLICE_S = 0.5


@click.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to bind.")
@click.option(
    "--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port."
)
@click.option("--accounts", default=3, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--symbols", default=570, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "--rate", default=0.0, show_default=True, type=click.FloatRange(0.0), help="Scenario steps/s per account."
)
@click.option(
    "--ping-interval", default=180.0, show_default=True, type=click.FloatRange(0.01), help="Seconds."
)
@click.option(
    "--pong-timeout", default=600.0, show_default=True, type=click.FloatRange(0.01), help="Seconds."
)
@click.option(
    "--mark-price-interval", default=1.0, show_default=True, type=click.FloatRange(0.01), help="Seconds."
)
@click.option(
    "--listen-key-ttl", default=3600.0, show_default=True, type=click.FloatRange(0.1), help="Seconds."
)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option(
    "--tradfi",
    default="",
    help="Comma-separated TradFi symbols (e.g. XAUUSDT,TSLAUSDT): a second mark-price array each tick.",
)
@click.option(
    "--tls-dir",
    default="",
    help="Serve https:// and wss:// with a test certificate written to this directory (cert.pem is its own"
    " authority: give it to clients as binance.ca_file); the printed line names it as ca_file.",
)
@click.option("--log-level", default="INFO", show_default=True)
def simulate(
    host: str,
    port: int,
    accounts: int,
    symbols: int,
    rate: float,
    ping_interval: float,
    pong_timeout: float,
    mark_price_interval: float,
    listen_key_ttl: float,
    seed: int,
    tradfi: str,
    tls_dir: str,
    log_level: str,
) -> None:
    """Run a local Binance USD-M compatible exchange simulator."""
    if host not in LOOPBACK_HOSTS:
        raise click.BadParameter(
            f"the simulator binds loopback only (127.0.0.1, ::1), not {host!r}", param_hint="--host"
        )
    logging.basicConfig(
        stream=sys.stderr, level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    certificate = None
    if tls_dir:
        from kraite_mp.simulator.tls import make_test_certificate

        certificate = make_test_certificate(tls_dir)
    sim = Simulator(
        accounts=accounts,
        symbols=symbols,
        rate=rate,
        ping_interval_s=ping_interval,
        pong_timeout_s=pong_timeout,
        mark_price_interval_s=mark_price_interval,
        listen_key_ttl_s=listen_key_ttl,
        seed=seed,
        host=host,
        port=port,
        tradfi_symbols=[s.strip() for s in tradfi.split(",") if s.strip()],
        tls=certificate.server_context() if certificate else None,
    )
    sim.start()
    try:
        line = {
            "rest_url": sim.rest_url,
            "ws_url": sim.ws_url,
            "control_url": sim.control_url,
            "ws_api_url": sim.ws_api_url,
            "ca_file": certificate.cert_file if certificate else None,
            "accounts": [{"api_key": a.api_key, "api_secret": a.api_secret} for a in sim.accounts],
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        while not stop.wait(WAIT_SLICE_S):
            pass
        log.info("signal %s received, stopping", received[0] if received else "?")
    finally:
        sim.stop()


def main() -> None:
    simulate(prog_name="kraite-mp simulate")
