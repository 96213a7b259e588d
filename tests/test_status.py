"""Status in Redis: the child and supervisor hooks, and ``kraite-mp status`` (real Redis)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from kraite_mp import exitcodes
from kraite_mp.config import Settings
from kraite_mp.logs import forget_secret, register_secret
from kraite_mp.ops import status
from kraite_mp.ops.embedded import free_port
from kraite_mp.store.accounts import Account
from kraite_mp.supervisor import publish
from kraite_mp.supervisor.context import ChildContext
from kraite_mp.supervisor.publish import RedisStatus, Reporters


@pytest.fixture()
def namespace(redis_namespace: str) -> str:
    # under the session namespace, so the session fixture deletes it; unique so tests do not see each other
    return f"{redis_namespace}-status-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def status_settings(settings: Settings, namespace: str) -> Settings:
    s = dataclasses.replace(settings, redis_namespace=namespace)
    os.makedirs(os.path.join(s.run_dir, "heartbeats"), exist_ok=True)
    return s


@pytest.fixture()
def reporter() -> Iterator[RedisStatus]:
    r = RedisStatus()
    try:
        yield r
    finally:
        r.on_shutdown()


def _ctx(s: Settings, reporter: RedisStatus, role: str, account: Account | None = None) -> ChildContext:
    return ChildContext(s, role, account, reporters=Reporters([reporter]))


@pytest.fixture()
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def _account(account_id: int = 7, name: str = "alice") -> Account:
    return Account(id=account_id, name=name, exchange="binance", api_key="k" * 16, api_secret_token="tok")


def _env(kraite_env: dict[str, str], namespace: str, **extra: str) -> dict[str, str]:
    env = dict(kraite_env, KRAITE_REDIS_NAMESPACE=namespace)
    env.update(extra)
    return env


def _status_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kraite_mp", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_child_hook_publishes_heartbeat_with_ttl(
    status_settings: Settings, rclient: redis.Redis, reporter: RedisStatus
) -> None:
    key = publish.status_key(status_settings.redis_namespace, publish.host_name(), "user-data-7")
    ChildContext(status_settings, "user-data", _account()).beat("streaming", force=True, frames=1)
    assert rclient.get(key) is None, "a context without reporters publishes nothing"

    ctx = _ctx(status_settings, reporter, "user-data", _account())
    ctx.beat("streaming", force=True, frames=1532, last=3, backlog=0)

    raw = rclient.get(key)
    assert raw is not None, "the hook wrote nothing"
    data = json.loads(raw)
    assert data["state"] == "streaming"
    assert data["role"] == "user-data"
    assert data["account_id"] == 7 and data["account_name"] == "alice"
    assert data["pid"] == os.getpid()
    assert data["host"] == publish.host_name()
    assert data["fields"] == {"frames": 1532, "last": 3, "backlog": 0}
    assert data["uptime_s"] >= 0
    assert 0 < rclient.ttl(key) <= publish.STATUS_TTL_S


@pytest.mark.integration
def test_relayed_children_publish_nothing_and_the_supervisor_publishes_their_heartbeats(
    status_settings: Settings, rclient: redis.Redis
) -> None:
    """``kraite-mp run``'s reporter (``relay_children``): a child's beat writes its heartbeat file only; the
    supervisor publishes the files in one round trip, with the child's own ``ts``, redacted as before."""
    from kraite_mp.supervisor import runfiles

    relay = RedisStatus(relay_children=True)
    secret = "S3cr3t-" + uuid.uuid4().hex
    register_secret(secret)
    try:
        assert Reporters([relay]).relays_child_beats and not Reporters([RedisStatus()]).relays_child_beats
        children = [_ctx(status_settings, relay, "user-data", _account(i, f"n{i}")) for i in (11, 12)]
        children[0].fail(f"HTTP 401 for https://x/?listenKey=abcdefgh123 secret={secret}")
        for ctx in children:
            ctx.beat("streaming", force=True, frames=5)
        children[1].fields["note"] = f"leak {secret}"
        children[1].beat(force=True)
        with open(children[1].heartbeat_path) as f:
            assert secret not in f.read()  # redacted in the child, which knows its secrets
        children[1].fields.pop("note")
        children[1].beat(force=True)
        keys = [
            publish.status_key(status_settings.redis_namespace, publish.host_name(), c.key) for c in children
        ]
        assert rclient.exists(*keys) == 0, "a relayed child published its own status"
        assert relay.publisher is None  # and opened no Redis connection for it

        beats = [runfiles.read_heartbeat(c.heartbeat_path) for c in children]
        assert all(b is not None for b in beats)
        relay.on_child_beats(status_settings, beats)  # type: ignore[arg-type]
        assert relay.publisher is not None and relay.publisher.published == 2
        for ctx, key, beat in zip(children, keys, beats, strict=True):
            raw = rclient.get(key)
            assert raw is not None
            data = json.loads(raw)
            assert (data["state"], data["pid"], data["fields"]) == ("streaming", os.getpid(), {"frames": 5})
            assert data["ts"] == pytest.approx(beat["ts"]) and data["account_id"] == ctx.account.id  # type: ignore[index,union-attr]
            assert secret not in raw and "abcdefgh123" not in raw
        assert "***" in rclient.get(keys[0])  # type: ignore[operator]
    finally:
        forget_secret(secret)
        relay.on_shutdown()


