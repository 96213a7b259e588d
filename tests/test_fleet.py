"""Fleet ownership (kraite_mp.supervisor.fleet) against a real Redis: membership, rendezvous assignment,
exclusive leases, failover of a member that stops renewing, handover back without a gap, mark-price
leadership, and a Redis that cannot be reached. Several members in one process, each with its own
host id, step in turn (the multi-host test with real hosts is tests/test_fleet_netns.py)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
import redis
from support import children_of, title_of, wait_for

from kraite_mp.config.load import load_settings
from kraite_mp.supervisor.fleet import FleetOwnership, assign, fleet_members, lease_key
from kraite_mp.supervisor.publish import status_key

ACCOUNTS = list(range(1, 61))


@pytest.fixture(autouse=True)
def own_namespace(kraite_env: dict[str, str]) -> None:
    """Each test its own fleet (the members of one test must not be live in the next)."""
    kraite_env["KRAITE_REDIS_NAMESPACE"] += f"-fleet-{uuid.uuid4().hex[:8]}"


def make(kraite_env: dict[str, str], host: str, **env: str) -> FleetOwnership:
    settings = load_settings(
        None,
        environ={
            **kraite_env,
            "KRAITE__supervisor__ownership": "fleet",
            "KRAITE__fleet__failover_s": "3",
            **env,
        },
    )
    return FleetOwnership(settings, host)


def step_all(
    members: list[FleetOwnership], streaming: dict[str, set[int]] | None = None, rounds: int = 2
) -> None:
    for _ in range(rounds):
        for m in members:
            m.step(ACCOUNTS, (streaming or {}).get(m.host_id, set()), may_lead=True)


@pytest.mark.integration
def test_rendezvous_moves_only_the_share_of_a_joining_or_leaving_member() -> None:
    ids = range(1, 1001)
    three = {a: assign(["h1", "h2", "h3"], a) for a in ids}
    counts = collections.Counter(three.values())
    assert all(250 < n < 420 for n in counts.values()), counts  # about a third each
    four = {a: assign(["h1", "h2", "h3", "h4"], a) for a in ids}
    moved = [a for a in ids if three[a] != four[a]]
    assert all(four[a] == "h4" for a in moved)  # only to the new member
    assert 180 < len(moved) < 320  # about a quarter
    two = {a: assign(["h1", "h3"], a) for a in ids}
    assert all(two[a] == three[a] for a in ids if three[a] != "h2")  # h2 leaving moves only its own


@pytest.mark.integration
def test_members_share_the_accounts_with_exclusive_leases_and_one_mark_price_leader(
    kraite_env: dict[str, str],
) -> None:
    members = [make(kraite_env, h) for h in ("h1", "h2", "h3")]
    step_all(members)
    leases = [m.view.leases for m in members]
    assert set().union(*leases) == set(ACCOUNTS)
    assert sum(len(x) for x in leases) == len(ACCOUNTS)  # disjoint
    assert all(m.view.owned == m.view.leases for m in members)
    assert sum(m.view.lead_mark_price for m in members) == 1
    for m in members:
        assert all(assign(["h1", "h2", "h3"], a) == m.host_id for a in m.view.leases)
    listed = {
        r["host_id"]: r
        for r in fleet_members(redis.Redis.from_url(members[0].settings.redis_url), members[0].namespace)
    }
    assert set(listed) == {"h1", "h2", "h3"} and sum(r["accounts"] for r in listed.values()) == len(ACCOUNTS)
    for m in members:
        m.release_all()


@pytest.mark.integration
def test_a_dead_member_s_accounts_move_after_its_leases_expire_and_come_back_without_a_gap(
    kraite_env: dict[str, str],
) -> None:
    h1, h2, h3 = (make(kraite_env, h) for h in ("h1", "h2", "h3"))
    step_all([h1, h2, h3])
    theirs = set(h2.view.leases)
    assert theirs
    leader_was_h2 = h2.view.lead_mark_price
    # h2 dies: it stops renewing; the others take its accounts once its leases expired (lease_s = 2 s)
    deadline = time.monotonic() + 20
    while not theirs <= (h1.view.leases | h3.view.leases) and time.monotonic() < deadline:
        step_all([h1, h3], rounds=1)
        time.sleep(0.2)
    assert theirs <= (h1.view.leases | h3.view.leases)
    assert not (h1.view.leases & h3.view.leases)
    assert h1.view.lead_mark_price or h3.view.lead_mark_price
    assert not (leader_was_h2 and (h1.view.lead_mark_price and h3.view.lead_mark_price))
    # h2 comes back (a new process, same host id): it streams its accounts at once, while the others
    # still hold the leases (overlap) ...
    back = make(kraite_env, "h2")
    back.step(ACCOUNTS, set(), may_lead=True)  # joins
    step_all([h1, h3], rounds=1)  # the others see it: its accounts are assigned to it again
    back.step(ACCOUNTS, set(), may_lead=True)
    assert back.view.owned == theirs and not back.view.leases
    assert theirs <= (h1.view.leases | h3.view.leases)  # ... no gap: the old holders keep streaming
    # a status written before the handover began (a stream that ran before a partition) does not count
    client = redis.Redis.from_url(back.settings.redis_url)
    for a in theirs:
        stale = json.dumps({"state": "streaming", "ts": time.time() - 60})
        client.set(status_key(back.namespace, "h2", f"user-data-{a}"), stale, ex=30)
    step_all([h1, h3], rounds=1)
    assert theirs <= (h1.view.leases | h3.view.leases)  # still held: no gap on a stale word
    # ... and once its streams report "streaming", the old holders let go and h2 takes the leases
    for a in theirs:
        client.set(
            status_key(back.namespace, "h2", f"user-data-{a}"),
            json.dumps({"state": "streaming", "ts": time.time()}),
            ex=30,
        )
    step_all([h1, h3, back], rounds=2)
    assert back.view.leases == theirs
    assert not (theirs & (h1.view.leases | h3.view.leases))
    for m in (h1, h3, back):
        m.release_all()


@pytest.mark.integration
def test_a_lease_of_a_live_member_is_never_taken_and_a_lost_lease_is_given_up(
    kraite_env: dict[str, str],
) -> None:
    a = make(kraite_env, "ha")
    a.step(ACCOUNTS, set(), may_lead=False)  # the first step only joins
    assert not a.view.owned
    a.step(ACCOUNTS, set(), may_lead=False)
    assert a.view.leases == set(ACCOUNTS)
    client = redis.Redis.from_url(a.settings.redis_url)
    # someone else's lease on account 5 (as after a partition healed): ha gives it up at its next renewal
    client.set(lease_key(a.namespace, 5), "hb:other", px=5000)
    a.step(ACCOUNTS, set(), may_lead=False)
    assert 5 not in a.view.leases
    # hb is not a live member: ha does not stream 5 before the foreign lease expired, then takes it
    assert 5 not in a.view.owned
    wait_for(
        lambda: 5 in a.step(ACCOUNTS, set(), may_lead=False).leases, 10, interval=0.3, message="lease retaken"
    )
    a.release_all()


@pytest.mark.integration
def test_redis_unreachable_keeps_what_is_owned(kraite_env: dict[str, str]) -> None:
    from kraite_mp.ops.embedded import free_port

    a = make(kraite_env, "hx")
    a.step(ACCOUNTS[:5], set(), may_lead=True)
    a.step(ACCOUNTS[:5], set(), may_lead=True)
    assert a.view.owned == set(ACCOUNTS[:5])
    a.settings.redis_url = f"redis://127.0.0.1:{free_port()}/0"  # Redis gone
    view = a.step(ACCOUNTS, set(), may_lead=True)
    assert not view.ok and view.owned == set(ACCOUNTS[:5])  # nothing dropped, nothing new
    a.settings.redis_url = kraite_env["KRAITE_REDIS_URL"]
    a.release_all()


@pytest.mark.e2e
def test_two_supervisors_share_the_accounts_and_one_takes_over_when_the_other_dies(
    db: Any, secret_key: str, kraite_env: dict[str, str], processes: Any, run_dir: str, tmp_path: Any
) -> None:
    """Two real `kraite-mp run` (host ids a and b, one machine) against the simulator: every account
    streamed once, one mark-price stream; SIGKILL a's supervisor and children: b streams everything."""
    from test_supervisor import FAST_ENV, Supervisor, alive

    from kraite_mp.simulator import Simulator
    from kraite_mp.store.accounts import add_account

    sim = Simulator(accounts=6, symbols=20, rate=0.0, seed=11)
    sim.start()
    sups: dict[str, Any] = {}
    envs: dict[str, dict[str, str]] = {}
    try:
        keys = [
            add_account(db, secret_key, name=f"fleet{i}", api_key=a.api_key, api_secret=a.api_secret).id
            for i, a in enumerate(sim.accounts)
        ]
        assert len(keys) == 6
        for host in ("a", "b"):
            env = {
                **kraite_env,
                **FAST_ENV,
                "KRAITE_BINANCE_REST_URL": sim.rest_url,
                "KRAITE_BINANCE_WS_URL": sim.ws_url,
                "KRAITE_RUN_DIR": str(tmp_path / host / "run"),
                "KRAITE__user_data_stream__spool_dir": str(tmp_path / host / "spool"),
                "KRAITE__supervisor__ownership": "fleet",
                "KRAITE__supervisor__host_id": host,
                "KRAITE__fleet__failover_s": "4",
                "KRAITE__fleet__handover_timeout_s": "5",
            }
            envs[host] = env
            sups[host] = Supervisor(
                processes, env, [sys.executable, "-m", "kraite_mp", "run"], tmp_path / f"{host}.log"
            )

        def connections() -> dict[str, int]:
            return dict(sim.stats()["current_connections"])

        def settled() -> bool:
            c = connections()
            return all(c.get(a.api_key, 0) == 1 for a in sim.accounts) and c.get("market", 0) == 1

        wait_for(settled, 60, interval=0.2, message=f"one stream per account; {connections()}")
        time.sleep(3.0)  # a handover still in flight would show as a second connection now
        assert settled(), connections()
        logs = {h: s.log() for h, s in sups.items()}
        assert all("fleet (" in text for text in logs.values()), logs
        shares = {h: sum("user-data" in title_of(p) for p in children_of(s.pid)) for h, s in sups.items()}
        assert sum(shares.values()) == 6 and all(shares.values()), shares  # shared, once each
        out = subprocess.run(
            [sys.executable, "-m", "kraite_mp", "fleet", "--json"],
            env=envs["a"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        listed = json.loads(out.stdout)
        assert {m["host_id"] for m in listed["members"]} == {"a", "b"}
        assert listed["accounts"] == 6 and listed["mark_price_leader"] in ("a", "b")
        a_children = children_of(sups["a"].pid)
        os.killpg(sups["a"].pid, signal.SIGKILL)  # the host dies: its supervisor and children at once
        for pid in a_children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

        def streams_of(host: str) -> int:
            return sum("user-data" in title_of(p) for p in children_of(sups[host].pid))

        wait_for(
            lambda: streams_of("b") == 6 and settled(),
            60,
            interval=0.2,
            message=f"b streams every account; {connections()}; b's log:\n{sups['b'].log()[-3000:]}",
        )
        assert "took the lease of mark-price" in sups["b"].log() or "mark-price" in "".join(
            title_of(p) for p in children_of(sups["b"].pid)
        )
    finally:
        for s in sups.values():
            if alive(s.pid):
                os.killpg(s.pid, signal.SIGTERM)
        for s in sups.values():
            try:
                s.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                os.killpg(s.pid, signal.SIGKILL)
            s.close()
        sim.stop()
