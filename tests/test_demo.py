"""``kraite-mp demo`` smoke tests: no configuration at all (embedded PostgreSQL and Redis), a few
seconds of streaming, a summary with processed frames, and nothing left running afterwards.

Every process the demo starts inherits a unique marker in its environment (the demo passes the
environment on, minus KRAITE_* settings), so leftovers are found by scanning /proc.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MARKER_VAR, ROOT, marked_pids, title_of, wait_for


def describe(pids: list[int]) -> str:
    """One line per process still there: its pid and its title."""
    return "\n".join(f"{pid}: {title}" for pid in pids if (title := title_of(pid)))


@pytest.fixture()
def demo_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of someone who configured nothing; every descendant is marked."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAITE")}
    env[MARKER_VAR] = marker
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    try:
        yield env
    finally:
        for _ in range(3):  # whatever happened, nothing of ours survives the test
            pids = marked_pids(marker, tmp_path)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _demo_args(workdir: Path, duration: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kraite_mp",
        "demo",
        "--duration",
        str(duration),
        "--accounts",
        "2",
        "--symbols",
        "40",
        "--rate",
        "3",
        "--refresh",
        "1",
        "--workdir",
        str(workdir),
    ]


def _frames_processed(output: str) -> int:
    m = re.search(r"frames processed \(audited in api_data_stream\): (\d+)", output)
    assert m, f"no summary line in the output:\n{output}"
    return int(m.group(1))


def _assert_clean_stop(output: str, marker: str, root: Path) -> None:
    for name in ("kraite-mp-run", "worker", "simulator"):
        assert re.search(rf"stopped {name} \(pid \d+\): stopped, exit code 0", output), output[-3000:]
    assert "stopped embedded Redis" in output and "stopped embedded PostgreSQL" in output
    # the embedded servers, the simulator, the supervisor, its children, the dramatiq processes: all gone
    deadline = time.monotonic() + 20
    while marked_pids(marker, root) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = marked_pids(marker, root)
    assert not left, f"left behind:\n{describe(left)}"


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_demo_runs_with_no_configuration(tmp_path: Path, demo_env: dict[str, str]) -> None:
    result = subprocess.run(
        _demo_args(tmp_path / "demo", 8),
        env=demo_env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=360,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for step in range(1, 9):
        assert f"[{step}/8]" in output
    assert "embedded PostgreSQL started" in output and "embedded Redis started" in output
    assert "2/3 streaming" in output or "3/3 streaming" in output
    assert "ACCOUNT" in output and "demo-1" in output and "demo-2" in output
    assert _frames_processed(output) > 0
    assert "mark prices: " in output and "across 4 exchanges" in output
    assert re.search(r"mark prices: [1-9]\d*/", output), "no mark price was written"
    assert "=== inspect the data ===" in output and "psql " in output
    _assert_clean_stop(output, demo_env[MARKER_VAR], tmp_path)
    # logs stay for the curious; nothing else
    assert (tmp_path / "demo" / "logs" / "kraite-mp-run.log").exists()
    assert not (tmp_path / "demo" / "pg").exists()


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_demo_ctrl_c_stops_cleanly_with_a_summary(tmp_path: Path, demo_env: dict[str, str]) -> None:
    out_path = tmp_path / "out.txt"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            _demo_args(tmp_path / "demo", 300),
            env=demo_env,
            cwd=str(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # wait for the live table with processed frames, then press Ctrl-C
        wait_for(
            lambda: re.search(r"demo-1 +streaming +\d+ +[1-9]", out_path.read_text()),
            timeout=240,
            interval=0.5,
            message="the live table shows frames",
        )
        # the scan that proves "nothing left" sees the tree: PostgreSQL, Redis, the simulator, the
        # worker (2 processes), kraite-mp run and its 3 children
        assert len(marked_pids(demo_env[MARKER_VAR], tmp_path)) >= 9
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output = out_path.read_text()
    assert proc.returncode == 0, output[-5000:]
    assert "Ctrl-C: stopping the market and writing the summary" in output
    assert _frames_processed(output) > 0
    _assert_clean_stop(output, demo_env[MARKER_VAR], tmp_path)


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_demo_failure_midway_still_stops_what_it_started(tmp_path: Path, demo_env: dict[str, str]) -> None:
    """Embedded PostgreSQL is up when the (given, dead) Redis turns out unreachable: it must be stopped."""
    from kraite_mp.ops.embedded import free_port

    env = dict(demo_env, KRAITE_REDIS_URL=f"redis://:s3cretpw@127.0.0.1:{free_port()}/0")
    result = subprocess.run(
        _demo_args(tmp_path / "demo", 5),
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "embedded PostgreSQL started" in output
    assert "demo failed: KRAITE_REDIS_URL" in output and "is not reachable" in output
    assert "s3cretpw" not in output
    assert "Traceback" not in output
    assert "stopped embedded PostgreSQL" in output
    assert marked_pids(demo_env[MARKER_VAR], tmp_path) == []


# -- `make bench`: bench/run_all.py, the other operator-facing make target --------------------------


@pytest.mark.unit
@pytest.mark.timeout(120)
def test_bench_run_all_collects_sections_and_survives_failures(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "a_ok.py").write_text(
        "import sys\nprint('progress', file=sys.stderr)\nprint('## A works\\n\\n| rows | p50 |\\n|---|---|\\n| 10 | 1 ms |')\n"
    )
    (bench / "b_fail.py").write_text(
        "import sys\nprint('## B partial')\nprint('boom: database gone', file=sys.stderr)\nsys.exit(3)\n"
    )
    pid_file = tmp_path / "slow.pid"
    (bench / "c_slow.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    )
    (bench / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    out = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run_all.py"),
            "--bench-dir",
            str(bench),
            "--timeout",
            "5",
            "--output",
            str(out),
            "--args",
            "a_ok=--flag x",
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 1, result.stderr
    doc = out.read_text()
    assert "## Machine" in doc and "CPUs (nproc)" in doc and "CPU model" in doc and "RAM" in doc
    assert "| Python |" in doc and "| PostgreSQL |" in doc and "| Redis |" in doc and "| date |" in doc
    assert "## A works" in doc and "| 10 | 1 ms |" in doc
    assert "`bench/a_ok.py` | ok in" in doc
    assert (
        "bench/b_fail.py: failed: exit code 3" in doc
        and "## B partial" in doc
        and "boom: database gone" in doc
    )
    assert "bench/c_slow.py: timed out" in doc
    assert "_helper" not in doc
    assert "2 of 3 benchmark(s) did not complete" in doc
    assert "progress" in result.stderr  # live progress passes through
    slow_pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{slow_pid}"), "the timed-out script was not stopped"
    listed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--bench-dir", str(bench), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.stdout.split() == ["a_ok", "b_fail", "c_slow"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_demo_on_given_servers_uses_a_database_of_its_own_and_drops_it(
    tmp_path: Path, demo_env: dict[str, str], pg_admin_url: str, redis_url: str
) -> None:
    """With KRAITE_DATABASE_URL set the demo creates ``kraite_demo_<id>`` there and drops it at the end; a
    database of the old fixed name (someone's earlier demo, or theirs) is never touched."""
    from kraite_mp.store import db as kdb

    def databases() -> set[str]:
        conn = kdb.connect(pg_admin_url, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'kraite_demo%%'")
                return {r[0] for r in cur.fetchall()}
        finally:
            conn.close()

    existing = f"kraite_demo_{uuid.uuid4().hex[:6]}x"  # not a name the demo makes (7 chars after _)
    kdb.create_database(pg_admin_url, existing)
    before = databases()
    try:
        env = {**demo_env, "KRAITE_DATABASE_URL": pg_admin_url, "KRAITE_REDIS_URL": redis_url}
        result = subprocess.run(
            _demo_args(tmp_path / "demo", 3),
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=240,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-5000:]
        m = re.search(
            r"creates its own database (kraite_demo_[0-9a-f]{8}) there and drops it at the end", output
        )
        assert m, output[:3000]
        assert f"stopped database {m.group(1)}" in output
        assert _frames_processed(output) > 0
        assert databases() == before and m.group(1) not in before  # its own gone, the others all there
    finally:
        kdb.drop_database(pg_admin_url, existing)
