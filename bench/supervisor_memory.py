"""Memory and idle CPU of ``kraite-mp run`` with N accounts streaming from the local simulator.

For each N: a fresh PostgreSQL database (created on the admin URL, dropped at the end), N accounts
whose keys the simulator knows, the simulator's symbols seeded into ``exchange_symbols``, then the
real ``kraite-mp run`` (spawn pacing raised so the start takes seconds, not minutes). Once every
user-data child and the mark-price child report ``state=streaming`` and a settle period has
passed, it reads ``/proc/PID/smaps_rollup`` for every process (PSS = the process's fair share of
shared pages; USS = Private_Clean + Private_Dirty, what killing it would free) and samples CPU
time (``/proc/PID/stat`` utime+stime) over a window while the streams idle (no user-data events;
mark prices tick every second).

Usage::

    .venv/bin/python bench/supervisor_memory.py --accounts 10,100,500 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres --redis-url redis://127.0.0.1:6379/0

Prints a markdown section on stdout (progress on stderr). Target: <= 6 MB USS per idle user-data child.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # tests/support.py, imported as the tests import it

from support import children_of, title_of  # noqa: E402

from kraite_mp.ops.seed import seed_symbols  # noqa: E402
from kraite_mp.store import db as kdb  # noqa: E402
from kraite_mp.store.accounts import add_account, generate_secret_key  # noqa: E402

#: Per-idle-child USS target (issue 17: <= 6 MB at 1,000 accounts, with TLS; docs/BENCHMARKS.md).
TARGET_USS_MB = 6.0
#: The simulator must print its JSON line within this long.
SIM_START_TIMEOUT_S = 60.0
#: Everything streaming within BASE + PER_ACCOUNT * N seconds, or the run fails.
STREAMING_TIMEOUT_BASE_S = 60.0
STREAMING_TIMEOUT_PER_ACCOUNT_S = 0.5
#: Bounded waits for processes to stop.
STOP_TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB_PER_MB = 1024.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Mem:
    rss_kb: int
    pss_kb: int
    uss_kb: int


def smaps_rollup(pid: int) -> Mem:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1])
    return Mem(
        values.get("Rss", 0),
        values.get("Pss", 0),
        values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    )


def private_by_mapping(pid: int, top: int = 12) -> list[tuple[str, int, int]]:
    """(mapping, Private kB, Rss kB) aggregated by pathname ([heap], [anon], [stack], a .so ...), largest first."""
    totals: dict[str, list[int]] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anon]"
                totals.setdefault(name, [0, 0])
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                totals[name][0] += int(parts[1])
            elif parts[0] == "Rss:":
                totals[name][1] += int(parts[1])
    rows = sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: -r[1])
    return rows[:top]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def start_ticks(pid: int) -> int:
    """When ``pid`` started (``/proc/PID/stat`` field 22, clock ticks since boot): its fork order, which
    pids are not once they wrap."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def by_tenths(values: list[float]) -> list[float]:
    """The means of ``values`` (in order) over ten consecutive, nearly equal parts."""
    n = len(values)
    bounds = [round(i * n / 10) for i in range(11)]
    return [statistics.mean(values[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def sched(pid: int) -> tuple[int, int]:
    """(CPU nanoseconds, times scheduled onto a CPU) summed over the threads of ``pid`` (``schedstat``):
    exact where ``stat``'s ticks are 10 ms coarse, and the second figure counts the wake-ups."""
    ns = slices = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, _wait_ns, timeslices = f.read().split()[:3]
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        ns += int(run_ns)
        slices += int(timeslices)
    return ns, slices


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_json_line(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise RuntimeError("the simulator printed nothing")
    line = proc.stdout.readline()
    return json.loads(line)  # type: ignore[no-any-return]


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def streaming(heartbeats: Path) -> tuple[int, bool]:
    """(user-data children streaming, mark-price streaming) per the heartbeat files."""
    users, mark = 0, False
    for path in heartbeats.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("state") != "streaming":
            continue
        if data.get("role") == "user-data":
            users += 1
        elif data.get("role") == "mark-price":
            mark = True
    return users, mark


def run_one(
    n: int,
    admin_url: str,
    redis_url: str,
    symbols: int,
    settle_s: float,
    cpu_window_s: float,
    detail: bool = False,
    real_limits: bool = False,
    tls: bool = False,
    settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"kraite-bench-{n}-"))
    dbname = f"kraite_bench_{uuid.uuid4().hex[:8]}"
    namespace = f"kraite-bench-{uuid.uuid4().hex[:8]}"
    secret_key = generate_secret_key()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAITE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    sim = sup = None
    database_url = kdb.create_database(admin_url, dbname)
    try:
        sim_log = open(work / "simulator.log", "wb")
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kraite_mp",
                "simulate",
                "--port",
                "0",
                "--accounts",
                str(n),
                "--symbols",
                str(symbols),
                "--rate",
                "0",
                "--log-level",
                "WARNING",
                *(["--tls-dir", str(work / "tls")] if tls else []),
            ],
            stdout=subprocess.PIPE,
            stderr=sim_log,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,
        )
        info = read_json_line(sim, SIM_START_TIMEOUT_S)
        import requests

        names = [
            s["symbol"]
            for s in requests.get(
                info["rest_url"] + "/fapi/v1/exchangeInfo", timeout=30, verify=info.get("ca_file") or True
            ).json()["symbols"]
        ]
        conn = kdb.connect(database_url)
        try:
            kdb.migrate(conn)
            seed_symbols(conn, names)
            for i, acct in enumerate(info["accounts"]):
                add_account(
                    conn, secret_key, name=f"bench{i}", api_key=acct["api_key"], api_secret=acct["api_secret"]
                )
        finally:
            conn.close()
        run_dir = work / "run"
        env.update(
            KRAITE_DATABASE_URL=database_url,
            KRAITE_REDIS_URL=redis_url,
            KRAITE_REDIS_NAMESPACE=namespace,
            KRAITE_SECRET_KEY=secret_key,
            KRAITE_RUN_DIR=str(run_dir),
            KRAITE__user_data_stream__spool_dir=str(work / "spool"),
            KRAITE_BINANCE_REST_URL=info["rest_url"],
            KRAITE_BINANCE_WS_URL=info["ws_url"],
            KRAITE_LOG_LEVEL="WARNING",
            KRAITE__supervisor__spawn_rate_per_s="1000",
            KRAITE__supervisor__spawn_burst="1000",
            KRAITE__supervisor__sync_interval_s="0",
            # a port of its own: another benchmark's metrics child on the default port would make this
            # one's restart in backoff all along (counted as restarts)
            KRAITE__metrics__listen=f"127.0.0.1:{free_port()}",
        )
        # --setting section.name=value: a kraite-mp setting for this run (e.g. one part of the memory recipe off)
        env.update({f"KRAITE__{k.replace('.', '__')}": v for k, v in (settings or {}).items()})
        if tls:  # https:// and wss:// as production runs, the simulator's test certificate trusted
            env["KRAITE__binance__ca_file"] = str(info["ca_file"])
        if not real_limits:
            # memory and idle CPU, not pacing: the egress's connection budget (150 attempts per 310 s at
            # Binance's limits) would take 34 minutes to bring 1,000 accounts up (--real-limits does that);
            # lifted on both sides, the simulator's handshake limit and kraite-mp's budget
            env["KRAITE__binance__connection_limit"] = "1000000"
            requests.post(
                info["control_url"] + "/set_connection_limit",
                json={"limit": 1_000_000},
                timeout=10,
                verify=info.get("ca_file") or True,
            ).raise_for_status()
        log(f"N={n}: simulator up, {len(names)} symbols and {n} accounts seeded")
        sup_log = open(work / "supervisor.log", "wb")
        started = time.monotonic()
        sup = subprocess.Popen(
            [sys.executable, "-m", "kraite_mp", "run"],
            stdout=sup_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,
        )
        deadline = started + STREAMING_TIMEOUT_BASE_S + STREAMING_TIMEOUT_PER_ACCOUNT_S * n
        if real_limits:
            deadline += 2.2 * n  # 150 connection attempts per 310 s: ~2.1 s per account
        while True:
            users, mark = streaming(run_dir / "heartbeats")
            if users == n and mark:
                break
            if time.monotonic() > deadline or sup.poll() is not None:
                raise RuntimeError(
                    f"N={n}: only {users}/{n} user-data streaming, mark-price={mark}; "
                    f"see {work / 'supervisor.log'}"
                )
            time.sleep(0.5)
        to_streaming = time.monotonic() - started
        log(f"N={n}: all streaming after {to_streaming:.1f}s; settling {settle_s:.0f}s")
        time.sleep(settle_s)

        kids = children_of(sup.pid)
        roles: dict[int, str] = {}
        for path in (run_dir / "heartbeats").glob("*.json"):
            data = json.loads(path.read_text())
            roles[int(data["pid"])] = str(data["role"])
        mem = {pid: smaps_rollup(pid) for pid in [sup.pid, *kids]}
        if detail:
            sample = next(p for p in kids if roles.get(p) == "user-data")
            for label, pid in (("user-data child", sample), ("parent", sup.pid)):
                log(f"N={n}: {label} pid={pid} private memory by mapping (kB private / kB rss):")
                for mapping, private_kb, rss_kb in private_by_mapping(pid):
                    log(f"    {private_kb:>8} {rss_kb:>8}  {mapping}")
        sched0 = {pid: sched(pid) for pid in [sup.pid, *kids]}
        sim_ticks0 = cpu_ticks(sim.pid)
        t0 = time.monotonic()
        time.sleep(cpu_window_s)
        elapsed = time.monotonic() - t0
        sched1 = {pid: sched(pid) for pid in sched0}
        if detail:
            sample = next(p for p in kids if roles.get(p) == "user-data")
            log(f"N={n}: user-data child pid={sample} wake-ups per thread over {cpu_window_s:.0f} s:")
            for tid in sorted(os.listdir(f"/proc/{sample}/task"), key=int):
                with open(f"/proc/{sample}/task/{tid}/schedstat") as f:
                    log(f"    tid {tid}: {f.read().split()[2]} times scheduled in all")
        cpu = {pid: (sched1[pid][0] - sched0[pid][0]) / 1e9 / elapsed * 100 for pid in sched0}
        wakeups = {pid: (sched1[pid][1] - sched0[pid][1]) / elapsed for pid in sched0}
        sim_cpu = (cpu_ticks(sim.pid) - sim_ticks0) / CLK_TCK / elapsed * 100
        users_pids = [p for p in kids if roles.get(p) == "user-data"]
        mark_pids = [p for p in kids if roles.get(p) == "mark-price"]
        # the fork server (supervisor.fork_server) writes no heartbeat: found by its process title
        server_pids = [p for p in kids if p not in roles and title_of(p).startswith("kraite-mp: fork-server")]
        user_pss = [mem[p].pss_kb / KB_PER_MB for p in users_pids]
        user_uss = [mem[p].uss_kb / KB_PER_MB for p in users_pids]
        user_rss = [mem[p].rss_kb / KB_PER_MB for p in users_pids]
        # USS by fork order: a child forked later from a supervisor whose heap changed shares less of it
        in_fork_order = sorted(users_pids, key=start_ticks)
        uss_tenths = by_tenths([mem[p].uss_kb / KB_PER_MB for p in in_fork_order])
        result = {
            "n": n,
            "children": len(kids),
            "to_streaming_s": to_streaming,
            "user_pss_mean": statistics.mean(user_pss),
            "user_pss_max": max(user_pss),
            "user_uss_mean": statistics.mean(user_uss),
            "user_rss_mean": statistics.mean(user_rss),
            "user_uss_by_fork_tenth": uss_tenths,
            "user_threads": threads_of(users_pids[0]),
            "user_cpu_mean": statistics.mean(cpu[p] for p in users_pids),
            "user_cpu_total": sum(cpu[p] for p in users_pids),
            "user_wakeups_mean": statistics.mean(wakeups[p] for p in users_pids),
            "mark_pss": mem[mark_pids[0]].pss_kb / KB_PER_MB if mark_pids else float("nan"),
            "mark_uss": mem[mark_pids[0]].uss_kb / KB_PER_MB if mark_pids else float("nan"),
            "mark_cpu": cpu[mark_pids[0]] if mark_pids else float("nan"),
            "server_pss": mem[server_pids[0]].pss_kb / KB_PER_MB if server_pids else float("nan"),
            "server_uss": mem[server_pids[0]].uss_kb / KB_PER_MB if server_pids else float("nan"),
            "parent_pss": mem[sup.pid].pss_kb / KB_PER_MB,
            "parent_uss": mem[sup.pid].uss_kb / KB_PER_MB,
            "parent_rss": mem[sup.pid].rss_kb / KB_PER_MB,
            "parent_cpu": cpu[sup.pid],
            "total_pss": sum(m.pss_kb for m in mem.values()) / KB_PER_MB,
            "sim_cpu": sim_cpu,
            "restarts": _restarts(run_dir),
        }
        log(f"N={n}: {result}")
        return result
    finally:
        t = time.monotonic()
        if sup is not None:
            stop(sup)
            log(f"N={n}: supervisor stopped in {time.monotonic() - t:.1f}s (exit {sup.returncode})")
        if sim is not None:
            stop(sim)
        kdb.drop_database(admin_url, dbname)
        drop_namespace(redis_url, namespace)
        log(f"N={n}: cleanup took {time.monotonic() - t:.1f}s")
        shutil.rmtree(work, ignore_errors=True)


def drop_namespace(redis_url: str, namespace: str) -> None:
    """Delete every Redis key of the run's namespace (queues, statuses, budgets, fleet keys)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except redis.RedisError as e:
        log(f"cannot delete the Redis keys of {namespace}: {e}")
    finally:
        client.close()


def _restarts(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "supervisor.json").read_text()).get("restarts", 0))
    except (OSError, ValueError):
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", default="10,100", help="comma-separated N values (default 10,100)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("KRAITE_TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres",
        help="admin URL (CREATE DATABASE)",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("KRAITE_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
    )
    parser.add_argument("--symbols", type=int, default=570)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--cpu-window-s", type=float, default=20.0)
    parser.add_argument(
        "--detail", action="store_true", help="print one child's private memory by mapping (stderr)"
    )
    parser.add_argument(
        "--real-limits",
        action="store_true",
        help="keep the egress's connection budget at Binance's limits (start-up takes ~2.1 s per account)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="https:// and wss:// (the simulator's test certificate)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="SECTION.NAME=VALUE",
        help="a kraite-mp setting for the run, e.g. supervisor.immortalize_before_fork=false (repeatable)",
    )
    args = parser.parse_args()
    settings = dict(s.split("=", 1) for s in args.setting)

    # a SIGTERM (timeout, pkill) must still run the clean-up: stop the supervisor and the simulator; a
    # second one (`timeout` passes its own on) must not cut that clean-up short
    def on_sigterm(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    ns = [int(x) for x in args.accounts.split(",") if x.strip()]
    results = [
        run_one(
            n,
            args.database_url,
            args.redis_url,
            args.symbols,
            args.settle_s,
            args.cpu_window_s,
            args.detail,
            args.real_limits,
            args.tls,
            settings,
        )
        for n in ns
    ]

    print("## Supervisor memory and idle CPU (`bench/supervisor_memory.py`)\n")
    print(
        f"`{' '.join(['bench/supervisor_memory.py', *sys.argv[1:]])}` on {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, Linux {platform.release()}. Idle streams: no user-data events, "
        f"{'the real connection budget' if args.real_limits else 'the connection budget lifted (start-up is not paced)'}, "
        f"{'TLS (https://, wss://)' if args.tls else 'plain http:// and ws://'}, "
        f"{args.symbols} simulated symbols ticking mark prices every second. Memory from `/proc/PID/smaps_rollup` after all children "
        f"stream and {args.settle_s:.0f} s settle; CPU (`/proc/PID/task/*/schedstat`: run time and times scheduled, i.e. wake-ups, of every thread) over {args.cpu_window_s:.0f} s; `all` is the sum over the user-data children, in % of one core. MB = MiB.\n"
    )
    print(
        "| accounts | children | user-data PSS mean | user-data PSS max | user-data USS mean | user-data RSS mean "
        "| mark-price PSS / USS | parent PSS / USS | all processes PSS | parent CPU idle | user-data CPU mean "
        "| user-data CPU all | user-data wake-ups/s mean | mark-price CPU | start to all streaming | restarts |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['n']} | {r['children']} | {r['user_pss_mean']:.1f} MB | {r['user_pss_max']:.1f} MB "
            f"| {r['user_uss_mean']:.1f} MB | {r['user_rss_mean']:.1f} MB "
            f"| {r['mark_pss']:.1f} / {r['mark_uss']:.1f} MB | {r['parent_pss']:.1f} / {r['parent_uss']:.1f} MB "
            f"| {r['total_pss']:.0f} MB | {r['parent_cpu']:.2f} % | {r['user_cpu_mean']:.3f} % "
            f"| {r['user_cpu_total']:.1f} % | {r['user_wakeups_mean']:.2f} "
            f"| {r['mark_cpu']:.1f} % | {r['to_streaming_s']:.1f} s | {r['restarts']} |"
        )
    for r in results:
        tenths = " / ".join(f"{v:.2f}" for v in r["user_uss_by_fork_tenth"])
        print(f"\nN={r['n']}: user-data USS by fork order, mean of each tenth, first to last: {tenths} MB")
    at_scale = max(results, key=lambda r: r["n"])
    verdict = "met" if at_scale["user_uss_mean"] <= TARGET_USS_MB else "NOT met"
    print(
        f"\nTarget <= {TARGET_USS_MB:.0f} MB USS per idle user-data child at scale: {verdict} "
        f"({at_scale['user_uss_mean']:.2f} MB at N={at_scale['n']}; the fork server "
        f"{at_scale['server_pss']:.1f} / {at_scale['server_uss']:.1f} MB PSS / USS). USS is what one more child costs; PSS adds "
        f"its share of the pages it still shares with the parent (the interpreter and every imported module, "
        f"~{at_scale['user_rss_mean'] - at_scale['user_uss_mean']:.0f} MB), so PSS falls towards USS as N grows. "
        f"Each user-data child runs {at_scale['user_threads']} threads."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
