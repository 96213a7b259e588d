"""Prometheus metrics end to end: `kraite-mp run` and a worker against the simulator, `/metrics` scraped
over HTTP and parsed with prometheus_client's parser, the counters checked against the database; a
killed child raises the restart counter; a stopped Redis fails `/readyz` while `/healthz` passes."""

from __future__ import annotations

import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for
from test_supervisor import FAST_ENV, Supervisor, by_role

from kraite_mp.ops.embedded import RedisServer, free_port
from kraite_mp.ops.seed import seed_symbols
from kraite_mp.store.accounts import add_account

pytestmark = pytest.mark.e2e


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0.0) + s.value
    return out


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in found.items() if n == name and want <= set(lab))


def ws_rows(db: Any, account_id: int) -> int:
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM api_data_stream WHERE account_id = %s AND source = 'ws'", (account_id,)
        )
        n = int(cur.fetchone()[0])
    db.commit()
    return n


def test_metrics_count_what_the_database_holds_and_readyz_follows_redis(
    db: Any, secret_key: str, kraite_env: dict[str, str], processes: Any, run_dir: str, simulator: Any
) -> None:
    sim = simulator
    seed_symbols(db, [s for s, _ in sim.mark_symbols], coverage=1.0)
    ids = {
        add_account(db, secret_key, name=f"m{i}", api_key=a.api_key, api_secret=a.api_secret).id: a.api_key
        for i, a in enumerate(sim.accounts)
    }
    redis_server = RedisServer().start()
    port = free_port()
    env = {
        **kraite_env,
        **FAST_ENV,
        "KRAITE_REDIS_URL": redis_server.url,
        "KRAITE_BINANCE_REST_URL": sim.rest_url,
        "KRAITE_BINANCE_WS_URL": sim.ws_url,
        "KRAITE__metrics__listen": f"127.0.0.1:{port}",
    }
    sup = Supervisor(
        processes, env, [sys.executable, "-m", "kraite_mp", "run"], Path(run_dir) / "supervisor.log"
    )
    worker = Supervisor(  # a worker of the host joins its metrics directory (docs/METRICS.md)
        processes,
        {**env, "PROMETHEUS_MULTIPROC_DIR": os.path.join(env["KRAITE_RUN_DIR"], "metrics")},
        [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--processes", "1", "--threads", "4"],
        Path(run_dir) / "worker.log",
    )
    try:
        wanted = {"mark-price", *(f"user-data-{i}" for i in ids)}  # (by_role knows no metrics child)
        sup.wait_children(wanted, timeout=60)
        wait_for(lambda: scrape(port, "/readyz")[0] == 200, 60, message=f"ready; log:\n{sup.log()[-2000:]}")
        assert scrape(port, "/healthz") == (200, "ok\n")
        sim.set_rate(5.0)
        wait_for(lambda: all(sim.stats()["frames_sent"].get(k, 0) >= 20 for k in ids.values()), 60)
        sim.set_rate(0.0)
        sent = {i: int(sim.stats()["frames_sent"][k]) for i, k in ids.items()}
        wait_for(lambda: all(ws_rows(db, i) == n for i, n in sent.items()), 60, message="frames audited")

        def counted() -> dict[int, float]:
            found = samples(scrape(port)[1])
            return {i: total(found, "kraite_user_data_frames_total", account=str(i)) for i in ids}

        # the children flush their counters as they go: the scrape agrees with the database
        wait_for(lambda: counted() == {i: float(n) for i, n in sent.items()}, 30, message=f"frames {sent}")
        found = samples(scrape(port)[1])
        assert total(found, "kraite_frame_to_commit_seconds_count") == sum(sent.values())
        assert all(total(found, "kraite_user_data_connected", account=str(i)) == 1 for i in ids)
        rows = total(found, "kraite_mark_price_rows_total")
        assert rows > 0 and total(found, "kraite_mark_price_write_seconds_count") > 0
        assert total(found, "kraite_mark_price_last_tick_timestamp_seconds") > 0
        assert total(found, "kraite_child_state", key="metrics", state="RUNNING") == 1
        assert total(found, "kraite_dead_letters") == 0
        assert total(found, "kraite_rest_responses_total", status="200") >= len(
            ids
        )  # the listenKeys at least
        assert not any("secret" in name or "api_key" in str(lab) for name, lab in found)

        # a killed child: restarted, and counted
        before = total(found, "kraite_child_restarts_total", role="user-data")
        victim = next(iter(ids))
        os.kill(by_role(sup.pid)[f"user-data-{victim}"], signal.SIGKILL)
        wait_for(
            lambda: (
                total(samples(scrape(port)[1]), "kraite_child_restarts_total", role="user-data") == before + 1
            ),
            60,
            message="the restart counted",
        )

        # Redis stops: not ready (and says why), still alive
        redis_server.stop()
        wait_for(lambda: scrape(port, "/readyz")[0] == 503, 30, message="/readyz fails without Redis")
        assert "redis" in scrape(port, "/readyz")[1]
        assert scrape(port, "/healthz")[0] == 200
    finally:
        sim.set_rate(0.0)
        if sup.proc.poll() is None:
            sup.proc.send_signal(signal.SIGTERM)
            try:
                sup.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                os.killpg(sup.pid, signal.SIGKILL)
        sup.close()
        worker.close()
        redis_server.cleanup()
