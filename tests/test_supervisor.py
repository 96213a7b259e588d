"""The supervisor: its state machine in isolation, then real forked processes.

The e2e tests run a real ``Arbiter`` (tests/scripts/run_arbiter.py, controllable children chosen by
account name) or the real ``kraite-mp run`` against the simulator, send real signals, and observe
the processes through /proc (their titles), the heartbeat files, the supervisor's log and its
``supervisor.json`` snapshot. Time is scaled through settings (backoff base 0.05 s, short
timeouts); assertions are on order and lower bounds, never on how fast something happened, except
where the bound is the contract (children gone within 2 s of the parent's SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, ProcessGroup, children_of, title_of, wait_for

from kraite_mp import exitcodes
from kraite_mp.config import Settings
from kraite_mp.store.accounts import add_account, set_active
from kraite_mp.supervisor.arbiter import Arbiter
from kraite_mp.supervisor.process import (
    AfterStop,
    Child,
    ChildState,
    ExitOutcome,
    TokenBucket,
    describe_status,
    next_state_after_exit,
)
from kraite_mp.supervisor.runfiles import heartbeat_path, read_heartbeat, read_snapshot

SCRIPT = str(ROOT / "tests" / "scripts" / "run_arbiter.py")

#: Scaled time for the e2e runs: backoff 0.05 s * 2^n, no jitter so the sequence is exact.
FAST_ENV = {
    "KRAITE__supervisor__backoff_base_s": "0.05",
    "KRAITE__supervisor__backoff_jitter_ratio": "0",
    "KRAITE__supervisor__heartbeat_timeout_s": "30",
    "KRAITE__supervisor__graceful_timeout_s": "5",
    "KRAITE__supervisor__accounts_refresh_s": "60",
    "KRAITE__supervisor__healthy_after_s": "60",
    "KRAITE__supervisor__sync_interval_s": "0",
    "KRAITE__supervisor__spawn_rate_per_s": "100",
    "KRAITE__supervisor__spawn_burst": "100",
}


# -- helpers ------------------------------------------------------------------------------------
def proc_state(pid: int) -> str | None:
    """The /proc state letter, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def by_role(ppid: int) -> dict[str, int]:
    """Children keyed the way the supervisor keys them: "mark-price", "user-data-<id>", ..."""
    keys = {}
    for pid in children_of(ppid):
        title = title_of(pid)
        m = re.match(r"kraite-mp: (user-data) account=(\d+) ", title)
        if m:
            keys[f"user-data-{m.group(2)}"] = pid
        elif title.startswith("kraite-mp: mark-price"):
            keys["mark-price"] = pid
        elif title.startswith("kraite-mp: sync-orders"):
            keys["sync-orders"] = pid
    return keys


def heartbeat(run_dir: str, key: str) -> dict[str, Any]:
    return dict(read_heartbeat(heartbeat_path(run_dir, key)) or {})


def frames(run_dir: str, key: str) -> int:
    return int(heartbeat(run_dir, key).get("fields", {}).get("frames", 0))


def child_status(run_dir: str, key: str) -> dict[str, Any]:
    status = read_snapshot(run_dir) or {}
    return next((c for c in status.get("children", []) if c["key"] == key), {})


class Supervisor:
    """A supervisor subprocess whose stderr goes to a file we can read while it runs."""

    def __init__(self, processes: ProcessGroup, env: dict[str, str], args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = processes.start(args, env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, pattern: str) -> list[re.Match[str]]:
        return [m for m in (re.search(pattern, line) for line in self.log().splitlines()) if m]

    def wait_children(self, keys: set[str], timeout: float = 30.0) -> dict[str, int]:
        def ready() -> dict[str, int] | None:
            found = by_role(self.pid)
            return found if set(found) == keys else None

        return wait_for(ready, timeout, message=f"children {sorted(keys)}; log:\n{self.log()[-3000:]}")  # type: ignore[no-any-return]

    def close(self) -> None:
        self._log.close()


def start_fake(processes: ProcessGroup, env: dict[str, str], run_dir: str, **extra: str) -> Supervisor:
    env = {**env, **FAST_ENV, **extra}
    return Supervisor(processes, env, [sys.executable, SCRIPT], Path(run_dir) / "supervisor.log")


def add(db: Any, secret_key: str, name: str) -> int:
    return add_account(
        db, secret_key, name=name, api_key=f"key-{name}-0123456789", api_secret=f"secret-{name}-xyz"
    ).id


# -- unit: the state machine without processes ---------------------------------------------------
def _exit_status(code: int) -> int:
    return code << 8


@pytest.mark.unit
def test_describe_status_names_codes_and_signals() -> None:
    assert describe_status(_exit_status(0)) == ("code 0 (ok)", 0)
    assert describe_status(_exit_status(77)) == ("code 77 (fatal-credentials)", 77)
    assert describe_status(signal.SIGKILL) == ("signal SIGKILL", None)


@pytest.mark.unit
def test_token_bucket_paces_spawns() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.25)
    assert bucket.take(0.5)
    # never saves more than the burst, however long it idles
    assert sum(bucket.take(1000.0) for _ in range(10)) == 3


