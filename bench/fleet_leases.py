"""Benchmark: Redis commands per second per host that the fleet's membership and leases cost.

Usage::

    python bench/fleet_leases.py [--accounts 1000] [--hosts 1,3] [--seconds 30] [--failover 15]

A private ``redis-server`` (the embedded one, on a unix socket of its own) so that its
``total_commands_processed`` counts nothing but this benchmark. For each host count H, H
``FleetOwnership`` members (the supervisor's own code, in this process) share ``--accounts`` accounts
and step at their production interval (``fleet.failover_s`` / 6) until every lease is held; then for
``--seconds`` the members keep stepping (a quiet fleet: renewals only) while a MONITOR client counts
what reaches the server. Reported per host: the commands the host sent (round trips' worth of work on
the wire: per second and per step) and the commands Redis executed for them, those run inside the
renewal script included (a lease's check-and-extend is a GET and a PEXPIRE).
The goal of the fleet issue: < 100 commands/s per host at 1,000 accounts.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kraite_mp.config.load import load_settings  # noqa: E402
from kraite_mp.ops.embedded import RedisServer  # noqa: E402
from kraite_mp.supervisor.fleet import FleetOwnership  # noqa: E402

#: Steps of every member before the counting starts at the latest (leases taken, handovers settled).
MAX_SETTLE_STEPS = 50


#: Markers the benchmark sends (ECHO) so that MONITOR counts only what lies between them.
START, STOP = "bench-fleet-start", "bench-fleet-stop"


def run_case(url: str, accounts: int, hosts: int, seconds: float, failover_s: float) -> dict[str, float]:
    env = {
        "KRAITE_REDIS_URL": url,
        "KRAITE_REDIS_NAMESPACE": f"bench-fleet-{uuid.uuid4().hex[:8]}",
        "KRAITE__fleet__failover_s": str(failover_s),
    }
    settings = load_settings(None, environ=env, search=())
    members = [FleetOwnership(settings, f"host{i}") for i in range(hosts)]
    ids = list(range(1, accounts + 1))
    owned: dict[str, set[int]] = {m.host_id: set() for m in members}
    # settle: every account leased by exactly one member (the first step of each only registers)
    for _ in range(MAX_SETTLE_STEPS):
        for m in members:
            view = m.step(ids, owned[m.host_id], may_lead=True)
            owned[m.host_id] = set(view.owned)
        if sum(len(m.view.leases) for m in members) == accounts and not any(m.handing_over for m in members):
            break
    else:
        raise SystemExit(f"{hosts} host(s): the leases never settled")
    sent, executed = count_commands(url, members, ids, owned, seconds)
    for m in members:
        m.release_all()
    return {
        "hosts": hosts,
        "accounts": accounts,
        "leases_per_host": accounts / hosts,
        "step_s": members[0].step_s,
        "steps": sent["steps"],
        "sent_per_s_per_host": sent["commands"] / sent["elapsed"] / hosts,
        "executed_per_s_per_host": executed / sent["elapsed"] / hosts,
        "sent_per_step_per_host": sent["commands"] / (sent["steps"] * hosts),
        "executed_per_step_per_host": executed / (sent["steps"] * hosts),
    }


def count_commands(
    url: str, members: list[FleetOwnership], ids: list[int], owned: dict[str, set[int]], seconds: float
) -> tuple[dict[str, float], int]:
    """Step every member at its interval for ``seconds`` while MONITOR watches: (commands the members sent,
    with the steps and the elapsed time), and the commands Redis executed (those inside scripts too)."""
    import redis

    counted = {"client": 0, "lua": 0}
    done = threading.Event()

    def watch() -> None:
        watcher = redis.Redis.from_url(url)
        try:
            with watcher.monitor() as monitor:
                started = False
                while True:
                    cmd = monitor.next_command()
                    text = cmd["command"]
                    if text == f"ECHO {START}":
                        started = True
                        ready.set()
                    elif text == f"ECHO {STOP}":
                        return
                    elif started:
                        counted["lua" if cmd["client_type"] == "lua" else "client"] += 1
        finally:
            watcher.close()
            done.set()

    ready = threading.Event()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    probe = redis.Redis.from_url(url)
    try:
        time.sleep(0.5)  # MONITOR is on
        probe.echo(START)
        if not ready.wait(10):
            raise SystemExit("MONITOR never saw the start marker")
        started = time.monotonic()
        steps = 0
        step_s = members[0].step_s
        next_at = started
        while time.monotonic() - started < seconds:
            for m in members:
                m.step(ids, owned[m.host_id], may_lead=True)
            steps += 1
            next_at += step_s
            time.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - started
        probe.echo(STOP)
        if not done.wait(30):
            raise SystemExit("MONITOR never saw the stop marker")
    finally:
        probe.close()
    return {"commands": counted["client"], "steps": steps, "elapsed": elapsed}, counted["client"] + counted[
        "lua"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--hosts", default="1,3")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--failover", type=float, default=15.0)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        print(
            f"fleet leases: {args.accounts} accounts, fleet.failover_s={args.failover:g}"
            f" (step every {args.failover / 6:g} s), {args.seconds:g} s counted, private redis-server"
        )
        print(
            f"{'hosts':>5} {'leases/host':>11} {'steps':>5} {'sent/s/host':>11} {'executed/s/host':>15}"
            f" {'sent/step':>9} {'executed/step':>13}"
        )
        for hosts in (int(h) for h in args.hosts.split(",")):
            r = run_case(server.url, args.accounts, hosts, args.seconds, args.failover)
            print(
                f"{r['hosts']:>5} {r['leases_per_host']:>11.0f} {r['steps']:>5}"
                f" {r['sent_per_s_per_host']:>11.2f} {r['executed_per_s_per_host']:>15.1f}"
                f" {r['sent_per_step_per_host']:>9.1f} {r['executed_per_step_per_host']:>13.1f}"
            )
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    main()
