"""Benchmark: a mass disconnect of N accounts behind one egress IP, against the simulator's real limits.

Usage::

    python bench/mass_reconnect.py [--accounts 100[,200]] [--weight-limit 2400]
        [--connection-limit 300] [--connection-window 300] [--open-orders 2] [--rate 0.02]
        [--observe-timeout 1200]

Services: PostgreSQL at ``KRAITE_BENCH_DATABASE_URL`` (admin URL; a scratch database per case is
created and dropped), default ``postgresql://postgres@127.0.0.1:5432/postgres``; Redis at
``KRAITE_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/0`` (a namespace of its own per case,
deleted at the end). Embedded servers when those are unreachable.

One case, per account count: the simulator (in this process, on a free loopback port) enforces the
limits of one IP (default Binance's: 2,400 request weight per rolling minute, 300 WebSocket handshake
attempts per rolling 5 minutes), and kraite-mp is configured with the same figures and its default
shares of them (``binance.weight_share`` 0.5, ``binance.connection_share`` 0.5). ``kraite-mp run``
(every other setting as deployed, except that every execution type updates orders, so that the orders
table can be compared with the simulator's truth) and two Dramatiq pools as deployed (frames: 2
processes x 8 threads; reconcile: 1 x 4) run as real processes against the case's database and Redis
namespace. Phases:

1. wait until every account streams, and until the reconciliations of those first connects are done
   (an empty ``reconcile`` queue), so that the drop hits a fleet in steady state;
2. give each account ``--open-orders`` open LIMIT orders (a healthy history: the symbols are active)
   and start the scenario (``--rate`` steps per second per account, frames on every stream);
3. ``drop_connections()``: every connection closed at once (user data and mark price);
4. sample the simulator 20 times a second until every account streams again: an account's dark time
   is from the drop to the handshake of its new connection, as the simulator saw it;
5. wait (at most ``--observe-timeout`` s) until the reconciliations the reconnects queued are done,
   stop the scenario, wait until every frame is audited, and compare every account's orders with the
   simulator's truth.

Reported: dark time p50/max; handshake attempts after the drop, the simulator's peak of attempts in
any rolling window (whole run) against kraite-mp's share and the limit, refused handshakes; the REST
weight the simulator accepted in any rolling minute (after the drop, and over the whole run) against
the IP limit and kraite-mp's share, weight and reconcile requests per account after the drop, 429 and
418 answers; frames sent by the simulator against rows in ``api_data_stream`` (source ``ws``), events
the simulator lost while an account was dark (only REST can bring them), accounts whose orders differ
from the truth. Every process started is stopped at the end (its process group), also on failure.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kraite_mp.simulator.engine import RESTING_ORDERS  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Sampling period of the simulator's connection counts after the drop (the dark-time resolution).
SAMPLE_S = 0.05
#: After SIGTERM, how long a process group gets before SIGKILL (kraite-mp's graceful timeout is 10 s).
STOP_GRACE_S = 30.0
#: Length of the weight window of Binance and of the simulator.
WEIGHT_WINDOW_S = 60.0
#: kraite-mp's default shares of the IP's limits (binance.weight_share, binance.connection_share).
WEIGHT_SHARE = 0.5
CONNECTION_SHARE = 0.5
#: Supervisor spawn pacing as deployed (supervisor.spawn_rate_per_s), to bound the first wait.
SPAWN_RATE_PER_S = 0.9
#: Request weight of the full sweep every first connect queues when the account has no history (90).
FIRST_SWEEP_WEIGHT = 90
#: The reconcile endpoints (what a reconnect's sweep asks), by path.
#: The calls only the history reads make (a full sweep's, a gap sweep's on evidence, the deferred ones).
HISTORY_PATHS = ("/fapi/v1/allOrders", "/fapi/v1/allAlgoOrders")
#: One of these per sweep of an account, at its start: the gap sweep's account call, the full sweep's balances.
SWEEP_START_PATHS = ("/fapi/v3/account", "/fapi/v3/balance")
RECONCILE_PATHS = (
    "/fapi/v3/account",
    "/fapi/v3/positionRisk",
    "/fapi/v3/balance",
    "/fapi/v1/openOrders",
    "/fapi/v1/openAlgoOrders",
    "/fapi/v1/allOrders",
    "/fapi/v1/allAlgoOrders",
    "/fapi/v1/order",
    "/fapi/v1/algoOrder",
)


def log(msg: str) -> None:
    print(f"[mass_reconnect] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


class WaitTimeout(RuntimeError):
    """A bounded wait ran out."""


def wait(pred: Any, timeout: float, what: str, interval: float = 0.5) -> float:
    """Poll ``pred`` until truthy; the seconds it took. Raises ``WaitTimeout`` after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic() - start
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")


