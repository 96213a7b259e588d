"""The network-namespace harness (tests/netns.py) itself: hosts reach the root namespace's PostgreSQL,
Redis and simulator through its forwarders, a partition cuts a host off and a heal restores it, ``kill``
leaves no process in a host, teardown leaves no namespace, link or process, and a crashed run's
namespaces are removed by the next run. Real namespaces, real sockets; skipped where ``ip netns add``
is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import netns
import pytest
from support import require_tcp_loopback

pytestmark = pytest.mark.integration

#: Runs inside a host: connects to PostgreSQL, Redis, the simulator's REST and its mark-price stream
#: (in parallel, 2 s timeouts) and prints one JSON object {service: "ok ..." | "error ..."}.
PROBE = r"""
import json, sys, threading
import psycopg2, redis, requests, websocket
pg_url, redis_url, rest_url, ws_url = sys.argv[1:5]
out = {}
def pg():
    conn = psycopg2.connect(pg_url, connect_timeout=2)
    with conn.cursor() as cur:
        cur.execute("SELECT inet_client_addr()::text")
        return cur.fetchone()[0]
def rds():
    return redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2).ping()
def rest():
    return requests.get(rest_url + "/fapi/v1/time", timeout=2).json()["serverTime"] > 0
def ws():
    conn = websocket.create_connection(ws_url + "/market/ws/!markPrice@arr@1s", timeout=3)
    try:
        return len(json.loads(conn.recv())) > 0
    finally:
        conn.close()
def run(name, fn):
    try:
        out[name] = "ok %s" % (fn(),)
    except Exception as exc:
        out[name] = "error %s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
threads = [threading.Thread(target=run, args=(n, f)) for n, f in (("pg", pg), ("redis", rds), ("rest", rest), ("ws", ws))]
for t in threads: t.start()
for t in threads: t.join(10)
print(json.dumps(out))
"""


@pytest.fixture()
def hosts() -> Iterator[netns.Hosts]:
    with netns.hosts_or_skip("h1", "h2") as h:
        yield h


def probe(hosts: netns.Hosts, host: str, urls: list[str]) -> dict[str, str]:
    proc = hosts.exec(host, [sys.executable, "-c", PROBE, *urls], env=dict(os.environ), timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def all_ok(result: dict[str, str]) -> bool:
    return set(result) == {"pg", "redis", "rest", "ws"} and all(v.startswith("ok") for v in result.values())


def all_failed(result: dict[str, str]) -> bool:
    return set(result) == {"pg", "redis", "rest", "ws"} and all(
        v.startswith("error") for v in result.values()
    )


def test_hosts_reach_the_services_through_forwarders_and_a_partition_cuts_one_off(
    hosts: netns.Hosts, database_url: str, redis_url: str, simulator: Any
) -> None:
    require_tcp_loopback(database_url, redis_url)
    pg_url, pg_fwd = hosts.forward_url(database_url)
    rds_url, _ = hosts.forward_url(redis_url)
    sim_rest, sim_fwd = hosts.forward_url(simulator.rest_url, per_host_source=True)
    urls = [pg_url, rds_url, sim_rest, sim_rest.replace("http://", "ws://")]
    assert all(hosts.bridge_ip in u for u in urls) and all("127.0.0.1" not in u for u in urls)
    # the root namespace's loopback is not the host's: the unforwarded URL fails inside a host
    direct = probe(hosts, "h1", [database_url, redis_url, simulator.rest_url, simulator.ws_url])
    assert all_failed(direct), direct

    before = {h: probe(hosts, h, urls) for h in ("h1", "h2")}
    assert all(all_ok(r) for r in before.values()), before
    # PostgreSQL sees the forwarder (127.0.0.1); the simulator sees one loopback source per host
    assert before["h1"]["pg"] == "ok 127.0.0.1/32", before
    per_ip = simulator.stats()["rest_limits"]["per_ip"]
    assert {"127.0.0.11", "127.0.0.12"} <= set(per_ip), per_ip
    assert {r.peer for r in sim_fwd.relays} == {hosts.hosts["h1"].ip, hosts.hosts["h2"].ip}
    assert any(r.first_line.startswith("GET /market/ws/") for r in sim_fwd.relays)

    hosts.partition("h1")
    cut = {h: probe(hosts, h, urls) for h in ("h1", "h2")}
    assert all_failed(cut["h1"]) and all_ok(cut["h2"]), cut

    hosts.heal("h1")
    healed = {h: probe(hosts, h, urls) for h in ("h1", "h2")}
    assert all(all_ok(r) for r in healed.values()), healed
    assert pg_fwd.accepted >= 4 and pg_fwd.failed == 0


#: Holds one Redis connection and PINGs on it every 0.1 s, printing "ok"/"error" and the client port.
PINGER = r"""
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1], socket_timeout=30, retry_on_timeout=False)
for _ in range(600):
    try:
        client.ping()
        print("ok", client.connection_pool._available_connections[0]._sock.getsockname()[1], flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, flush=True)
    time.sleep(0.1)
