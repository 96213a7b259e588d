"""The fork server (kraite_mp.supervisor.forkserver): user-data children forked from a process that keeps
the warmed-up heap. They are still the supervisor's own children, reaped and restarted by it, and nothing
changes for them when the server dies.

The real ``kraite-mp run`` against the local simulator, over real sockets.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import children_of, title_of, wait_for
from test_supervisor import FAST_ENV, Supervisor, by_role

from kraite_mp.simulator import Simulator
from kraite_mp.store.accounts import add_account
from kraite_mp.supervisor.forkserver import TITLE
from kraite_mp.supervisor.runfiles import read_snapshot

#: Every wait of these tests is bounded by this (seconds).
WAIT_S = 30.0


@pytest.fixture()
def sim3() -> Iterator[Simulator]:
    sim = Simulator(accounts=3, symbols=10, rate=0.0, seed=11)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def fork_servers(ppid: int) -> list[int]:
    return [pid for pid in children_of(ppid) if title_of(pid).startswith(TITLE)]


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def start(
    sim: Simulator, db: Any, secret_key: str, env: dict[str, str], processes: Any, run_dir: str, **extra: str
) -> Supervisor:
    for i, a in enumerate(sim.accounts):
        add_account(db, secret_key, name=f"fs{i}", api_key=a.api_key, api_secret=a.api_secret)
    env = {
        **env,
        **FAST_ENV,
        "KRAITE_BINANCE_REST_URL": sim.rest_url,
        "KRAITE_BINANCE_WS_URL": sim.ws_url,
        **extra,
    }
    return Supervisor(
        processes, env, [sys.executable, "-m", "kraite_mp", "run"], Path(run_dir) / "supervisor.log"
    )


def user_data(sup: Supervisor) -> dict[str, int]:
    return {k: v for k, v in by_role(sup.pid).items() if k.startswith("user-data-")}


def all_user_data(sup: Supervisor, n: int) -> dict[str, int]:
    kids = wait_for(
        lambda: (lambda u: u if len(u) == n else None)(user_data(sup)), WAIT_S, message=sup.log()[-3000:]
    )
    return dict(kids)


def replaced(sup: Supervisor, key: str, old: int) -> int:
    """The pid of ``key``'s child once it is not ``old``."""
    return int(
        wait_for(lambda: (lambda p: p if p not in (None, old) else None)(user_data(sup).get(key)), WAIT_S)
    )


@pytest.mark.e2e
def test_children_come_from_the_fork_server_and_outlive_it(
    sim3: Simulator, db: Any, secret_key: str, kraite_env: dict[str, str], processes: Any, run_dir: str
) -> None:
    sup = start(sim3, db, secret_key, kraite_env, processes, run_dir)
    try:
        kids = all_user_data(sup, 3)
        for a in sim3.accounts:
            assert sim3.wait_for_connections(a.api_key, 1, timeout=WAIT_S), sup.log()[-3000:]
        servers = fork_servers(sup.pid)
        assert len(servers) == 1, sup.log()[-3000:]
        server = servers[0]
        # forked by the server (through an intermediate), re-parented to the supervisor: its own children
        assert all(ppid_of(pid) == sup.pid for pid in kids.values())
        assert not children_of(server)  # the server keeps no child: the intermediates exited
        assert sup.lines(rf"fork server started pid={server} ")
        wait_for(
            lambda: (read_snapshot(os.path.join(run_dir, "run")) or {}).get("fork_server_pid") == server,
            WAIT_S,
        )
        mark = by_role(sup.pid)["mark-price"]  # the mark-price child is forked by the supervisor itself
        assert mark not in kids.values()

        # a user-data child killed: the supervisor reaps it and the server forks its replacement
        key, victim = sorted(kids.items())[0]
        os.kill(victim, signal.SIGKILL)
        new = replaced(sup, key, victim)
        assert ppid_of(new) == sup.pid
        assert sup.lines(rf"pid={victim} exited with signal SIGKILL"), sup.log()[-3000:]

        # the server killed: no child notices; the next spawn starts another server
        others = {k: p for k, p in user_data(sup).items() if k != key}
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: sup.lines(rf"fork server pid={server} exited"), WAIT_S, message=sup.log()[-3000:])
        assert {k: p for k, p in user_data(sup).items() if k != key} == others
        assert all(ppid_of(p) == sup.pid for p in others.values())
        key2, victim2 = sorted(others.items())[0]
        os.kill(victim2, signal.SIGKILL)
        new2 = replaced(sup, key2, victim2)
        assert ppid_of(new2) == sup.pid
        second = fork_servers(sup.pid)
        assert len(second) == 1 and second != [server], sup.log()[-3000:]
        assert not sup.lines(r"(?i)forks its children itself")
        # the server and a child killed at once: whether the supervisor reaps the server before it spawns
        # the child again or not, the child comes back (forked by a new server, or by the supervisor)
        key3, victim3 = sorted(user_data(sup).items())[-1]
        os.kill(second[0], signal.SIGKILL)
        os.kill(victim3, signal.SIGKILL)
        new3 = replaced(sup, key3, victim3)
        assert ppid_of(new3) == sup.pid
        wait_for(lambda: sup.lines(rf"fork server pid={second[0]} exited"), WAIT_S, message=sup.log()[-3000:])
        assert not sup.lines(r"(?i)forks its children itself")  # a dead server is no reason to stop using one
        # every account streams again
        for a in sim3.accounts:
            assert sim3.wait_for_connections(a.api_key, 1, timeout=WAIT_S)

        # a graceful stop ends every process, the server included
        everyone = [*user_data(sup).values(), *fork_servers(sup.pid)]
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=WAIT_S) == 0, sup.log()[-3000:]
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in everyone), WAIT_S)
    finally:
        sup.close()