@pytest.mark.unit
def test_restart_policy_backoff_sequence_reset_and_fatal(tmp_path: Path) -> None:
    settings = Settings(run_dir=str(tmp_path))
    settings.supervisor.backoff_jitter_ratio = 0.0
    arbiter = Arbiter(settings, targets={})
    child = Child(key="user-data-1", role="user-data")
    arbiter.children[child.key] = child
    delays = []
    for pid in range(100, 107):
        child.pid, child.spawned_at, child.state = pid, time.monotonic(), ChildState.RUNNING
        arbiter.child_exited(child, pid, _exit_status(exitcodes.EXIT_ERROR))
        assert child.state == ChildState.BACKOFF and child.pid is None
        delays.append(child.backoff_s)
    assert delays == [1, 2, 4, 8, 16, 32, 32]
    # a run longer than healthy_after_s starts the sequence again
    child.pid, child.spawned_at = 200, time.monotonic() - settings.supervisor.healthy_after_s - 1
    arbiter.child_exited(child, 200, signal.SIGKILL)
    assert child.backoff_s == 1 and child.last_exit == "signal SIGKILL"
    # the credentials exit code is FATAL, retried after fatal_retry_s, never on the backoff ladder
    child.pid, child.spawned_at = 201, time.monotonic()
    before = time.monotonic()
    arbiter.child_exited(child, 201, _exit_status(exitcodes.EXIT_FATAL_CREDENTIALS))
    assert child.state == ChildState.FATAL
    assert child.due_at >= before + settings.supervisor.fatal_retry_s
    assert "fatal-credentials" in (child.fatal_reason or "")
    # a stop we asked for (account removed) forgets the child instead of restarting it
    child.pid, child.after_stop, child.stop_reason = 202, AfterStop.REMOVE, "account removed"
    arbiter.child_exited(child, 202, _exit_status(0))
    assert "user-data-1" not in arbiter.children


@pytest.mark.unit
def test_next_state_after_exit_is_a_pure_decision() -> None:
    settings = Settings()
    healthy = settings.supervisor.healthy_after_s

    def decide(
        child: Child, code: int | None = 1, uptime: float = 1.0, stopping: bool = False
    ) -> ExitOutcome:
        return next_state_after_exit(child, code, uptime, settings, stopping=stopping)

    child = Child(key="user-data-1", role="user-data")
    assert decide(child) == ExitOutcome(ChildState.BACKOFF, False)
    assert decide(child, uptime=healthy) == ExitOutcome(ChildState.BACKOFF, True)
    assert decide(child, code=exitcodes.EXIT_FATAL_CREDENTIALS) == ExitOutcome(ChildState.FATAL, False)
    assert decide(child, stopping=True) == ExitOutcome(ChildState.EXITED, False)
    assert decide(Child(key="sync-orders", role="sync-orders", one_shot=True)).state == ChildState.EXITED
    for after, state in (
        (AfterStop.RESTART, ChildState.PENDING),
        (AfterStop.REMOVE, None),
        (AfterStop.EXIT, ChildState.EXITED),
        (AfterStop.BACKOFF, ChildState.BACKOFF),
    ):
        child.after_stop = after
        # a stop we asked for is never FATAL, whatever the exit code
        assert decide(child, code=exitcodes.EXIT_FATAL_CREDENTIALS).state == state, after
    assert child.state == ChildState.PENDING and child.attempt == 0  # pure: the child is untouched


@pytest.mark.unit
def test_account_refresh_converges_and_keeps_children_when_db_is_down(tmp_path: Path) -> None:
    from kraite_mp.store.accounts import Account

    def account(i: int, key: str = "k") -> Account:
        return Account(id=i, name=f"a{i}", exchange="binance", api_key=f"{key}{i}", api_secret_token="t")

    settings = Settings(run_dir=str(tmp_path))
    arbiter = Arbiter(settings, targets={})
    owned: list[Account] | None = [account(1), account(2), account(3)]
    arbiter._read_accounts = lambda: owned  # type: ignore[method-assign]  # the DB side is tested e2e
    arbiter.refresh_accounts("start")
    assert {k: c.state for k, c in arbiter.children.items()} == {
        "user-data-1": ChildState.PENDING,
        "user-data-2": ChildState.PENDING,
        "user-data-3": ChildState.PENDING,
    }
    # 1 and 2 went FATAL (no process); 2 then gets new credentials, 3 is deactivated, 4 is new
    for key in ("user-data-1", "user-data-2"):
        c = arbiter.children[key]
        c.state, c.fatal_reason, c.due_at = ChildState.FATAL, "-2015", time.monotonic() + 300
    owned = [account(1), account(2, key="new"), account(4)]
    arbiter.refresh_accounts("SIGHUP")
    children = arbiter.children
    assert set(children) == {"user-data-1", "user-data-2", "user-data-4"}
    assert children["user-data-1"].state == ChildState.FATAL  # unchanged: still waits for fatal_retry_s
    assert (
        children["user-data-2"].state == ChildState.PENDING and children["user-data-2"].fatal_reason is None
    )
    assert children["user-data-2"].due_at <= time.monotonic()  # new credentials deserve a try now
    assert children["user-data-2"].account is not None and children["user-data-2"].account.api_key == "new2"
    assert arbiter.accounts_count == 3
    # PostgreSQL down: keep everything as it is
    owned = None
    before = {k: (c.state, c.account) for k, c in children.items()}
    arbiter.refresh_accounts("periodic")
    assert {k: (c.state, c.account) for k, c in arbiter.children.items()} == before