"""


def test_an_established_connection_stalls_during_a_partition_and_resumes_after_the_heal(
    hosts: netns.Hosts, redis_url: str, tmp_path: Any
) -> None:
    require_tcp_loopback(redis_url)
    url, _ = hosts.forward_url(redis_url)
    log = tmp_path / "pinger.log"
    hosts.run("h1", [sys.executable, "-c", PINGER, url], dict(os.environ), log)

    def oks() -> list[str]:
        return [line for line in log.read_text().splitlines() if line.startswith("ok")]

    deadline = time.monotonic() + 15
    while len(oks()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(oks()) >= 3, log.read_text()
    hosts.partition("h1")
    time.sleep(0.5)  # a ping in flight when the link went down may still have been answered
    during = len(oks())
    time.sleep(2.0)
    assert len(oks()) == during, "pings answered while partitioned"
    hosts.heal("h1")
    deadline = time.monotonic() + 15
    while len(oks()) < during + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert len(oks()) >= during + 3, lines[-10:]
    # the same TCP connection carried on: no error, no reconnect (one client port throughout)
    assert not [line for line in lines if line.startswith("error")], lines[-10:]
    assert len({line.split()[1] for line in oks()}) == 1, lines[-10:]


#: A process tree in a host: a child that leaves the process group (setsid), then a plain one.
TREE = (
    "import subprocess, time;"
    "subprocess.Popen(['setsid', 'sleep', '300']);"
    "subprocess.Popen(['sleep', '301']);"
    "time.sleep(300)"
)


def test_kill_leaves_no_process_in_the_host_and_teardown_leaves_nothing(tmp_path: Any) -> None:
    with netns.hosts_or_skip("h1", "h2") as hosts:
        prefix = hosts.prefix
        h1 = hosts.run("h1", [sys.executable, "-c", TREE], dict(os.environ), tmp_path / "h1.log")
        h2 = hosts.run("h2", [sys.executable, "-c", TREE], dict(os.environ), tmp_path / "h2.log")
        # the pid is the command's (ip netns exec execs it), in the host's namespace
        assert netns._pid_netns_inode(h1.pid) == netns._netns_inode(hosts.hosts["h1"].ns)
        with open(f"/proc/{h1.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == sys.executable.encode()
        deadline = time.monotonic() + 10
        while (len(hosts.pids("h1")) < 3 or len(hosts.pids("h2")) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        h1_pids, h2_pids = hosts.pids("h1"), hosts.pids("h2")
        assert len(h1_pids) == 3 and len(h2_pids) == 3, (h1_pids, h2_pids)
        assert os.getpgid(h1.pid) == h1.pid  # its own process group (and session)
        hosts.kill("h1")
        assert hosts.pids("h1") == [] and not any(netns._alive(p) for p in h1_pids)
        assert all(netns._alive(p) for p in h2_pids)  # the other host is untouched
        assert h1.returncode is not None
    # teardown: no namespace, no link, no process of this run
    assert not [n for n in netns.list_netns() if n.startswith(prefix)]
    assert not [link for link in netns.list_links() if link.startswith(prefix)]
    assert not any(netns._alive(p) for p in h2_pids) and h2.returncode is not None
    assert not os.path.exists(netns.OWNER_DIR / f"{prefix}.owner")


def test_a_crashed_runs_namespaces_are_removed_and_a_live_runs_are_kept() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    crashed, live = f"kmp{os.urandom(3).hex()}", f"kmp{os.urandom(3).hex()}"
    sleeper = None
    try:
        for prefix in (crashed, live):
            netns.ip("netns", "add", f"{prefix}-h1")
            netns.ip("link", "add", f"{prefix}br", "type", "bridge")
        netns.OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (netns.OWNER_DIR / f"{live}.owner").write_text(str(os.getpid()))  # alive: this process
        (netns.OWNER_DIR / f"{crashed}.owner").write_text("999999999")  # no such pid
        sleeper = subprocess.Popen(
            ["ip", "netns", "exec", f"{crashed}-h1", "sleep", "300"], start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not netns.netns_pids(f"{crashed}-h1") and time.monotonic() < deadline:
            time.sleep(0.02)
        with netns.hosts_or_skip() as hosts:
            assert {f"{crashed}-h1", f"{crashed}br"} <= set(hosts.removed_stale)
            assert not {f"{live}-h1", f"{live}br"} & set(hosts.removed_stale)
        assert sleeper.wait(timeout=10) != 0
        assert f"{crashed}-h1" not in netns.list_netns() and f"{crashed}br" not in netns.list_links()
        assert f"{live}-h1" in netns.list_netns() and f"{live}br" in netns.list_links()
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(5)
        for prefix in (crashed, live):
            netns.ip("netns", "del", f"{prefix}-h1", check=False)
            netns.ip("link", "del", f"{prefix}br", check=False)
            (netns.OWNER_DIR / f"{prefix}.owner").unlink(missing_ok=True)


#: Without CAP_SYS_ADMIN (dropped from the bounding set, so the python that runs this lacks it).
REFUSED = r"""
import sys
sys.path.insert(0, sys.argv[1])
import pytest, netns
try:
    with netns.hosts_or_skip("h1"):
        print("not skipped")
except pytest.skip.Exception as exc:
    print("skipped:", exc.msg)
"""


def test_the_fixture_skips_with_the_reason_when_ip_netns_add_is_refused() -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop CAP_SYS_ADMIN")
    before = set(netns.list_netns())
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c", REFUSED, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("skipped: network namespaces unavailable: ip netns add is refused"), (
        proc.stdout
    )
    assert set(netns.list_netns()) == before