@pytest.mark.integration
def test_publish_is_throttled_unless_state_or_error_changes(status_settings: Settings) -> None:
    pub = publish.StatusPublisher(status_settings.redis_url, status_settings.redis_namespace, interval_s=3600)
    try:
        assert pub.publish("k", {"state": "streaming", "fields": {"frames": 1}})
        assert not pub.publish("k", {"state": "streaming", "fields": {"frames": 2}}), "not throttled"
        assert pub.publish("k", {"state": "reconnecting"}), "a state change must publish at once"
        assert pub.publish("k", {"state": "reconnecting", "error": "boom"}), (
            "a new error must publish at once"
        )
        assert pub.publish("k", {"state": "reconnecting", "error": "boom"}, force=True)
        assert pub.published == 4
    finally:
        pub.close()


@pytest.mark.integration
def test_dead_redis_never_raises_and_backs_off(
    status_settings: Settings, caplog: pytest.LogCaptureFixture, reporter: RedisStatus
) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    s = dataclasses.replace(status_settings, redis_url=dead_url)
    ctx = _ctx(s, reporter, "mark-price")
    with caplog.at_level("WARNING", logger="kraite_mp.supervisor.publish"):
        for i in range(5):
            ctx.beat("streaming", force=True, ticks=i)  # must not raise
    pub = reporter.publisher_for(s)
    assert pub.published == 0
    # the first failure pauses the publisher: later beats do not even try
    assert pub.failures == 1
    warnings = [r for r in caplog.records if "cannot publish status" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.integration
def test_unresponsive_redis_is_bounded_by_socket_timeout(status_settings: Settings) -> None:
    """A Redis that accepts but never answers (blackholed) costs one short timeout, then a pause."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        pub = publish.StatusPublisher(f"redis://127.0.0.1:{port}/0", "ns", socket_timeout_s=0.2)
        done = threading.Event()
        result: list[bool] = []

        def run() -> None:
            result.append(pub.publish("k", {"state": "x"}))
            result.append(pub.publish("k", {"state": "y"}))
            done.set()

        threading.Thread(target=run, daemon=True).start()
        assert done.wait(60), "publish blocked on an unresponsive Redis"
        assert result == [False, False]
        assert pub.failures == 1


@pytest.mark.integration
def test_secrets_never_reach_redis(
    status_settings: Settings, rclient: redis.Redis, reporter: RedisStatus
) -> None:
    secret = "S3cr3t-" + uuid.uuid4().hex
    register_secret(secret)
    try:
        ctx = _ctx(status_settings, reporter, "user-data", _account(9, "bob"))
        ctx.fail(f"HTTP 401 for https://x/?listenKey=abcdefgh123&signature=deadbeef secret={secret}")
        ctx.beat("backoff", force=True, note=f"leak {secret}")
        raw = rclient.get(
            publish.status_key(status_settings.redis_namespace, publish.host_name(), "user-data-9")
        )
        assert raw is not None
        assert secret not in raw
        assert "abcdefgh123" not in raw and "deadbeef" not in raw
        assert "***" in raw
    finally:
        forget_secret(secret)


@pytest.mark.integration
def test_forked_child_uses_its_own_connection(
    status_settings: Settings, rclient: redis.Redis, reporter: RedisStatus
) -> None:
    reporter.on_snapshot(status_settings, {"pid": os.getpid(), "state": "running"}, force=True)
    pub = reporter.publisher_for(status_settings)
    assert pub.published == 1 and pub._client is not None
    parent_client = pub._client
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            ctx = _ctx(status_settings, reporter, "mark-price")
            reporter.after_fork(ctx)
            assert pub._client is None, "the client crossed the fork"
            ctx.beat("streaming", force=True, ticks=1)
            code = 0 if pub.published >= 2 else 2
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    # the parent's connection still works after the child used and dropped its own
    assert pub._client is parent_client
    reporter.on_snapshot(status_settings, {"pid": os.getpid(), "state": "stopping"}, force=True)
    assert pub.published == 2
    keys = {
        publish.status_key(status_settings.redis_namespace, publish.host_name(), k)
        for k in ("supervisor", "mark-price")
    }
    assert all(rclient.exists(k) for k in keys)


@pytest.mark.integration
def test_remove_status(status_settings: Settings, rclient: redis.Redis, reporter: RedisStatus) -> None:
    _ctx(status_settings, reporter, "user-data", _account(3, "carol")).beat("streaming", force=True)
    key = publish.status_key(status_settings.redis_namespace, publish.host_name(), "user-data-3")
    assert rclient.exists(key)
    Reporters([reporter]).on_forget(status_settings, "user-data-3")
    assert not rclient.exists(key)


def _seed_entries(s: Settings, rclient: redis.Redis, reporter: RedisStatus) -> None:
    snapshot: Any = {
        "pid": 4242,
        "state": "running",
        "started": time.time() - 3700,
        "accounts": 2,
        "restarts": 1,
        "children": [{"key": "user-data-7"}, {"key": "mark-price"}],
    }
    reporter.on_snapshot(s, snapshot, force=True)
    _ctx(s, reporter, "user-data", _account(7, "alice")).beat("streaming", force=True, frames=10, last=1)
    _ctx(s, reporter, "mark-price").beat("streaming", force=True, symbols=570, rows=2272, ticks=33, last=0)
    # another host, same Redis, that stopped publishing 5 minutes ago
    other = publish.StatusPublisher(s.redis_url, s.redis_namespace, host="otherhost")
    try:
        other.publish(
            "user-data-8",
            {
                "role": "user-data",
                "account_id": 8,
                "account_name": "dave",
                "state": "streaming",
                "pid": 1,
                "ts": time.time() - 300,
                "fields": {"frames": 5},
            },
        )
    finally:
        other.close()
    rclient.set(publish.status_key(s.redis_namespace, "otherhost", "junk"), "not json", ex=60)


@pytest.mark.integration
def test_status_cli_table_and_json(
    status_settings: Settings, rclient: redis.Redis, kraite_env: dict[str, str], reporter: RedisStatus
) -> None:
    _seed_entries(status_settings, rclient, reporter)
    env = _env(kraite_env, status_settings.redis_namespace)

    table = _status_cli(env)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["HOST", "PROCESS", "ACCOUNT", "PID", "STATE"]
    me = publish.host_name()
    sup = next(line for line in lines if line.startswith(me) and " supervisor " in line)
    assert "4242" in sup and "running" in sup and "children=2" in sup
    ud = next(line for line in lines if " user-data-7 " in line)
    assert "7 alice" in ud and "streaming" in ud and "STALE" not in ud
    mp = next(line for line in lines if " mark-price " in line)
    assert "symbols=570" in mp and "rows=2272" in mp
    other = next(line for line in lines if line.startswith("otherhost") and "user-data-8" in line)
    assert "STALE (streaming)" in other
    assert any(line.startswith("otherhost") and "unreadable" in line for line in lines)
    summary = next(line for line in lines if "process(es) on" in line)
    assert "5 process(es) on 2 host(s)" in summary and "STALE" in summary
    assert lines[-1].startswith("EGRESS ")  # the budget this host's processes share, last
    # supervisor first on its host, then mark-price, then accounts
    mine = [line.split()[1] for line in lines[1:] if line.startswith(me)]
    assert mine == ["supervisor", "mark-price", "user-data-7"]

    as_json = _status_cli(env, "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    by_key = {(d["host"], d["key"]): d for d in data}
    assert by_key[(me, "user-data-7")]["fields"]["frames"] == 10
    assert by_key[(me, "user-data-7")]["stale"] is False
    assert by_key[("otherhost", "user-data-8")]["stale"] is True
    assert by_key[(me, "supervisor")]["snapshot"]["accounts"] == 2

    only_other = _status_cli(env, "--json", "--host", "otherhost")
    assert {d["host"] for d in json.loads(only_other.stdout)} == {"otherhost"}

    nosuch = _status_cli(env, "--host", "nosuchhost")
    assert nosuch.returncode == 0 and nosuch.stdout == ""
    assert nosuch.stderr.strip() == (
        f"no kraite-mp process of host nosuchhost has published status in the last {publish.STATUS_TTL_S} s;"
        f" hosts that have: {', '.join(sorted([me, 'otherhost']))}"
    )

    check = _status_cli(env, "--check")
    assert check.returncode == exitcodes.EXIT_ERROR, "a STALE process must fail --check"
    healthy = _status_cli(env, "--check", "--host", me)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr


@pytest.mark.integration
def test_status_cli_empty_namespace(kraite_env: dict[str, str], namespace: str) -> None:
    result = _status_cli(_env(kraite_env, namespace))
    assert result.returncode == 0
    assert "no kraite-mp process has published status" in result.stderr
    assert _status_cli(_env(kraite_env, namespace), "--check").returncode == exitcodes.EXIT_ERROR


@pytest.mark.integration
def test_status_cli_redis_unreachable(kraite_env: dict[str, str], namespace: str) -> None:
    dead = f"redis://:hunter2pass@127.0.0.1:{free_port()}/0"
    result = _status_cli(_env(kraite_env, namespace, KRAITE_REDIS_URL=dead))
    assert result.returncode == exitcodes.EXIT_TEMPFAIL
    assert "Redis unreachable" in result.stderr
    assert "hunter2pass" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_format_durations_and_payload() -> None:
    assert status._duration(5) == "5s"
    assert status._duration(125) == "2m05s"
    assert status._duration(3 * 3600 + 60) == "3h01m"
    assert status._duration(float("inf")) == "-"
    payload: dict[str, Any] = publish.supervisor_payload(
        {"pid": 1, "children": {"a": {}, "b": {}}, "accounts": 1}
    )
    assert payload["fields"] == {"accounts": 1, "children": 2}
    assert payload["role"] == "supervisor"


@pytest.mark.unit
def test_supervisor_view_reports_children_that_cannot_report_themselves() -> None:
    now = time.time()

    def entry(key: str, data: dict[str, Any], age: float) -> status.StatusEntry:
        return status.StatusEntry(host="h", key=key, data=data, age_s=age, stale=age > 30)

    snapshot = {
        "pid": 100,
        "state": "running",
        "children": [
            {"key": "mark-price", "role": "mark-price", "pid": 101, "state": "RUNNING", "restarts": 0},
            {
                "key": "user-data-1",
                "role": "user-data",
                "account_id": 1,
                "pid": None,
                "state": "BACKOFF",
                "restarts": 3,
                "last_exit": "code 1 (error)",
            },
            {
                "key": "user-data-2",
                "role": "user-data",
                "account_id": 2,
                "pid": None,
                "state": "FATAL",
                "restarts": 1,
                "fatal_reason": "invalid API key (-2015)",
                "last_exit_at": now - 200,
            },
            {"key": "sync-orders", "role": "sync-orders", "pid": None, "state": "EXITED", "restarts": 4},
        ],
    }
    entries = [
        entry("supervisor", publish.supervisor_payload(snapshot), 1),
        entry("mark-price", {"role": "mark-price", "pid": 101, "state": "streaming", "ts": now}, 1),
        # its last words before the crash; the supervisor has it in FATAL now
        entry("user-data-2", {"role": "user-data", "account_id": 2, "pid": 55, "state": "fatal"}, 200),
        entry("sync-orders", {"role": "sync-orders", "pid": 77, "state": "syncing"}, 200),
        # an account removed an hour ago: nobody runs it any more
        entry("user-data-9", {"role": "user-data", "account_id": 9, "pid": 66, "state": "streaming"}, 500),
    ]
    merged = {e.key: e for e in status.merge_supervisor_view(entries)}
    assert merged["mark-price"].data["state"] == "streaming" and merged["mark-price"].data["restarts"] == 0
    assert merged["user-data-1"].data["state"] == "backoff"
    assert merged["user-data-1"].data["restarts"] == 3
    assert "code 1" in merged["user-data-1"].data["error"]
    assert merged["user-data-2"].data["state"] == "fatal" and not merged["user-data-2"].stale
    assert merged["user-data-2"].data["error"] == "invalid API key (-2015)"
    # a FATAL row says how long the account has been down, not the 0 s its last process lived
    table = status.format_table([merged["user-data-2"], merged["user-data-1"]])
    fatal_row, backoff_row = table.splitlines()[1:]
    assert " fatal " in fatal_row and re.search(r" down 3m\d*s? ", fatal_row), fatal_row
    assert " backoff " in backoff_row and " 0s " not in backoff_row and " - " in backoff_row, backoff_row
    assert merged["sync-orders"].data["state"] == "exited" and not merged["sync-orders"].stale
    assert merged["user-data-9"].data["state"] == "gone" and not merged["user-data-9"].stale

    # a supervisor that is itself stale vouches for nothing: its children stay STALE
    stale_sup = [
        entry("supervisor", publish.supervisor_payload(snapshot), 400),
        entry("sync-orders", {"role": "sync-orders", "pid": 77, "state": "syncing"}, 400),
    ]
    merged2 = {e.key: e for e in status.merge_supervisor_view(stale_sup)}
    assert merged2["supervisor"].stale and merged2["sync-orders"].stale
    assert "user-data-1" not in merged2
    # ... unless it stopped on purpose
    stopped = publish.supervisor_payload({**snapshot, "state": "stopped"})
    merged3 = {e.key: e for e in status.merge_supervisor_view([entry("supervisor", stopped, 400)])}
    assert not merged3["supervisor"].stale


@pytest.mark.unit
def test_supervisor_key_per_shard() -> None:
    s = Settings()
    assert publish.supervisor_key(s) == "supervisor"
    s.supervisor.shard = "1/4"
    assert publish.supervisor_key(s) == "supervisor-1-of-4"
    assert (
        publish.supervisor_payload({"pid": 1}, key="supervisor-1-of-4", shard="1/4")["fields"]["shard"]
        == "1/4"
    )


@pytest.mark.integration
def test_status_shows_the_egress_budget_every_process_shares(
    kraite_env: dict[str, str], namespace: str
) -> None:
    """Weight used of kraite-mp's share this minute, connection attempts left, streams waiting for one,
    history sweeps waiting for weight and a 429/418 in force: what this host's processes see in Redis
    (issue 12)."""
    from kraite_mp.binance.budget import reset_budgets, shared_budget
    from kraite_mp.binance.connections import connection_budget
    from kraite_mp.config.load import load_settings
    from kraite_mp.reconcile.background import HistoryLine

    env = _env(kraite_env, namespace)
    settings = load_settings(None, environ=env)
    reset_budgets()
    try:
        quiet = _status_cli(env)
        assert quiet.returncode == 0, quiet.stderr
        share = int(settings.binance.weight_limit_per_min * settings.binance.weight_share)
        conn_share = int(settings.binance.connection_limit * settings.binance.connection_share)
        line = next(x for x in quiet.stdout.splitlines() if x.startswith("EGRESS "))
        assert f"REST weight 0/{share} used this minute" in line and "no 429/418 in force" in line, line
        assert f"connection attempts {conn_share}/{conn_share} left" in line, line
        assert "0 history sweep(s) waiting for weight" in line, line

        weight = shared_budget(settings)
        assert weight.try_take(120)[0]
        connections = connection_budget(settings)
        assert connections.take(who="user-data-1", dark_since=time.time()) == 0.0
        HistoryLine(weight).join("7:1700000000000", 1_700_000_000_000)
        weight.block(429, 30.0)
        busy = _status_cli(env)
        line = next(x for x in busy.stdout.splitlines() if x.startswith("EGRESS "))
        assert f"REST weight 120/{share} used this minute" in line, line
        assert f"connection attempts {conn_share - 1}/{conn_share} left" in line, line
        assert "1 history sweep(s) waiting for weight" in line, line
        assert re.search(r"Binance said 429: no calls for (29|30|3\d)(\.\d)? s", line), line
    finally:
        reset_budgets()
