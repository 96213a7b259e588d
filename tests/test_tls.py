"""TLS as production runs it: https:// and wss:// against the simulator with a test certificate (issue 17).

The simulator serves TLS with a self-signed certificate; kraite-mp trusts it only through
``binance.ca_file``. Both clients (requests for REST, websocket-client for the streams) use the one
process-wide context of ``binance.tls`` (made by the supervisor before it forks): a certificate that is
not trusted is refused, a trusted one streams.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support import wait_for
from test_idle_wakeups import CountingStream, liveness, wait_until
from test_supervisor import FAST_ENV, Supervisor

from kraite_mp.binance.errors import BinanceError
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.binance.tls import client_context
from kraite_mp.config import ConfigError
from kraite_mp.config.load import load_settings
from kraite_mp.simulator import Simulator
from kraite_mp.simulator.tls import make_test_certificate
from kraite_mp.store.accounts import add_account
from kraite_mp.streams.liveness import Reason
from kraite_mp.wakeup import WakeEvent


@pytest.fixture()
def tls_simulator(tmp_path: Path) -> Any:
    cert = make_test_certificate(str(tmp_path / "tls"))
    sim = Simulator(accounts=2, symbols=20, rate=0.0, seed=3, tls=cert.server_context())
    sim.start()
    try:
        yield sim, cert.cert_file
    finally:
        sim.stop()


@pytest.mark.integration
def test_rest_over_https_trusts_the_ca_file_and_refuses_an_unknown_certificate(tls_simulator: Any) -> None:
    sim, ca_file = tls_simulator
    assert sim.rest_url.startswith("https://") and sim.ws_url.startswith("wss://")
    account = sim.accounts[0]
    with BinanceRest(sim.rest_url, account.api_key, ca_file=ca_file) as rest:
        key = rest.create_listen_key()
        assert key and rest.requests_sent == 1
        rest.keepalive_listen_key()  # the pool's connection is reused: the context is not reloaded per call
    with BinanceRest(sim.rest_url, account.api_key) as untrusting:  # the system's store: no such authority
        with pytest.raises(BinanceError) as refused:
            untrusting.create_listen_key()
    assert "certificate" in str(refused.value).lower()
    assert client_context(ca_file) is client_context(ca_file)  # one context per process


@pytest.mark.integration
def test_a_wss_stream_connects_with_the_shared_context_and_never_without_trust(tls_simulator: Any) -> None:
    sim, ca_file = tls_simulator
    account = sim.accounts[0]
    with BinanceRest(sim.rest_url, account.api_key, ca_file=ca_file) as rest:
        url = f"{sim.ws_url}/private/ws?listenKey={rest.create_listen_key()}"

    stop = WakeEvent()
    stream = CountingStream(url, liveness(ping_interval_s=0.3, pong_timeout_s=5.0), stop)
    stream.tls = client_context(ca_file)
    t = threading.Thread(target=stream.run, daemon=True)
    t.start()
    try:
        assert sim.wait_for_connections(account.api_key, 1, timeout=5)
        sim.step(account.api_key, 3)
        # frames through TLS, read as they come (bytes already decrypted are not visible to poll())
        assert wait_until(lambda: len(stream.frames) >= 3, 10), len(stream.frames)
        assert wait_until(lambda: stream._pings >= 2, 10)
        assert not stream.disconnects
    finally:
        stop.set()
        t.join(5.0)
    assert not t.is_alive()

    stop = WakeEvent()
    untrusting = CountingStream(url, liveness(), stop)
    untrusting.tls = client_context("")  # the system's store does not know the test authority
    try:
        wait_until(lambda: untrusting.loop() or bool(untrusting.disconnects), 10)
    finally:
        stop.set()
        untrusting.close(graceful=False)
    assert untrusting.disconnects and untrusting.disconnects[0].reason is Reason.CONNECT_FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.disconnects[0].detail
    assert "listenKey" not in untrusting.disconnects[0].detail


@pytest.mark.unit
def test_a_missing_ca_file_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="binance.ca_file: no such file"):
        load_settings(None, environ={"KRAITE__binance__ca_file": str(tmp_path / "nope.pem")})
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="binance.ca_file"):
        client_context(str(not_pem))
    logging.getLogger(__name__).debug("checked")


@pytest.mark.e2e
def test_kraite_mp_run_streams_over_tls_with_the_ca_file(
    tls_simulator: Any, db: Any, secret_key: str, kraite_env: dict[str, str], processes: Any, run_dir: str
) -> None:
    sim, ca_file = tls_simulator
    for i, a in enumerate(sim.accounts):
        add_account(db, secret_key, name=f"tls{i}", api_key=a.api_key, api_secret=a.api_secret)
    env = {
        **kraite_env,
        **FAST_ENV,
        "KRAITE_BINANCE_REST_URL": sim.rest_url,
        "KRAITE_BINANCE_WS_URL": sim.ws_url,
        "KRAITE__binance__ca_file": ca_file,
    }
    sup = Supervisor(
        processes, env, [sys.executable, "-m", "kraite_mp", "run"], Path(run_dir) / "supervisor.log"
    )
    try:
        for a in sim.accounts:
            assert sim.wait_for_connections(a.api_key, 1, timeout=30), sup.log()[-3000:]
        assert sim.wait_for_connections("market", 1, timeout=30), sup.log()[-3000:]
        wait_for(
            lambda: len(sup.lines(r"connected \(connect\)")) >= len(sim.accounts),
            30,
            message=f"every account connected; log:\n{sup.log()[-3000:]}",
        )
        assert not sup.lines(r"(?i)certificate|SSLError")
        assert os.path.exists(ca_file)
        # the supervisor's warm-up (process.warm_rest): its HTTPS round trips, unsigned, before any child
        # asked for a listenKey, so every child finds that code run once in the parent's pages
        log = [(r.method, r.path, r.api_key) for r in sim.rest.request_log()]
        first_key = log.index(next(r for r in log if r[:2] == ("POST", "/fapi/v1/listenKey")))
        assert log[:first_key].count(("GET", "/fapi/v1/time", "")) == 2, log[:10]
        assert sup.lines(r"server time offset [+-]\d+ ms"), sup.log()[-3000:]
        # and then its heap made immortal (CPython 3.12, 3.13), the children forked after it
        from kraite_mp.supervisor import immortal

        made = sup.lines(r"made (\d+) objects immortal before the first fork")
        if immortal.supported():
            assert made and int(made[0].group(1)) > 10_000, sup.log()[-3000:]
        else:
            assert not made and sup.lines(r"not made immortal .* not supported"), sup.log()[-3000:]
    finally:
        sup.close()


@pytest.mark.integration
def test_the_warm_up_before_the_first_fork_leaves_no_socket_and_never_fails_the_start(
    tls_simulator: Any, kraite_env: dict[str, str]
) -> None:
    from urllib.parse import urlsplit

    from test_budget import _sockets_to

    from kraite_mp.binance.budget import reset_budgets
    from kraite_mp.supervisor.process import warm_rest

    sim, ca_file = tls_simulator
    env = {**kraite_env, "KRAITE_BINANCE_REST_URL": sim.rest_url, "KRAITE__binance__ca_file": ca_file}
    settings = load_settings(None, environ=env)
    ports = (urlsplit(sim.rest_url).port or 443, urlsplit(settings.redis_url).port or 6379)
    reset_budgets()  # no Redis connection of an earlier test's budget

    def client_sockets() -> int:  # this process's connections to the simulator's REST port and to Redis
        return sum(_sockets_to(port) for port in ports)

    before = client_sockets()  # other tests' clients of Redis may stay open in this process
    assert warm_rest(settings) == 2
    # neither the HTTPS connection nor the budget's Redis one is left open for a fork to copy
    assert client_sockets() == before
    assert sim.stats()["requests"].get("/fapi/v1/time") == 2
    # nothing listening, and an untrusted certificate: no call succeeds, nothing raises
    refused = {**env, "KRAITE_BINANCE_REST_URL": "http://127.0.0.1:9"}
    assert warm_rest(load_settings(None, environ=refused)) == 0
    untrusted = {k: v for k, v in env.items() if k != "KRAITE__binance__ca_file"}
    assert warm_rest(load_settings(None, environ=untrusted)) == 0
    assert client_sockets() == before