# -- e2e: real forked processes, controllable children -------------------------------------------
@pytest.mark.e2e
def test_children_titles_restart_reload_and_graceful_stop(
    db, secret_key, kraite_env, run_dir, processes
) -> None:
    ids = {name: add(db, secret_key, name) for name in ("alice", "bob", "carol")}
    rd = kraite_env["KRAITE_RUN_DIR"]
    sup = start_fake(processes, kraite_env, run_dir)
    try:
        keys = {"mark-price", *(f"user-data-{i}" for i in ids.values())}
        pids = sup.wait_children(keys)
        # 1 supervisor + 4 children, with their titles (what `ps` shows)
        ps = subprocess.run(
            ["ps", "-o", "pid=,ppid=,args=", "--ppid", str(sup.pid), "-p", str(sup.pid)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert len(ps.strip().splitlines()) == 5, ps
        wait_for(
            lambda: title_of(sup.pid) == "kraite-mp: supervisor accounts=3 children=4 restarts=0",
            10,
            message="supervisor title",
        )
        for name, account_id in ids.items():
            wait_for(
                lambda a=account_id, n=name: re.fullmatch(
                    rf"kraite-mp: user-data account={a} name={n} state=streaming frames=\d+ reloads=0",
                    title_of(pids[f"user-data-{a}"]),
                ),
                10,
                message=f"title of {name}",
            )
        assert re.fullmatch(
            r"kraite-mp: mark-price state=streaming frames=\d+ reloads=0", title_of(pids["mark-price"])
        )
        for pid in pids.values():
            assert "secret" not in title_of(pid)

        # kill -9 bob: restarted after the first backoff delay; the others are never touched
        bob = f"user-data-{ids['bob']}"
        others = {k: v for k, v in pids.items() if k != bob}
        before = {k: frames(rd, k) for k in others}
        os.kill(pids[bob], signal.SIGKILL)
        new_bob = wait_for(
            lambda: (p := by_role(sup.pid).get(bob)) not in (None, pids[bob]) and p,
            20,
            message="bob restarted",
        )
        wait_for(
            lambda: heartbeat(rd, bob).get("pid") == new_bob and frames(rd, bob) > 0,
            10,
            message="bob streams",
        )
        (m,) = sup.lines(
            rf"{bob} account={ids['bob']} pid={pids[bob]} exited with signal SIGKILL .*restarting in "
            r"([\d.]+)s \(backoff attempt 1\)"
        )
        assert float(m.group(1)) == pytest.approx(0.05)
        assert {k: v for k, v in by_role(sup.pid).items() if k != bob} == others
        wait_for(lambda: all(frames(rd, k) > before[k] for k in others), 10, message="other counters rising")
        wait_for(
            lambda: child_status(rd, bob).get("restarts") == 1, 10, message="status counts bob's restart"
        )
        wait_for(
            lambda: title_of(sup.pid).endswith("children=4 restarts=1"), 10, message="title counts restart"
        )

        # insert dave, deactivate carol, SIGHUP: one child appears, one goes, the rest stay
        dave = add(db, secret_key, "dave")
        set_active(db, ids["carol"], False)
        carol = f"user-data-{ids['carol']}"
        os.kill(sup.pid, signal.SIGHUP)
        expected = {k: v for k, v in by_role(sup.pid).items() if k != carol}
        after = sup.wait_children({*expected, f"user-data-{dave}"})
        assert {k: after[k] for k in expected} == expected
        assert not alive(pids[carol])
        # dead (a zombie) before the supervisor reaps it: its heartbeat file goes when it is reaped
        wait_for(
            lambda: not os.path.exists(os.path.join(rd, "heartbeats", f"{carol}.json")),
            10,
            message="carol's heartbeat file removed",
        )
        # SIGHUP is forwarded to the mark-price child (it reloads its symbol map, no reconnect)
        wait_for(
            lambda: heartbeat(rd, "mark-price").get("fields", {}).get("reloads", 0) >= 1,
            10,
            message="mark-price reloaded",
        )
        assert heartbeat(rd, "mark-price")["pid"] == pids["mark-price"]
        assert sup.lines(r"accounts \(SIGHUP\): 3 owned, 1 new, 1 removed, 0 changed")
        wait_for(
            lambda: (
                (st := read_snapshot(rd))
                and st["accounts"] == 3
                and {c["key"] for c in st["children"]} == set(after)
            ),
            10,
            message="status shows the new set",
        )

        # renaming alice changes her fingerprint: only her child restarts (no backoff), under the new name
        alice = f"user-data-{ids['alice']}"
        with db.cursor() as cur:
            cur.execute("UPDATE accounts SET name = %s WHERE id = %s", ("alice2", ids["alice"]))
        db.commit()
        os.kill(sup.pid, signal.SIGHUP)
        new_alice = wait_for(
            lambda: (p := by_role(sup.pid).get(alice)) not in (None, after[alice]) and p,
            20,
            message="alice restarted",
        )
        wait_for(
            lambda: title_of(new_alice).startswith(
                f"kraite-mp: user-data account={ids['alice']} name=alice2 "
            ),
            10,
            message="alice's new title",
        )
        assert sup.lines(
            rf"{alice} account={ids['alice']} pid={after[alice]} exited with .*restarting "
            r"\(account changed\)"
        )
        assert {k: v for k, v in by_role(sup.pid).items() if k != alice} == {
            k: v for k, v in after.items() if k != alice
        }

        # SIGTERM: every child stops, the supervisor exits 0
        final = by_role(sup.pid)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=30) == 0
        for pid in final.values():
            wait_for(lambda p=pid: not alive(p), 5, message=f"child {pid} gone")
        assert read_snapshot(rd)["state"] == "stopped"  # type: ignore[index]
        assert sup.lines(r"supervisor stopped")
    finally:
        sup.close()


@pytest.mark.e2e
def test_parent_sigkill_takes_every_child_down(db, secret_key, kraite_env, run_dir, processes) -> None:
    ids = [add(db, secret_key, name) for name in ("alice", "bob")]
    sup = start_fake(processes, kraite_env, run_dir)
    try:
        pids = sup.wait_children({"mark-price", *(f"user-data-{i}" for i in ids)})
        os.kill(sup.pid, signal.SIGKILL)
        sup.proc.wait(timeout=10)
        # the contract's bound: PR_SET_PDEATHSIG ends every child within 2 s
        wait_for(
            lambda: not any(alive(p) for p in pids.values()),
            2.0,
            interval=0.02,
            message=f"children {pids} gone after the parent's SIGKILL",
        )
    finally:
        sup.close()


@pytest.mark.e2e
def test_crash_loop_backoff_fatal_and_stale_heartbeat(db, secret_key, kraite_env, run_dir, processes) -> None:
    crash = add(db, secret_key, "crash-1")
    bad = add(db, secret_key, "bad-1")
    hang = add(db, secret_key, "hang-1")
    fatal_retry_s = 1.5
    rd = kraite_env["KRAITE_RUN_DIR"]
    sup = start_fake(
        processes,
        kraite_env,
        run_dir,
        KRAITE__supervisor__mark_price="false",
        KRAITE__supervisor__fatal_retry_s=str(fatal_retry_s),
        KRAITE__supervisor__heartbeat_timeout_s="3",
    )
    try:
        pattern = rf"user-data-{crash} account={crash} pid=\d+ exited with code 1 .*restarting in ([\d.]+)s"
        wait_for(
            lambda: len(sup.lines(pattern)) >= 7, 40, message=f"7 crash restarts; log:\n{sup.log()[-3000:]}"
        )
        delays = [float(m.group(1)) for m in sup.lines(pattern)[:7]]
        assert delays == pytest.approx([0.05 * f for f in (1, 2, 4, 8, 16, 32, 32)])
        wait_for(
            lambda: child_status(rd, f"user-data-{crash}").get("attempt", 0) >= 7,
            10,
            message="status attempt",
        )

        # the invalid-key account: FATAL with its reason, never retried sooner than fatal_retry_s
        fatal = child_status(rd, f"user-data-{bad}")
        assert fatal["state"] == "FATAL" and "-2015" in fatal["fatal_reason"]
        assert "secret-bad" not in sup.log()
        spawns = sup.lines(rf"^(\S+) INFO .* spawned user-data-{bad} account={bad} pid=")
        stamps = [datetime.fromisoformat(m.group(1)).timestamp() for m in spawns]
        assert stamps and all(
            b - a >= fatal_retry_s - 0.01 for a, b in zip(stamps, stamps[1:], strict=False)
        ), stamps
        fatal_exits = sup.lines(
            rf"user-data-{bad} account={bad} pid=\d+ exited with code 77 .*: FATAL \(.*-2015"
        )
        assert 1 <= len(fatal_exits) <= len(spawns)

        # the child that stopped beating is killed and restarted
        wait_for(
            lambda: sup.lines(rf"user-data-{hang} account={hang} pid=\d+ heartbeat stale"),
            30,
            message="stale heartbeat detected",
        )
        wait_for(
            lambda: sup.lines(rf"user-data-{hang} .*\(heartbeat stale\); restarting in"),
            30,
            message="stale child restarted",
        )
    finally:
        sup.proc.send_signal(signal.SIGTERM)
        sup.proc.wait(timeout=30)
        sup.close()


@pytest.mark.e2e
def test_stubborn_child_is_killed_and_sync_runs_one_at_a_time(
    db, secret_key, kraite_env, run_dir, processes
) -> None:
    stubborn = add(db, secret_key, "stubborn-1")
    rd = kraite_env["KRAITE_RUN_DIR"]
    sup = start_fake(
        processes,
        kraite_env,
        run_dir,
        KRAITE__supervisor__mark_price="false",
        KRAITE__supervisor__graceful_timeout_s="1",
        KRAITE__supervisor__sync_interval_s="0.5",
        KRAITE__supervisor__sync_timeout_s="1.2",
        KRAITE_TEST_SYNC_SLEEP_S="0.8",
    )
    try:
        wait_for(lambda: f"user-data-{stubborn}" in by_role(sup.pid), 30, message="stubborn child")
        pid = by_role(sup.pid)[f"user-data-{stubborn}"]
        # deactivating it stops it: SIGTERM is ignored, so SIGKILL after graceful_timeout_s
        set_active(db, stubborn, False)
        os.kill(sup.pid, signal.SIGHUP)
        wait_for(
            lambda: sup.lines(rf"user-data-{stubborn} account={stubborn} pid={pid} did not stop within"),
            20,
            message="SIGKILL escalation",
        )
        wait_for(lambda: not alive(pid), 10, message="stubborn child gone")
        # a zombie already counts as gone above; the supervisor logs once it has reaped it
        wait_for(
            lambda: sup.lines(
                rf"pid={pid} exited with signal SIGKILL .*stopped \(account removed or deactivated\)"
            ),
            10,
            message="the reaped child is logged as stopped on purpose",
        )

        # periodic sync: one-shot children, never two at once
        wait_for(
            lambda: len(sup.lines(r"spawned sync-orders pid=")) >= 3,
            30,
            message=f"three sync runs; log:\n{sup.log()[-3000:]}",
        )
        wait_for(
            lambda: sup.lines(r"sync-orders pid=\d+ from the previous interval is still running"),
            10,
            message=f"overlap refused; log:\n{sup.log()[-3000:]}",
        )
        events = sup.lines(r"(spawned sync-orders pid=|sync-orders pid=\d+ exited with)")
        running = 0
        for m in events:
            running += 1 if m.group(1).startswith("spawned") else -1
            assert running in (0, 1), [e.group(0) for e in events]
        assert open(os.path.join(rd, "sync-runs.log")).read().count("\n") >= 1
        assert child_status(rd, "sync-orders")["state"] in ("STARTING", "RUNNING", "EXITED")
    finally:
        sup.proc.send_signal(signal.SIGTERM)
        sup.proc.wait(timeout=30)
        sup.close()


@pytest.mark.e2e
def test_run_command_refuses_clearly(kraite_env, run_dir, processes, tmp_path) -> None:
    from kraite_mp.ops.embedded import free_port

    # PostgreSQL unreachable: a clear message and EXIT_TEMPFAIL, no traceback
    env = {**kraite_env, "KRAITE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    proc = processes.kraite("run", "--fail-fast", env=env)  # (without it `run` waits for PostgreSQL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exitcodes.EXIT_TEMPFAIL, err
    assert b"PostgreSQL unavailable" in err and b"Traceback" not in err
    # a bad shard spec: a configuration error naming the key
    proc = processes.kraite("run", env={**kraite_env, "KRAITE__supervisor__shard": "3/2"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exitcodes.EXIT_FATAL_CONFIG, err
    assert b"supervisor.shard" in err
    # no secret key: a configuration error
    proc = processes.kraite("run", env={**kraite_env, "KRAITE_SECRET_KEY": ""})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exitcodes.EXIT_FATAL_CONFIG, err
    assert b"secret_key" in err
    # a second supervisor on the same run_dir would stream every account twice: refused
    sup = start_fake(processes, kraite_env, run_dir, KRAITE__supervisor__mark_price="false")
    try:
        wait_for(lambda: read_snapshot(kraite_env["KRAITE_RUN_DIR"]), 30, message="first supervisor up")
        proc = processes.kraite("run", env=kraite_env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == exitcodes.EXIT_TEMPFAIL, err
        assert b"another supervisor is running" in err
    finally:
        sup.proc.send_signal(signal.SIGTERM)
        sup.proc.wait(timeout=30)
        sup.close()


# -- e2e: the real `kraite-mp run` against the simulator ------------------------------------------
def _write_config(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _redis_status(env: dict[str, str], key: str) -> dict[str, Any] | None:
    """This host's status entry ``key`` in Redis (what ``kraite-mp status`` reads)."""
    import redis as redis_lib

    from kraite_mp.supervisor import publish

    client = redis_lib.Redis.from_url(env["KRAITE_REDIS_URL"])
    try:
        raw = client.get(publish.status_key(env["KRAITE_REDIS_NAMESPACE"], publish.host_name(), key))
    finally:
        client.close()
    return None if raw is None else dict(json.loads(raw))


@pytest.mark.e2e
def test_kraite_mp_run_streams_restarts_reloads_and_stops(
    db, secret_key, kraite_env, run_dir, processes, simulator, tmp_path
) -> None:
    from kraite_mp.ops.seed import seed_symbols

    sim = simulator
    seed_symbols(db, [s for s, _ in sim.mark_symbols], coverage=1.0)
    names = ("alice", "bob", "carol")
    ids = {}
    for name, acct in zip(names, sim.accounts, strict=True):
        ids[name] = add_account(
            db, secret_key, name=name, api_key=acct.api_key, api_secret=acct.api_secret
        ).id
    api_key = {f"user-data-{ids[n]}": a.api_key for n, a in zip(names, sim.accounts, strict=True)}
    rd = kraite_env["KRAITE_RUN_DIR"]
    config = tmp_path / "kraite-mp.toml"
    _write_config(config, "[supervisor]\nsync_interval_s = 0\n")
    env = {
        **kraite_env,
        **{k: v for k, v in FAST_ENV.items() if "sync_interval" not in k},
        "KRAITE_BINANCE_REST_URL": sim.rest_url,
        "KRAITE_BINANCE_WS_URL": sim.ws_url,
    }
    sim.set_rate(4.0)  # scenario events on every account, so frame counters move
    sup = Supervisor(
        processes,
        env,
        [sys.executable, "-m", "kraite_mp", "--config", str(config), "run"],
        Path(run_dir) / "supervisor.log",
    )
    try:
        keys = {"mark-price", *api_key}
        pids = sup.wait_children(keys, timeout=60)
        for key, pid in pids.items():
            if key == "mark-price":
                pattern = r"kraite-mp: mark-price state=streaming symbols=\d+ rows=\d+ ticks=\d+ .*"
            else:
                account_id = int(key.rsplit("-", 1)[1])
                name = next(n for n, i in ids.items() if i == account_id)
                pattern = rf"kraite-mp: user-data account={account_id} name={name} state=streaming frames=\d+ last=\S+ .*"
            wait_for(
                lambda p=pid, pat=pattern: re.fullmatch(pat, title_of(p)),
                60,
                message=f"{key} title; log:\n{sup.log()[-3000:]}",
            )
        wait_for(
            lambda: title_of(sup.pid) == "kraite-mp: supervisor accounts=3 children=4 restarts=0",
            10,
            message="supervisor title",
        )
        for key in api_key.values():
            assert sim.wait_for_connections(key, 1, timeout=30)
        assert sim.wait_for_connections("market", 1, timeout=30)
        # the children publish no status themselves: the supervisor relays their heartbeats to Redis
        for key, pid in pids.items():
            wait_for(
                lambda k=key, p=pid: (
                    (_redis_status(env, k) or {}).get("pid") == p
                    and _redis_status(env, k).get("state") == "streaming"
                ),
                30,
                message=f"{key}'s status in Redis",
            )

        # kill -9 bob's stream: one new connection for bob, none for anyone else, counters keep rising
        bob = f"user-data-{ids['bob']}"
        opened = dict(sim.stats()["ws_opened"])
        before = {k: frames(rd, k) for k in api_key if k != bob}
        os.kill(pids[bob], signal.SIGKILL)
        wait_for(
            lambda: sim.stats()["ws_opened"].get(api_key[bob], 0) == opened[api_key[bob]] + 1,
            60,
            message=f"bob reconnected; log:\n{sup.log()[-3000:]}",
        )
        assert by_role(sup.pid)[bob] != pids[bob]
        assert sup.lines(
            rf"{bob} account={ids['bob']} pid={pids[bob]} exited with signal SIGKILL .*restarting in "
            r"0\.050s \(backoff attempt 1\)"
        )
        wait_for(
            lambda: all(frames(rd, k) > before[k] for k in before), 30, message="other streams' frames rising"
        )
        after = sim.stats()["ws_opened"]
        for key in before:
            assert after[api_key[key]] == opened[api_key[key]], key
            assert by_role(sup.pid)[key] == pids[key]
        assert after["market"] == opened["market"]

        # a broken config on SIGHUP is refused and changes nothing
        _write_config(config, '[supervisor]\nsync_interval_s = "often"\n')
        os.kill(sup.pid, signal.SIGHUP)
        wait_for(
            lambda: sup.lines(
                r"reload: configuration error, keeping the previous settings: "
                r"supervisor\.sync_interval_s"
            ),
            20,
            message="bad config refused",
        )
        # a good one turns the periodic sync on: the real sync child runs and exits 0
        _write_config(config, "[supervisor]\nsync_interval_s = 1.0\n")
        os.kill(sup.pid, signal.SIGHUP)
        wait_for(
            lambda: sup.lines(r"sync-orders pid=\d+ exited with code 0 \(ok\)"),
            60,
            message=f"one sync pass; log:\n{sup.log()[-3000:]}",
        )
        _write_config(config, "[supervisor]\nsync_interval_s = 0\n")

        # deactivate carol + SIGHUP: her stream closes, the others are not touched
        carol = f"user-data-{ids['carol']}"
        set_active(db, ids["carol"], False)
        os.kill(sup.pid, signal.SIGHUP)
        wait_for(
            lambda: sim.stats()["current_connections"].get(api_key[carol], 0) == 0,
            30,
            message="carol's connection closed",
        )
        wait_for(lambda: carol not in by_role(sup.pid), 30, message="carol's child gone")
        now = sim.stats()["ws_opened"]
        assert now[api_key[f"user-data-{ids['alice']}"]] == opened[api_key[f"user-data-{ids['alice']}"]]
        assert now["market"] == opened["market"]

        # secrets never in titles or logs
        text = sup.log() + "".join(title_of(p) for p in by_role(sup.pid).values())
        for acct in sim.accounts:
            assert acct.api_secret not in text
            listen_key = sim.truth(acct.api_key).get("listen_key")
            assert not listen_key or listen_key not in text

        # SIGTERM: everything exits within the graceful timeout, code 0, connections closed
        final = by_role(sup.pid)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=30) == 0
        for pid in final.values():
            wait_for(lambda p=pid: not alive(p), 5, message=f"child {pid} gone")
        wait_for(
            lambda: not any(sim.stats()["current_connections"].values()), 10, message="no connection left"
        )
    finally:
        sup.close()


@pytest.mark.e2e
def test_kraite_mp_run_parent_sigkill_closes_every_stream(
    db, secret_key, kraite_env, run_dir, processes, simulator
) -> None:
    from kraite_mp.ops.seed import seed_symbols

    sim = simulator
    seed_symbols(db, [s for s, _ in sim.mark_symbols], coverage=1.0)
    ids = [
        add_account(db, secret_key, name=f"acct{i}", api_key=a.api_key, api_secret=a.api_secret).id
        for i, a in enumerate(sim.accounts)
    ]
    # a key the exchange does not know: the real child exits FATAL (-2015), the supervisor keeps it FATAL
    bogus = add_account(
        db, secret_key, name="bogus", api_key="unknown-key-0123456789", api_secret="nope-nope"
    ).id
    env = {
        **kraite_env,
        **FAST_ENV,
        "KRAITE_BINANCE_REST_URL": sim.rest_url,
        "KRAITE_BINANCE_WS_URL": sim.ws_url,
    }
    rd = kraite_env["KRAITE_RUN_DIR"]
    sup = Supervisor(
        processes, env, [sys.executable, "-m", "kraite_mp", "run"], Path(run_dir) / "supervisor.log"
    )
    try:
        pids = sup.wait_children({"mark-price", *(f"user-data-{i}" for i in ids)}, timeout=60)
        for acct in sim.accounts:
            assert sim.wait_for_connections(acct.api_key, 1, timeout=30)
        fatal = wait_for(
            lambda: (c := child_status(rd, f"user-data-{bogus}")).get("state") == "FATAL" and c,
            30,
            message=f"bogus account FATAL; log:\n{sup.log()[-3000:]}",
        )
        assert "invalid" in (fatal["fatal_reason"] or "").lower(), fatal
        assert fatal["last_exit_code"] == exitcodes.EXIT_FATAL_CREDENTIALS
        assert fatal["spawns"] == 1  # fatal_retry_s (300 s) has not passed: no hot loop
        os.kill(sup.pid, signal.SIGKILL)
        sup.proc.wait(timeout=10)
        # the contract's bound: no orphan keeps streaming; every child is gone within 2 s
        wait_for(
            lambda: not any(alive(p) for p in pids.values()),
            2.0,
            interval=0.02,
            message=f"real children {pids} gone after the parent's SIGKILL",
        )
        wait_for(
            lambda: not any(sim.stats()["current_connections"].values()), 10, message="no connection left"
        )
    finally:
        sup.close()


@pytest.mark.e2e
def test_a_child_that_cannot_open_its_spool_says_why_in_the_snapshot(
    db, secret_key, kraite_env, run_dir, processes, simulator, tmp_path
) -> None:
    """A spool directory that cannot be used: the child backs off, and ``supervisor.json`` (so
    ``kraite-mp status``) carries the reason, not only an exit code."""
    acct = simulator.accounts[0]
    account_id = add_account(
        db, secret_key, name="nospool", api_key=acct.api_key, api_secret=acct.api_secret
    ).id
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool directory should be")
    env = {
        **kraite_env,
        **FAST_ENV,
        "KRAITE__supervisor__backoff_base_s": "0.5",
        "KRAITE__supervisor__mark_price": "false",
        "KRAITE_BINANCE_REST_URL": simulator.rest_url,
        "KRAITE_BINANCE_WS_URL": simulator.ws_url,
        "KRAITE__user_data_stream__spool_dir": str(blocker),
    }
    sup = Supervisor(
        processes, env, [sys.executable, "-m", "kraite_mp", "run"], Path(run_dir) / "supervisor.log"
    )
    try:

        def last_exit() -> str:
            snap = read_snapshot(kraite_env["KRAITE_RUN_DIR"]) or {}
            child = next((c for c in snap.get("children", []) if c.get("account_id") == account_id), {})
            return str(child.get("last_exit") or "")

        wait_for(
            lambda: "spool" in last_exit(),
            60,
            message=f"the reason in the snapshot; log:\n{sup.log()[-3000:]}",
        )
        assert "code 75" in last_exit() and "Not a directory" in last_exit()
        assert sup.lines(r"exited with code 75 .*: spool directory .*; restarting in")
    finally:
        sup.close()


@pytest.mark.unit
def test_the_mark_price_child_is_spawned_before_the_accounts_due_with_it(tmp_path: Path) -> None:
    """A host that takes the mark-price lead with a dead host's accounts spawns mark-price first, not after
    the accounts queued in the same step behind the spawn bucket (the failover bench: 35-48 s late)."""
    from kraite_mp.store.accounts import Account

    settings = Settings(run_dir=str(tmp_path))
    arbiter = Arbiter(settings, targets={})
    now = time.monotonic()
    for i in range(1, 6):
        account = Account(id=i, name=f"a{i}", exchange="binance", api_key=f"k{i}", api_secret_token="t")
        arbiter.children[f"user-data-{i}"] = Child(key=f"user-data-{i}", role="user-data", account=account)
        arbiter.children[f"user-data-{i}"].due_at = now - 10 + i  # due well before the mark-price stream
    arbiter.children["mark-price"] = Child(key="mark-price", role="mark-price")
    arbiter.children["mark-price"].due_at = now
    spawned: list[str] = []
    arbiter.spawn = lambda child: spawned.append(child.key)  # type: ignore[method-assign]  # forks e2e
    arbiter.bucket = TokenBucket(rate_per_s=0.001, burst=3, now=now)  # 3 spawns now, the rest later
    arbiter.spawn_due(now)
    assert spawned == ["mark-price", "user-data-1", "user-data-2"]


@pytest.mark.unit
def test_one_pass_forks_for_half_a_second_at_most_so_the_loop_renews_leases_between(tmp_path: Path) -> None:
    """100 forks in one pass took 13 s on a loaded host, longer than the fleet's leases live (10 s): every
    lease of the host expired. A pass forks for ``SPAWN_SLICE_S`` at most; the next passes go on."""
    from kraite_mp.store.accounts import Account
    from kraite_mp.supervisor import arbiter as arbiter_mod

    settings = Settings(run_dir=str(tmp_path))
    arbiter = Arbiter(settings, targets={})
    now = time.monotonic()
    for i in range(1, 11):
        account = Account(id=i, name=f"a{i}", exchange="binance", api_key=f"k{i}", api_secret_token="t")
        arbiter.children[f"user-data-{i}"] = Child(key=f"user-data-{i}", role="user-data", account=account)
        arbiter.children[f"user-data-{i}"].due_at = now
    fork_s = arbiter_mod.SPAWN_SLICE_S / 2.5  # each fake fork takes this long (at least)

    def slow_spawn(child: Child) -> None:
        time.sleep(fork_s)
        child.pid = 1  # alive: not due again
        spawned.append(child.key)

    spawned: list[str] = []
    arbiter.spawn = slow_spawn  # type: ignore[method-assign]  # real forks are tested e2e
    arbiter.bucket = TokenBucket(rate_per_s=1.0, burst=100, now=now)
    arbiter.spawn_due(time.monotonic())
    assert 1 <= len(spawned) <= 3  # the slice ended the pass; the bucket alone would have allowed all 10
    for _ in range(10):  # the following passes fork the rest
        arbiter.spawn_due(time.monotonic())
    assert sorted(spawned) == sorted(f"user-data-{i}" for i in range(1, 11))
