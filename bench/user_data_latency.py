"""Benchmark: user-data latency, simulator frame -> child -> spool -> Redis -> Dramatiq worker -> PostgreSQL.

Usage::

    python bench/user_data_latency.py [--accounts 10,100,200] [--rate 100] [--duration 30]
        [--idle-poll-ms 10] [--compare-idle-poll 1000] [--no-doorbell] [--worker-threads 8] [--burst 3000]

Services: PostgreSQL at ``KRAITE_BENCH_DATABASE_URL`` (admin URL; a scratch database is created and
dropped), default ``postgresql://postgres@127.0.0.1:5432/postgres``; Redis at ``KRAITE_BENCH_REDIS_URL``,
default ``redis://127.0.0.1:6379/0`` (a namespace of its own, deleted at the end). Embedded servers
when those are unreachable.

Each case runs in a fresh subprocess of this script: the simulator (``python -m kraite_mp.simulator``,
its own process), N user-data children forked from that subprocess exactly as the supervisor forks
them (``ChildContext`` + ``run_child`` + ``run_user_data_child``, so they share its imported code),
and a Dramatiq ``Worker(broker, worker_threads=8)`` in the subprocess, started after the forks.
Load: ``--rate`` scenario steps per second in total, spread evenly over the accounts (one
``step`` control call at a time, round robin, from a process of its own), for ``--duration`` seconds
after every child is streaming; a step emits 1-4 frames. Default allowlist (production). The
reconciliations requested by every connect run meanwhile on their own worker pool (a ``dramatiq
kraite_mp.jobs --queues reconcile`` process), as deployed.

Measured per frame received in the window:
- received -> handed to Redis: ``message_timestamp`` (ms, stamped by the child's sender right before the
  enqueue, so *before* Redis acknowledged it: the round trip is not in it; ``bench/compare_asyncio.py``
  measures frame -> in Redis at the Redis end, after the acknowledgement) minus the child's receive time
  (a 1 ms resolution);
- received -> job started (the worker's ``before_process_message``);
- received -> committed: the worker's ``after_process_message`` (after COMMIT and the observers)
  minus the receive time, for dispatched order frames (the order row) and for every frame (audit);
- worker events/s at the offered load, and its capacity: frames per second while draining a backlog
  of ``--burst`` scenario steps produced while the worker was paused.
The cases run with the frame queue's doorbell (the consumer blocks in BLPOP on the bell the children's
senders ring; ``broker.KraiteRedisBroker``), as deployed; ``--no-doorbell`` makes their consumer poll every
``--idle-poll-ms`` instead (``jobs.build_broker(doorbell=False)``, the behaviour before the doorbell).
The wake-up comparison repeats the smallest case at ``--compare-rate`` with the consumer polling, its
idle sleep capped at each of ``--compare-idle-poll`` ms (1000 = Dramatiq's default ``worker_timeout``
behaviour) and ``--idle-poll-ms``, and with the doorbell, and measures what each costs when nothing
happens: the CPU of an idle worker process (8 threads), and the CPU and commands/s of a Redis server of
its own (nothing else's counts), over 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The goal (issue 17): frame -> order row committed at the largest case, p50 and p99 (ms).
GOAL_P50_MS = 5.0
GOAL_P99_MS = 15.0
#: Longest wait for all children to stream, for the queue to drain, ...
WAIT_TIMEOUT_S = 300.0


def log(msg: str) -> None:
    print(f"[user_data_latency] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def wait(pred: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


# -- one case, in its own process ------------------------------------------------------------------------


def run_case(cfg: dict[str, Any]) -> dict[str, Any]:
    import requests

    from kraite_mp.config.load import load_settings
    from kraite_mp.logs import setup_logging
    from kraite_mp.store import db as kdb
    from kraite_mp.store.accounts import add_account, generate_secret_key, list_accounts
    from kraite_mp.streams.userdata import run_user_data_child
    from kraite_mp.supervisor import runfiles
    from kraite_mp.supervisor.context import ChildContext, run_child

    n = int(cfg["accounts"])
    work = tempfile.mkdtemp(prefix="kraite-bench-ud-")
    sim_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kraite_mp.simulator",
            "--port",
            "0",
            "--accounts",
            str(n),
            "--symbols",
            "50",
            "--rate",
            "0",
            "--mark-price-interval",
            "60",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
        start_new_session=True,
    )
    children: list[int] = []
    try:
        line = sim_proc.stdout.readline() if sim_proc.stdout else b""
        if not line:
            raise RuntimeError("the simulator did not start")
        sim = json.loads(line)
        secret_key = generate_secret_key()
        env = {
            "KRAITE_DATABASE_URL": cfg["database_url"],
            "KRAITE_REDIS_URL": cfg["redis_url"],
            "KRAITE_REDIS_NAMESPACE": cfg["namespace"],
            "KRAITE_SECRET_KEY": secret_key,
            "KRAITE_RUN_DIR": os.path.join(work, "run"),
            "KRAITE_BINANCE_REST_URL": sim["rest_url"],
            "KRAITE_BINANCE_WS_URL": sim["ws_url"],
            "KRAITE__user_data_stream__spool_dir": os.path.join(work, "spool"),
            "KRAITE__jobs__idle_poll_ms": str(cfg["idle_poll_ms"]),
            # the local simulator takes 300 handshakes per 5 min; the default egress budget (half of Binance's
            # 300) would hold the 200-account case for minutes before it could start
            "KRAITE__binance__connection_limit": "10000000",
            "KRAITE_LOG_LEVEL": "WARNING",
        }
        settings = load_settings(None, environ=env)
        os.makedirs(runfiles.heartbeat_dir(settings.run_dir), exist_ok=True)
        setup_logging("WARNING")
        conn = kdb.connect(settings.database_url)
        with conn.cursor() as cur:
            cur.execute(
                "TRUNCATE order_transitions, orders, api_data_stream, account_balances, account_positions,"
                " accounts RESTART IDENTITY CASCADE"
            )
        conn.commit()
        for i, a in enumerate(sim["accounts"]):
            add_account(conn, secret_key, name=f"bench{i}", api_key=a["api_key"], api_secret=a["api_secret"])
        accounts = list_accounts(conn)
        conn.close()

        # fork the children before this process starts any thread (as the supervisor does)
        contexts = [ChildContext(settings, "user-data", a) for a in accounts]
        for ctx in contexts:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_child(ctx, run_user_data_child)
                finally:
                    os._exit(code)
            children.append(pid)

        import dramatiq
        from dramatiq.middleware import Middleware

        from kraite_mp import jobs
        from kraite_mp.messages import PROCESS_ACTOR

        started: dict[str, tuple[float, int, float]] = {}
        finished: dict[str, float] = {}

        class Probe(Middleware):
            def before_process_message(self, broker: Any, message: Any) -> None:
                if message.actor_name == PROCESS_ACTOR:
                    kw = message.kwargs
                    started[kw["frame_id"]] = (
                        kw["received_at"],
                        message.message_timestamp,
                        time.time() * 1000,
                    )

            def after_process_message(
                self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
            ) -> None:
                if message.actor_name == PROCESS_ACTOR and exception is None:
                    finished[message.kwargs["frame_id"]] = time.time() * 1000

        broker = jobs.build_broker(settings, doorbell=bool(cfg["doorbell"]))
        broker.add_middleware(Probe())
        # frames and reconciliations on separate worker pools, as deployed (a reconciliation may sleep
        # out Binance's weight limit for up to a minute: it must not hold the frames' threads); the
        # reconciliations of a fleet start (200 x 80 request weight, 2400 per minute) go on for minutes
        reconcile_worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "kraite_mp.jobs",
                "--queues",
                "reconcile",
                "--processes",
                "1",
                "--threads",
                "2",
            ],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        worker = dramatiq.Worker(
            broker, worker_threads=int(cfg["worker_threads"]), queues={settings.user_data_stream.queue_name}
        )
        worker.start()
        http = requests.Session()
        try:

            def stats() -> dict[str, Any]:
                return http.get(sim["control_url"] + "/stats", timeout=10).json()  # type: ignore[no-any-return]

            def frames_sent() -> int:
                return sum(stats()["frames_sent"].values())

            def audited() -> int:
                c = kdb.connect(settings.database_url)
                try:
                    with c.cursor() as cur:
                        cur.execute("SELECT count(*) FROM api_data_stream WHERE source = 'ws'")
                        return int(cur.fetchone()[0])
                finally:
                    c.close()

            t_spawn = time.monotonic()
            wait(
                lambda: sum(stats()["current_connections"].get(a.api_key, 0) for a in accounts) >= n,
                WAIT_TIMEOUT_S,
                "every child connected",
            )
            connect_s = time.monotonic() - t_spawn
            time.sleep(2.0)

            # steady load, from a process of its own (it must not compete with the worker for the GIL)
            keys = [a.api_key for a in accounts]
            load = run_stepper(sim["control_url"], keys, float(cfg["rate"]), float(cfg["duration"]))
            t0_wall, t1_wall, steps = load["t0_wall"], load["t1_wall"], load["steps"]
            duration = float(cfg["duration"])
            sent = frames_sent()
            wait(lambda: audited() >= sent, WAIT_TIMEOUT_S, "every frame processed")

            # capacity: a backlog produced while the worker is paused, then drained
            burst = int(cfg["burst"])
            capacity = None
            if burst:
                worker.pause()
                run_stepper(sim["control_url"], keys, 0.0, 0.0, steps=burst)
                burst_sent = frames_sent()
                import redis as redis_lib

                from kraite_mp.messages import broker_namespace

                rc = redis_lib.Redis.from_url(settings.redis_url)
                qkey = f"{broker_namespace(settings)}:{settings.user_data_stream.queue_name}"
                wait(
                    lambda: rc.llen(qkey) >= burst_sent - sent - 50 or audited() >= burst_sent,
                    WAIT_TIMEOUT_S,
                    "the burst enqueued",
                )
                time.sleep(1.0)
                queued_before = audited()
                tb = time.monotonic()
                worker.resume()
                wait(lambda: audited() >= burst_sent, WAIT_TIMEOUT_S, "the burst drained", interval=0.02)
                capacity = (burst_sent - queued_before) / (time.monotonic() - tb)
                rc.close()
        finally:
            worker.stop(timeout=20_000)
            reconcile_worker.terminate()
            try:
                reconcile_worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(reconcile_worker.pid, signal.SIGKILL)
                reconcile_worker.wait(10)
            broker.close()
            http.close()

        c = kdb.connect(settings.database_url)
        try:
            with c.cursor() as cur:
                cur.execute("SELECT frame_id, outcome FROM api_data_stream WHERE source = 'ws'")
                outcomes = dict(cur.fetchall())
        finally:
            c.close()
        window = [f for f, (rx, _, _) in started.items() if t0_wall <= rx <= t1_wall and f in finished]
        enq = [max(0.0, started[f][1] - started[f][0]) for f in window]  # message_timestamp is whole ms
        start = [started[f][2] - started[f][0] for f in window]
        e2e_all = [finished[f] - started[f][0] for f in window]
        e2e_orders = [finished[f] - started[f][0] for f in window if outcomes.get(f) == "dispatched"]
        done_times = [finished[f] for f in window]
        span = (max(done_times) - min(done_times)) / 1000 if done_times else 0.0
        rows = window
        return {
            "accounts": n,
            "idle_poll_ms": cfg["idle_poll_ms"],
            "doorbell": bool(cfg["doorbell"]),
            "steps": steps,
            "frames": len(rows),
            "frames_per_s": len(rows) / duration,
            "connect_s": connect_s,
            "enqueue_p50": pct(enq, 50),
            "enqueue_p99": pct(enq, 99),
            "start_p50": pct(start, 50),
            "start_p99": pct(start, 99),
            "order_p50": pct(e2e_orders, 50),
            "order_p99": pct(e2e_orders, 99),
            "order_n": len(e2e_orders),
            "audit_p50": pct(e2e_all, 50),
            "audit_p99": pct(e2e_all, 99),
            "audit_max": max(e2e_all, default=0),
            "worker_eps": len(rows) / span if span else 0.0,
            "capacity_eps": capacity,
            "total_frames_sent": sent,
        }
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        for pid in children:
            while True:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done or time.monotonic() > deadline:
                    if not done:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    break
                time.sleep(0.05)
        sim_proc.terminate()
        try:
            sim_proc.wait(20)
        except subprocess.TimeoutExpired:
            sim_proc.kill()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def stepper(cfg: dict[str, Any]) -> dict[str, Any]:
    """The load: ``step`` control calls round robin over the accounts at ``rate`` per second in total."""
    import requests

    keys, rate, duration, steps = cfg["keys"], float(cfg["rate"]), float(cfg["duration"]), cfg.get("steps")
    http = requests.Session()
    t0_wall = time.time() * 1000
    t0 = time.monotonic()
    i = 0
    while True:
        if steps is not None:
            if i >= steps:
                break
        else:
            due = t0 + i / rate
            if due - t0 >= duration:
                break
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
        http.post(cfg["control_url"] + "/step", json={"api_key": keys[i % len(keys)], "n": 1}, timeout=10)
        i += 1
    http.close()
    return {"t0_wall": t0_wall, "t1_wall": time.time() * 1000, "steps": i}


def run_stepper(
    control_url: str, keys: list[str], rate: float, duration: float, steps: int | None = None
) -> dict[str, Any]:
    cfg = {
        "stepper": True,
        "control_url": control_url,
        "keys": keys,
        "rate": rate,
        "duration": duration,
        "steps": steps,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(cfg)],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        timeout=3600,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def run_idle_case(cfg: dict[str, Any]) -> dict[str, Any]:
    """CPU of an idle worker process (and of Redis): doorbell, or the idle sleep capped at ``idle_poll_ms``.

    On a Redis server of its own (``ops.embedded.RedisServer``): its CPU is this worker's alone, whatever
    else uses the shared one."""
    import dramatiq
    import redis as redis_lib

    from kraite_mp import jobs
    from kraite_mp.config.load import load_settings
    from kraite_mp.ops.embedded import RedisServer

    server = RedisServer().start()
    try:
        settings = load_settings(
            None,
            environ={
                "KRAITE_REDIS_URL": server.url,
                "KRAITE_REDIS_NAMESPACE": cfg["namespace"],
                "KRAITE__jobs__idle_poll_ms": str(cfg["idle_poll_ms"]),
            },
        )
        broker = jobs.build_broker(settings, doorbell=bool(cfg["doorbell"]))
        worker = dramatiq.Worker(broker, worker_threads=int(cfg["worker_threads"]))
        client = redis_lib.Redis.from_url(server.url)

        def redis_cpu() -> float:
            info = client.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

        def redis_commands() -> int:
            return int(client.info("stats")["total_commands_processed"])

        worker.start()
        try:
            time.sleep(1.0)
            c0, r0, n0, t0 = time.process_time(), redis_cpu(), redis_commands(), time.monotonic()
            time.sleep(float(cfg["seconds"]))
            dt = time.monotonic() - t0
            return {
                "idle_poll_ms": cfg["idle_poll_ms"],
                "doorbell": bool(cfg["doorbell"]),
                "worker_cpu_pct": 100 * (time.process_time() - c0) / dt,
                "redis_cpu_pct": 100 * (redis_cpu() - r0) / dt,
                # minus the two INFO calls of this measurement
                "redis_commands_per_s": (redis_commands() - n0 - 2) / dt,
            }
        finally:
            worker.stop()
            broker.close()
            client.close()
    finally:
        server.cleanup()


# -- the driver ------------------------------------------------------------------------------------------


def spawn_case(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("idle"):
        log(f"idle cost: {wakeup(cfg)}")
    else:
        log(f"case: {cfg['accounts']} accounts, {wakeup(cfg)}, {cfg['rate']} steps/s")
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(cfg)],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {cfg} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    log(f"  -> {json.dumps(result)}")
    return result


def wakeup(cfg: dict[str, Any]) -> str:
    """How the case's consumer wakes up for a frame."""
    return "doorbell" if cfg["doorbell"] else f"idle poll {cfg['idle_poll_ms']} ms"