def rolling_peak(events: list[tuple[float, int]], window_s: float) -> tuple[int, int, int]:
    """The largest sum of ``weight`` over (at, weight) events inside any window of ``window_s``, and the
    indexes of the first and last event of that window in ``sorted(events)``."""
    events = sorted(events)
    best = total = 0
    start = 0
    where = (0, -1)
    for i, (at, weight) in enumerate(events):
        total += weight
        while events[start][0] <= at - window_s:
            total -= events[start][1]
            start += 1
        if total > best:
            best, where = total, (start, i)
    return best, where[0], where[1]


# -- processes ---------------------------------------------------------------------------------------


class Processes:
    """The case's subprocesses, each in a session (process group) of its own; ``stop_all`` ends them all."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[Any] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(os.path.join(self.work, f"{name}.log"), "ab")  # noqa: SIM115 - closed in stop_all
        self._logs.append(out)
        proc = subprocess.Popen(
            args, env=env, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} (see {self.work}/{name}.log)")

    def stop_all(self) -> None:
        # the main process only (kraite-mp's parent forwards TERM to its children, Dramatiq's to its
        # workers), then whatever is left of each group
        for _, proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name, proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                log(f"{name}: SIGKILL to what was left of its process group")
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def tail(self, lines: int = 30) -> str:
        out = []
        for name, _ in self.procs:
            path = os.path.join(self.work, f"{name}.log")
            try:
                with open(path, errors="replace") as f:
                    out.append(f"--- {name} ---\n" + "".join(f.readlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(out)


# -- one case ----------------------------------------------------------------------------------------


def run_case(n: int, args: argparse.Namespace, admin: str, redis_url: str) -> dict[str, Any]:
    import redis as redis_lib
    from fixtures.userdata_helpers import ALL_DISPATCH_KEYS, truth_mismatches

    from kraite_mp.simulator import Simulator
    from kraite_mp.store import db as kdb
    from kraite_mp.store.accounts import add_account, generate_secret_key

    tag = uuid.uuid4().hex[:8]
    dbname = f"kraite_bench_mr_{tag}"
    namespace = f"kraite-bench-mr-{tag}"
    work = tempfile.mkdtemp(prefix="kraite-bench-mr-")
    weight_limit, conn_limit, conn_window = args.weight_limit, args.connection_limit, args.connection_window
    weight_share = math.floor(weight_limit * WEIGHT_SHARE)
    conn_share = math.floor(conn_limit * CONNECTION_SHARE)
    sim = Simulator(
        accounts=n,
        symbols=50,
        rate=0.0,
        seed=12,
        weight_limit_1m=weight_limit,
        connection_limit=conn_limit,
        connection_window_s=conn_window,
    )
    procs = Processes(work)
    database_url = kdb.create_database(admin, dbname)
    rc = redis_lib.Redis.from_url(redis_url)
    sim.start()
    try:
        conn = kdb.connect(database_url)
        kdb.migrate(conn)
        secret_key = generate_secret_key()
        accounts = [
            add_account(conn, secret_key, name=f"bench{i}", api_key=a.api_key, api_secret=a.api_secret)
            for i, a in enumerate(sim.accounts)
        ]
        conn.commit()
        keys = [a.api_key for a in accounts]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRAITE")}
        env.update(
            KRAITE_DATABASE_URL=database_url,
            KRAITE_REDIS_URL=redis_url,
            KRAITE_REDIS_NAMESPACE=namespace,
            KRAITE_SECRET_KEY=secret_key,
            KRAITE_RUN_DIR=os.path.join(work, "run"),
            KRAITE_BINANCE_REST_URL=sim.rest_url,
            KRAITE_BINANCE_WS_URL=sim.ws_url,
            KRAITE_LOG_LEVEL="INFO",
            KRAITE__user_data_stream__spool_dir=os.path.join(work, "spool"),
            KRAITE__user_data_stream__binance__dispatched_executions=ALL_DISPATCH_KEYS,
            KRAITE__binance__weight_limit_per_min=str(weight_limit),
            KRAITE__binance__connection_limit=str(conn_limit),
            KRAITE__binance__connection_window_s=str(conn_window),
            KRAITE__binance__egress_id=f"bench-{tag}",
            KRAITE__supervisor__gap_sweep_max_s=str(args.gap_sweep_max_s),
            KRAITE__supervisor__gap_sweep_history=args.gap_sweep_history,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT),
        )
        py = sys.executable
        procs.start("kraite-mp-run", [py, "-m", "kraite_mp", "run"], env)
        procs.start(
            "dramatiq-frames",
            [py, "-m", "dramatiq", "kraite_mp.jobs", "--queues", "user-data-stream"]
            + ["--processes", "2", "--threads", "8"],
            env,
        )
        procs.start(
            "dramatiq-reconcile",
            [
                py,
                "-m",
                "dramatiq",
                "kraite_mp.jobs",
                "--queues",
                "reconcile",
                "--processes",
                "1",
                "--threads",
                "4",
            ],
            env,
        )
        reconcile_keys = [f"{namespace}:dramatiq:reconcile.msgs", f"{namespace}:dramatiq:reconcile.DQ.msgs"]

        def reconcile_pending() -> int:
            return sum(int(cast(int, rc.hlen(k))) for k in reconcile_keys)

        def reconciled() -> bool:
            procs.check_alive()
            return reconcile_pending() == 0

        def streaming(stats: dict[str, Any], opened_before: dict[str, int]) -> list[str]:
            """Accounts with an open connection newer than ``opened_before`` counted."""
            opened, current = stats["ws_opened"], stats["current_connections"]
            return [k for k in keys if opened.get(k, 0) > opened_before.get(k, 0) and current.get(k, 0) >= 1]

        def audited() -> int:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM api_data_stream WHERE source = 'ws'")
                (count,) = cur.fetchone()
            conn.commit()
            return int(count)

        def frames_sent(stats: dict[str, Any]) -> int:
            return sum(int(stats["frames_sent"].get(k, 0)) for k in keys)

        windows_needed = math.ceil(n / max(1, conn_share - 1))
        t_start = time.monotonic()
        first_timeout = 120 + n / SPAWN_RATE_PER_S + windows_needed * conn_window
        log(f"{n} accounts: waiting for every account to stream (at most {first_timeout:.0f}s)")

        def all_streaming_first() -> bool:
            procs.check_alive()
            return len(streaming(sim.stats(), {})) == n

        wait(all_streaming_first, first_timeout, "every account streaming")
        first_connect_s = time.monotonic() - t_start
        log(f"  all {n} streaming after {first_connect_s:.0f}s; waiting for the first reconciliations")
        drain_timeout = 180 + 1.5 * n * FIRST_SWEEP_WEIGHT / weight_share * WEIGHT_WINDOW_S
        time.sleep(2.0)  # the reconcile requests go through each child's spool first
        wait(reconciled, drain_timeout, "the first reconciliations", interval=1.0)
        first_drain_s = time.monotonic() - t_start
        log(f"  first reconciliations done {first_drain_s:.0f}s after the start")

        # a healthy history: open orders on active symbols, and the scenario running on every account
        for key in keys:
            for symbol, qty, price in RESTING_ORDERS[: args.open_orders]:
                sim.place_order(key, symbol=symbol, side="BUY", type="LIMIT", quantity=qty, price=price)
        sim.set_rate(args.rate)
        wait(lambda: audited() >= frames_sent(sim.stats()), 120, "the seed orders audited", interval=0.5)
        time.sleep(5.0)

        before = sim.stats()
        opened_before = {k: int(before["ws_opened"].get(k, 0)) for k in keys}
        lost_before = sum(int(before["events_lost"].get(k, 0)) for k in keys)
        t_drop_wall = time.time()
        t_drop = time.monotonic()
        dropped = sim.drop_connections()
        log(f"  dropped {dropped} connections")
        back_at: dict[str, float] = {}
        samples: list[tuple[float, int]] = []  # (seconds after the drop, handshake attempts so far)
        back_timeout = 120 + (windows_needed + 1) * conn_window
        deadline = t_drop + back_timeout
        while len(back_at) < n:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(
                    f"only {len(back_at)} of {n} accounts streaming {back_timeout:.0f}s after the drop"
                )
            stats = sim.stats()
            at = time.monotonic() - t_drop
            samples.append((at, int(stats["ws_handshakes"]["attempts"])))
            for k in streaming(stats, opened_before):
                back_at.setdefault(k, at)
            time.sleep(SAMPLE_S)
        all_back_s = max(back_at.values())
        after_back = sim.stats()
        attempts_to_all_back = int(after_back["ws_handshakes"]["attempts"]) - int(
            before["ws_handshakes"]["attempts"]
        )
        log(
            f"  every account streams again {all_back_s:.1f}s after the drop; waiting for the reconciliations"
        )
        time.sleep(2.0)
        drained = True
        try:
            wait(
                reconciled,
                args.observe_timeout,
                "the reconciliations after the drop",
                interval=0.5,
            )
        except WaitTimeout as e:
            log(f"  {e}")
            drained = False
        reconcile_done_s = time.monotonic() - t_drop
        sim.set_rate(0.0)
        wait(lambda: audited() >= frames_sent(sim.stats()), 180, "every frame audited", interval=0.5)
        time.sleep(3.0)  # a frame audited twice would show now
        final = sim.stats()
        sent, rows = frames_sent(final), audited()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(DISTINCT (account_id, payload::text)) FROM api_data_stream WHERE source = 'ws'"
            )
            (distinct_rows,) = cur.fetchone()
        conn.commit()
        differing = None
        if drained:
            mismatches = {a.id: truth_mismatches(conn, a.id, sim.truth(a.api_key)) for a in accounts}
            differing = sum(1 for problems in mismatches.values() if problems)
            for account_id, problems in [(i, p) for i, p in mismatches.items() if p][:3]:
                log(f"  account {account_id} differs from the truth: {problems[:3]}")
        log_after = sim.rest.request_log(t_drop_wall)
        accepted_after = [(r.at, r.weight) for r in log_after if r.status not in (429, 418)]
        peak_after, first, last = rolling_peak(accepted_after, WEIGHT_WINDOW_S)
        if peak_after > weight_share:
            window = sorted((r for r in log_after if r.status not in (429, 418)), key=lambda r: r.at)[
                first : last + 1
            ]
            log(
                f"  the busiest minute after the drop: {peak_after} weight in {len(window)} requests from"
                f" +{window[0].at - t_drop_wall:.3f}s to +{window[-1].at - t_drop_wall:.3f}s after the drop;"
                f" by path {dict(collections.Counter(r.path for r in window))};"
                f" the first 3 {[(round(r.at - t_drop_wall, 3), r.path, r.weight) for r in window[:3]]},"
                f" the last 3 {[(round(r.at - t_drop_wall, 3), r.path, r.weight) for r in window[-3:]]}"
            )
        by_path = collections.Counter(r.path for r in log_after)
        limits = final["rest_limits"]
        hs = final["ws_handshakes"]
        buckets: dict[int, int] = collections.defaultdict(int)
        for at, weight in accepted_after:
            buckets[int((at - t_drop_wall) // WEIGHT_WINDOW_S)] += weight
        in_window = [a for t, a in samples if t <= conn_window]
        conn.close()
        dark = list(back_at.values())
        result = {
            "accounts": n,
            "weight_limit": weight_limit,
            "weight_share": weight_share,
            "conn_limit": conn_limit,
            "conn_window": conn_window,
            "conn_share": conn_share,
            "first_connect_s": first_connect_s,
            "first_drain_s": first_drain_s,
            "dropped": dropped,
            "dark_p50": pct(dark, 50),
            "dark_max": max(dark),
            "all_back_s": all_back_s,
            "attempts_to_all_back": attempts_to_all_back,
            "attempts_first_window": (in_window[-1] - int(before["ws_handshakes"]["attempts"]))
            if in_window
            else 0,
            "peak_attempts": int(hs["peak_attempts"]),
            "refused_limit": int(hs["refused_limit"]),
            "refused": int(hs["refused"]),
            "peak_weight_after": peak_after,
            "peak_weight_run": int(limits["peak_weight_1m"]),
            "weight_after": sum(w for _, w in accepted_after),
            "weight_per_minute_after": [buckets[i] for i in range(max(buckets) + 1)] if buckets else [],
            "reconcile_requests_after": sum(by_path[p] for p in RECONCILE_PATHS),
            "history_weight_after": sum(r.weight for r in log_after if r.path in HISTORY_PATHS),
            "last_sweep_start_s": max(
                (r.at - t_drop_wall for r in log_after if r.path in SWEEP_START_PATHS), default=0.0
            ),
            "listen_key_posts_after": sum(
                1 for r in log_after if r.path == "/fapi/v1/listenKey" and r.method == "POST"
            ),
            "sent_429": int(limits["sent_429"]),
            "sent_418": int(limits["sent_418"]),
            "drained": drained,
            "reconcile_done_s": reconcile_done_s,
            "frames_sent": sent,
            "frames_audited": rows,
            "frames_distinct": int(distinct_rows),
            "events_lost_gap": sum(int(final["events_lost"].get(k, 0)) for k in keys) - lost_before,
            "differing": differing,
            "open_orders": args.open_orders,
            "rate": args.rate,
        }
        log(f"  -> {result}")
        return result
    except BaseException:
        log("case failed; the end of the process logs:\n" + procs.tail())
        raise
    finally:
        procs.stop_all()
        sim.stop()
        try:
            kdb.drop_database(admin, dbname)
        except Exception as e:  # noqa: BLE001
            log(f"cannot drop database {dbname}: {e}")
        try:
            found = list(rc.scan_iter(match=f"{namespace}*", count=1000))
            if found:
                rc.delete(*found)
        except Exception as e:  # noqa: BLE001
            log(f"cannot clean Redis: {e}")
        rc.close()
        shutil.rmtree(work, ignore_errors=True)


# -- the driver ----------------------------------------------------------------------------------------


def services() -> tuple[str, str, list[Any]]:
    from kraite_mp.ops.embedded import reachable_or_embedded

    return reachable_or_embedded(
        os.environ.get("KRAITE_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        os.environ.get("KRAITE_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
    )


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    r0 = results[0]
    out = ["## Mass reconnect (`bench/mass_reconnect.py`)", ""]
    out.append(
        f"Command: `python bench/mass_reconnect.py --accounts {args.accounts} --weight-limit {args.weight_limit}"
        f" --connection-limit {args.connection_limit} --connection-window {args.connection_window:g}"
        f" --open-orders {args.open_orders} --rate {args.rate:g} --observe-timeout {args.observe_timeout:g}"
        f" --gap-sweep-max-s {args.gap_sweep_max_s:g} --gap-sweep-history {args.gap_sweep_history}`  "
    )
    out.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; the simulator,"
        " `kraite-mp run`, two Dramatiq pools (frames 2 x 8 threads, reconcile 1 x 4), PostgreSQL and Redis"
        " all on this machine, all traffic from one IP (127.0.0.1)."
    )
    out.append("")
    out.append(
        f"Limits of the IP, enforced by the simulator and configured in kraite-mp: {r0['weight_limit']:,} request"
        f" weight per rolling minute (kraite-mp's share {r0['weight_share']:,}), {r0['conn_limit']} handshake"
        f" attempts per rolling {r0['conn_window']:g} s (kraite-mp's share {r0['conn_share']}). Before the drop"
        f" every account streams, the reconciliations of the first connects are done, each account has"
        f" {r0['open_orders']} open orders, and the scenario runs at {r0['rate']:g} steps/s per account."
        " Dark time: from `drop_connections()` to the handshake of the account's new connection (simulator's"
        f" view, sampled every {SAMPLE_S * 1000:.0f} ms)."
    )
    out.append("")
    out.append(
        "| accounts | first connect, all streaming | connections dropped | dark p50 / max | handshake attempts"
        " drop -> all back | peak attempts in any window (whole run) / share / limit | handshakes refused |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        out.append(
            f"| {r['accounts']} | {r['first_connect_s']:.0f} s | {r['dropped']} | {r['dark_p50']:.1f} s /"
            f" {r['dark_max']:.1f} s | {r['attempts_to_all_back']} | {r['peak_attempts']} / {r['conn_share']} /"
            f" {r['conn_limit']} | {r['refused']} |"
        )
    out.append("")
    out.append(
        "| accounts | peak weight in any minute after the drop / share / limit | peak weight in any minute"
        " (whole run) | weight per minute after the drop | weight after the drop per account | reconcile"
        " requests per account | of the weight per account: history reads | last account's sweep started"
        " | reconciliations done after the drop | 429 | 418 |"
    )
    out.append("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        done = f"{r['reconcile_done_s']:.0f} s" if r["drained"] else f"not within {args.observe_timeout:g} s"
        minutes = ", ".join(f"{w:,}" for w in r["weight_per_minute_after"])
        out.append(
            f"| {r['accounts']} | {r['peak_weight_after']:,} / {r['weight_share']:,} / {r['weight_limit']:,} |"
            f" {r['peak_weight_run']:,} | {minutes} | {r['weight_after'] / r['accounts']:.1f} |"
            f" {r['reconcile_requests_after'] / r['accounts']:.1f} | {r['history_weight_after'] / r['accounts']:.1f} |"
            f" {r['last_sweep_start_s']:.0f} s | {done} | {r['sent_429']} | {r['sent_418']} |"
        )
    out.append("")
    out.append(
        "| accounts | frames sent (simulator) | rows in api_data_stream (ws) | distinct | frames lost | events lost"
        " while dark (REST's job) | accounts whose orders differ from the truth |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        differing = "not checked" if r["differing"] is None else str(r["differing"])
        out.append(
            f"| {r['accounts']} | {r['frames_sent']:,} | {r['frames_audited']:,} | {r['frames_distinct']:,} |"
            f" {r['frames_sent'] - r['frames_audited']} | {r['events_lost_gap']:,} | {differing} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--accounts", default="100", help="comma-separated account counts, one case each")
    parser.add_argument("--weight-limit", type=int, default=2400, help="request weight per minute of the IP")
    parser.add_argument("--connection-limit", type=int, default=300, help="handshake attempts per window")
    parser.add_argument("--connection-window", type=float, default=300.0, help="seconds")
    parser.add_argument(
        "--open-orders", type=int, default=len(RESTING_ORDERS), choices=range(len(RESTING_ORDERS) + 1)
    )
    parser.add_argument("--rate", type=float, default=0.02, help="scenario steps per second per account")
    parser.add_argument(
        "--gap-sweep-max-s",
        type=float,
        default=3600.0,
        help="supervisor.gap_sweep_max_s: a reconnect after a known gap this long at most sweeps only the gap"
        " (the default as deployed; 0: full sweeps)",
    )
    parser.add_argument(
        "--gap-sweep-history",
        choices=("deferred", "evidence"),
        default="deferred",
        help="supervisor.gap_sweep_history: whose order history the gap sweep reads (the default as deployed)",
    )
    parser.add_argument(
        "--observe-timeout",
        type=float,
        default=1200.0,
        help="longest wait for the reconciliations after the drop",
    )
    args = parser.parse_args()
    admin, redis_url, started = services()
    results = []
    try:
        for n in [int(x) for x in args.accounts.split(",") if x.strip()]:
            results.append(run_case(n, args, admin, redis_url))
    finally:
        for s in started:
            s.cleanup()
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