@pytest.mark.e2e
def test_without_the_fork_server_the_supervisor_forks_the_children(
    sim3: Simulator, db: Any, secret_key: str, kraite_env: dict[str, str], processes: Any, run_dir: str
) -> None:
    sup = start(sim3, db, secret_key, kraite_env, processes, run_dir, KRAITE__supervisor__fork_server="false")
    try:
        kids = all_user_data(sup, 3)
        assert all(ppid_of(pid) == sup.pid for pid in kids.values())
        assert not fork_servers(sup.pid)
        assert not sup.lines(r"fork server started")
        snapshot = wait_for(lambda: read_snapshot(os.path.join(run_dir, "run")), WAIT_S)
        assert "fork_server_pid" in snapshot and snapshot["fork_server_pid"] is None
    finally:
        sup.close()


SERVER_SCRIPT = """
import json, os, sys
from kraite_mp.config.load import load_settings
from kraite_mp.supervisor.forkserver import ForkServer, become_subreaper
from kraite_mp.supervisor.publish import Reporters
from contextlib import nullcontext

run_dir, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(run_dir, "heartbeats"), exist_ok=True)
env = {"KRAITE_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none", "KRAITE_RUN_DIR": run_dir}

def target(ctx):
    with open(out, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "key": ctx.key,
                            "log_level": ctx.settings.log_level}) + "\\n")
    return 3

assert become_subreaper()
first = load_settings(None, environ={**env, "KRAITE_LOG_LEVEL": "INFO"})
server = ForkServer(first, {"user-data": target}, Reporters(), become_child=lambda: None)
assert server.start(nullcontext)
codes = []
for n, settings in enumerate([first, first, load_settings(None, environ={**env, "KRAITE_LOG_LEVEL": "DEBUG"})]):
    pid = server.spawn(settings, "user-data", None, f"user-data-{n}")
    assert pid, pid
    _, status = os.waitpid(pid, 0)  # the supervisor's own child: it can wait for it
    codes.append(os.waitstatus_to_exitcode(status))
server_pid = server.pid
server.stop()
_, status = os.waitpid(server_pid, 0)
print(json.dumps({"codes": codes, "server": server_pid, "me": os.getpid()}))
"""


@pytest.mark.e2e
def test_the_server_forks_children_its_caller_reaps_with_the_settings_of_each_request(tmp_path: Path) -> None:
    import json
    import subprocess

    out = tmp_path / "children.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", SERVER_SCRIPT, str(tmp_path / "run"), str(out)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    children = [json.loads(line) for line in out.read_text().splitlines()]
    # each child ran its target with its own key, re-parented to the caller, its exit code reaped by it
    assert [c["key"] for c in children] == ["user-data-0", "user-data-1", "user-data-2"]
    assert all(c["ppid"] == summary["me"] for c in children)
    assert len({c["pid"] for c in children}) == 3 and summary["server"] not in {c["pid"] for c in children}
    assert summary["codes"] == [3, 3, 3]
    # the settings sent with a request (a reload) are the ones its child, and the next ones, run with
    assert [c["log_level"] for c in children] == ["INFO", "INFO", "DEBUG"]