def services() -> tuple[str, str, list[Any]]:
    from kraite_mp.ops.embedded import reachable_or_embedded

    return reachable_or_embedded(
        os.environ.get("KRAITE_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        os.environ.get("KRAITE_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--accounts", default="10,100,200")
    parser.add_argument("--rate", type=float, default=100.0, help="scenario steps per second, in total")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady load per case")
    parser.add_argument("--idle-poll-ms", type=int, default=10)
    parser.add_argument(
        "--compare-idle-poll",
        default="1000,10,2",
        help="idle poll caps (ms) to compare with --idle-poll-ms on the smallest case ('' = skip)",
    )
    parser.add_argument(
        "--compare-rate",
        type=float,
        default=20.0,
        help="steps/s of the idle-poll comparison (low: the consumer is mostly idle, as in production)",
    )
    parser.add_argument(
        "--no-doorbell",
        action="store_true",
        help="the cases' consumer polls every --idle-poll-ms instead of waiting on the frame queue's doorbell",
    )
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument(
        "--burst", type=int, default=3000, help="scenario steps in the capacity burst (0 = skip)"
    )
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        runner = stepper if case.get("stepper") else run_idle_case if case.get("idle") else run_case
        print(json.dumps(runner(case)), flush=True)
        return 0

    from kraite_mp.store import db as kdb

    admin, redis_url, started = services()
    dbname = f"kraite_bench_ud_{uuid.uuid4().hex[:8]}"
    namespace = f"kraite-bench-ud-{uuid.uuid4().hex[:8]}"
    database_url = kdb.create_database(admin, dbname)
    results: list[dict[str, Any]] = []
    compare: list[dict[str, Any]] = []
    try:
        conn = kdb.connect(database_url)
        kdb.migrate(conn)
        conn.close()
        base = {
            "database_url": database_url,
            "redis_url": redis_url,
            "rate": args.rate,
            "duration": args.duration,
            "worker_threads": args.worker_threads,
            "burst": args.burst,
            "doorbell": not args.no_doorbell,
        }
        counts = [int(x) for x in args.accounts.split(",") if x.strip()]
        for i, n in enumerate(counts):
            cfg = dict(base, accounts=n, idle_poll_ms=args.idle_poll_ms, namespace=f"{namespace}-{i}")
            results.append(spawn_case(cfg))
        polls = (
            sorted(
                {int(x) for x in args.compare_idle_poll.split(",") if x.strip()} | {args.idle_poll_ms},
                reverse=True,
            )
            if args.compare_idle_poll.strip()
            else []
        )
        # polling at each cap, then the doorbell (its idle poll cap only bounds its fallback waits)
        variants = [(poll, False) for poll in polls] + ([(args.idle_poll_ms, True)] if polls else [])
        for j, (poll, doorbell) in enumerate(variants):
            cfg = dict(
                base,
                accounts=counts[0],
                idle_poll_ms=poll,
                doorbell=doorbell,
                burst=0,
                rate=args.compare_rate,
                namespace=f"{namespace}-c{j}",
            )
            compare.append(spawn_case(cfg))
            idle_cfg = {
                "idle": True,
                "redis_url": redis_url,
                "namespace": f"{namespace}-i{j}",
                "idle_poll_ms": poll,
                "doorbell": doorbell,
                "worker_threads": args.worker_threads,
                "seconds": 10,
            }
            compare[-1].update(spawn_case(idle_cfg))
    finally:
        kdb.drop_database(admin, dbname)
        try:
            import redis

            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except Exception as e:  # noqa: BLE001
            log(f"cannot clean Redis: {e}")
        for s in started:
            s.cleanup()

    def ms(v: float | None) -> str:
        return "-" if v is None or v != v else f"{v:.1f}"

    out = ["## User-data stream latency (bench/user_data_latency.py)", ""]
    out.append(
        f"Command: `python bench/user_data_latency.py --accounts {args.accounts} --rate {args.rate:g} "
        f"--duration {args.duration:g} --idle-poll-ms {args.idle_poll_ms} --compare-idle-poll "
        f"{args.compare_idle_poll} --compare-rate {args.compare_rate:g}{' --no-doorbell' if args.no_doorbell else ''}"
        f" --worker-threads {args.worker_threads} --burst {args.burst}`  "
    )
    out.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        "simulator, children, worker (1 process, "
        f"{args.worker_threads} threads), PostgreSQL and Redis all on this machine."
    )
    out.append("")
    out.append(
        f"Steady load: {args.rate:g} scenario steps/s in total spread over the accounts, "
        f"{args.duration:g} s per case; latencies in ms from the child receiving the frame. Consumer wake-up: "
        + (
            f"polling, idle sleep capped at {args.idle_poll_ms} ms."
            if args.no_doorbell
            else "the frame queue's doorbell (BLPOP after an empty fetch, at most the 1 s worker timeout)."
        )
    )
    out.append("")
    out.append(
        "| accounts | frames/s | received->handed to Redis, before its ack, p50 / p99 (1 ms resolution) | ->job started p50 / p99 |"
        " ->order row committed p50 / p99 | ->audit committed p50 / p99 / max | worker events/s |"
        " worker capacity events/s |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        out.append(
            f"| {r['accounts']} | {r['frames_per_s']:.0f} | {ms(r['enqueue_p50'])} / {ms(r['enqueue_p99'])} |"
            f" {ms(r['start_p50'])} / {ms(r['start_p99'])} | {ms(r['order_p50'])} / {ms(r['order_p99'])} |"
            f" {ms(r['audit_p50'])} / {ms(r['audit_p99'])} / {ms(r['audit_max'])} | {r['worker_eps']:.0f} |"
            f" {'-' if r['capacity_eps'] is None else format(r['capacity_eps'], '.0f')} |"
        )
    if compare:
        out += [
            "",
            f"Consumer wake-up: polling with the idle sleep capped at `jobs.idle_poll_ms`, or the doorbell;"
            f" {counts[0]} accounts at {args.compare_rate:g} steps/s:",
            "",
            "| consumer wake-up | ->job started p50 / p99 | ->order row committed p50 / p99 |"
            " idle worker process CPU | idle Redis CPU | idle Redis commands/s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in compare:
            label = (
                "doorbell"
                if r.get("doorbell")
                else f"poll, cap {r['idle_poll_ms']} ms"
                + (" (Dramatiq default worker_timeout)" if r["idle_poll_ms"] == 1000 else "")
            )
            out.append(
                f"| {label} | {ms(r['start_p50'])} / {ms(r['start_p99'])} |"
                f" {ms(r['order_p50'])} / {ms(r['order_p99'])} | {r['worker_cpu_pct']:.1f} % |"
                f" {r['redis_cpu_pct']:.1f} % | {r['redis_commands_per_s']:.0f} |"
            )
    goal = [r for r in results if r["accounts"] == max(counts)]
    if goal:
        g = goal[0]
        verdict = "met" if g["order_p50"] <= GOAL_P50_MS and g["order_p99"] <= GOAL_P99_MS else "NOT met"
        out += [
            "",
            f"Goal frame -> order row committed p50 <= {GOAL_P50_MS:g} ms, p99 <= {GOAL_P99_MS:g} ms at"
            f" {g['accounts']} accounts: {verdict} (p50 {ms(g['order_p50'])} ms, p99 {ms(g['order_p99'])} ms).",
        ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
