"""Benchmark: fleet failover on real hosts: a host killed -> every account it owned streaming elsewhere.

Usage (root: the hosts are Linux network namespaces)::

    .venv/bin/python bench/fleet_failover.py [--hosts 3] [--accounts 300] [--kills 10] [--failover-s 15]
        [--spawn-pacing deployed|fast] [--sync-interval-s S] [--weight-limit 24000]
        [--connection-limit 3000] [--quiet-s S] [--keep-logs DIR]

Services: PostgreSQL at ``KRAITE_BENCH_DATABASE_URL`` (admin URL, loopback TCP; a scratch database is
created and dropped), default ``postgresql://postgres@127.0.0.1:5432/postgres``; Redis at
``KRAITE_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/0`` (a namespace of its own, deleted at the
end). Both must listen on loopback TCP: the hosts reach them through TCP forwarders.

The fleet is the one of ``tests/test_fleet_netns.py``, built with the same harness (``tests/netns.py``):
``--hosts`` network namespaces on one bridge, each running one ``kraite-mp run`` with
``supervisor.ownership = "fleet"``, its own ``host_id``, run directory, spool and egress budget
(``binance.egress_id``; the simulator sees each host from its own loopback address, as the exchange would
see each host's IP). PostgreSQL, Redis and the simulator (``--accounts`` accounts, in this process) stay in
the root namespace and are reached through the harness's forwarders; one ``dramatiq kraite_mp.jobs``
worker (1 process x 8 threads) runs in the root namespace and does the reconciliations every connect
queues. The simulator sends no scenario events: only connections matter here.

Settings: ``fleet.failover_s = --failover-s`` (default: the product's default); ``--spawn-pacing
deployed`` keeps every supervisor setting as deployed (``supervisor.spawn_rate_per_s``,
``spawn_burst``, periodic sync every 300 s, ...: the defaults of kraite_mp.config); ``fast`` uses the netns test's settings
(``tests/test_supervisor.py`` ``FAST_ENV``: spawns unpaced at 100/s, no periodic sync), which leaves the
fleet protocol alone in the figure; ``--sync-interval-s`` overrides ``supervisor.sync_interval_s`` (a
periodic sync spends the egress's REST weight, which the listenKey request of every new stream needs
too). The exchange's limits (request weight per minute, WebSocket handshakes per 5 minutes per IP) are
raised ten times, at the simulator and in kraite-mp alike: ten kills and returns in half an hour take far
more connections per host than an isolated failure, which finds the window of its survivors nearly
empty; at the real limits the later kills would measure the connection budget instead of the failover.

Per kill (hosts in turn: h1, h2, h3, h1, ...): with the fleet settled (every account on exactly one
connection at the simulator, from the host rendezvous hashing gives it; one mark-price stream) and quiet
for ``--quiet-s`` (default: long enough for every spawn token bucket to be full again, as in a steady
state), SIGKILL of the host's supervisor and children (its process groups, then whatever else is in the
namespace). Then, sampled every 0.1 s: an account streams elsewhere once the simulator counts a
connection of it and the forwarder has an open, answered (bytes came back) user-data connection of it
from a live host, and none from the dead one any more. Reported: from the kill until every account of
the dead host streams elsewhere at once (the failover), each account's own time (p50, max), and, when the
dead host led mark-price, until a live host's mark-price stream was open and answered; and whether a
periodic sync child ran on a survivor meanwhile (process titles, checked every second). Then the host's
supervisor is started again (same run directory and spool) and the fleet must settle back on the first
distribution (the returning host gets its accounts back) before the next kill. Every wait is bounded;
every process, namespace, veth and the bridge are removed at the end (also on failure, Ctrl-C, SIGTERM).

Stdout: one markdown section (table, p50/max, the machine); progress on stderr. Exit code 1 when a kill
did not fail over within its bound or the fleet did not settle (the table shows what was measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import netns  # noqa: E402  (tests/netns.py: the hosts)

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Sampling period of the connections after a kill (the resolution of the failover times).
SAMPLE_S = 0.1
#: The exchange's limits (Binance: 2,400 weight per minute, 300 handshakes per 5 min per IP), times ten.
DEFAULT_WEIGHT_LIMIT = 24_000
DEFAULT_CONNECTION_LIMIT = 3_000
#: Symbols of the simulator (mark-price ticks carry them all).
SYMBOLS = 20
#: The fleet counts as settled once the same distribution is seen this long apart.
STABLE_S = 1.0
USER_DATA_RE = re.compile(r"^GET /private/ws\?listenKey=([^& ]+)")


def log(msg: str) -> None:
    print(f"[fleet_failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class WaitTimeout(RuntimeError):
    """A bounded wait ran out."""


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))]


def p50(values: list[float]) -> float:
    return float(statistics.median(values))


@dataclass
class Kill:
    number: int
    host: str
    owned: int
    led_mark_price: bool
    load_1m: float
    failover_s: float | None = None
    per_account: dict[int, float] = field(default_factory=dict)
    mark_price_s: float | None = None
    sim_saw_kill_s: float | None = None
    #: accounts of the other hosts that reconnected during the failover (should be none)
    others_reconnected: list[int] = field(default_factory=list)
    #: most open user-data connections from live hosts one moved account had at once during the failover
    max_streams: int = 0
    #: survivors on which a periodic sync child (``sync-orders``) ran during the failover: it spends the
    #: egress's REST weight that the new streams' listenKey requests need
    sync_on: set[str] = field(default_factory=set)
    back_s: float | None = None
    error: str = ""


@dataclass
class Fleet:
    sim: Any
    hosts: netns.Hosts
    sim_fwd: netns.Forwarder
    base_env: dict[str, str]
    workdir: Path
    ids: dict[str, int]  #: api key -> account id
    names: list[str]
    listen_keys: dict[str, str] = field(default_factory=dict)

    def host_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        return path

    def start_host(self, name: str, namespace: str) -> None:
        d = self.host_dir(name)
        env = {
            **self.base_env,
            "KRAITE__supervisor__host_id": name,
            "KRAITE__binance__egress_id": f"{namespace}-{name}",
            "KRAITE_RUN_DIR": str(d / "run"),
            "KRAITE__user_data_stream__spool_dir": str(d / "spool"),
        }
        self.hosts.run(name, [sys.executable, "-m", "kraite_mp", "run"], env, d / "supervisor.log", cwd=d)

    # -- observation (outside the product: the simulator's counts and the forwarder's connections)
    def api_key_of(self, listen_key: str) -> str | None:
        key = self.listen_keys.get(listen_key)
        if key is None:
            key = self.sim.engine.account_for_listen_key(listen_key)
            if key is not None:
                self.listen_keys[listen_key] = key
        return key

    def snapshot(
        self,
    ) -> tuple[dict[int, int], int, dict[int, list[tuple[str, bool]]], list[tuple[str, bool]]]:
        """(simulator connections per account id, the simulator's mark-price connections, per account id the
        (host, answered) of each open user-data connection through the forwarder, same for mark-price)."""
        current = self.sim.stats()["current_connections"]
        per_account = {i: int(current.get(k, 0)) for k, i in self.ids.items()}
        conns: dict[int, list[tuple[str, bool]]] = {i: [] for i in self.ids.values()}
        market: list[tuple[str, bool]] = []
        for r in self.sim_fwd.open_relays():
            host = self.hosts.host_of_ip(r.peer)
            if host is None:
                continue
            if r.first_line.startswith("GET /market"):
                market.append((host, r.down_bytes > 0))
                continue
            m = USER_DATA_RE.match(r.first_line)
            key = self.api_key_of(m.group(1)) if m else None
            if key is not None:
                conns[self.ids[key]].append((host, r.down_bytes > 0))
        return per_account, int(current.get("market", 0)), conns, market

    def distribution(self, live: set[str]) -> dict[str, list[int]] | None:
        """host -> its accounts when every account has one connection at the simulator, from one host of
        ``live``, and there is one mark-price connection, from one of them; else None."""
        per_account, market, conns, markets = self.snapshot()
        if market != 1 or len(markets) != 1 or markets[0][0] not in live:
            return None
        if any(n != 1 for n in per_account.values()):
            return None
        if any(len(c) != 1 or c[0][0] not in live for c in conns.values()):
            return None
        dist: dict[str, list[int]] = {h: [] for h in sorted(live)}
        for account, ((host, _),) in sorted(conns.items()):
            dist[host].append(account)
        return dist

    def market_host(self) -> str | None:
        markets = self.snapshot()[3]
        return markets[0][0] if len(markets) == 1 else None

    def syncing(self, names: set[str]) -> set[str]:
        """The hosts of ``names`` running a periodic sync child now (process titles)."""
        from support import title_of

        return {
            h
            for h in names
            if any(title_of(p).startswith("kraite-mp: sync-orders") for p in self.hosts.pids(h))
        }

    def opened(self) -> dict[int, int]:
        got = self.sim.stats()["ws_opened"]
        return {i: int(got.get(k, 0)) for k, i in self.ids.items()}

    def state(self) -> str:
        per_account, market, conns, markets = self.snapshot()
        odd = {
            i: (per_account[i], [h for h, _ in conns[i]])
            for i in conns
            if per_account[i] != 1 or len(conns[i]) != 1
        }
        shown = dict(list(odd.items())[:20])
        return (
            f"simulator mark-price connections {market} (forwarder: {markets}); {len(odd)} account(s) not on"
            f" exactly one connection, (simulator count, hosts) of the first 20: {shown};"
            f" processes per host {{{', '.join(f'{h}: {len(self.hosts.pids(h))}' for h in self.names)}}}"
        )

    def logs(self, lines: int = 15) -> str:
        out = []
        for log_path in sorted(self.workdir.glob("**/*.log")):
            tail = log_path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log_path.relative_to(self.workdir)} ---\n" + "\n".join(tail))
        return "\n".join(out)


def wait(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def settle(
    fleet: Fleet, live: set[str], timeout: float, what: str, want: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """The distribution on ``live`` (``want`` if given), the same twice ``STABLE_S`` apart."""

    def stable() -> dict[str, list[int]] | None:
        first = fleet.distribution(live)
        if first is None or (want is not None and first != want):
            return None
        time.sleep(STABLE_S)
        return first if fleet.distribution(live) == first else None

    try:
        got: dict[str, list[int]] = wait(stable, timeout, what)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}\n{fleet.state()}") from None
    return got


def one_kill(
    fleet: Fleet,
    kills: list[Kill],
    victim: str,
    before: dict[str, list[int]],
    args: argparse.Namespace,
    rate: float,
) -> None:
    """Kill ``victim``, measure, restart it and wait for ``before`` again; the Kill is in ``kills`` from the
    start (a timeout of the return raises ``WaitTimeout`` with what was measured kept)."""
    moved = before[victim]
    live = set(fleet.names) - {victim}
    led = fleet.market_host() == victim
    number = len(kills) + 1
    k = Kill(number, victim, len(moved), led, os.getloadavg()[0])
    kills.append(k)
    opened_before = fleet.opened()
    survivors = max(1, len(live))
    bound = args.failover_s + 90 + 2 * (len(moved) / survivors) / rate
    log(
        f"kill {number}: SIGKILL {victim} ({len(moved)} accounts{', the mark-price leader' if led else ''}); bound {bound:.0f} s"
    )
    killed = time.monotonic()
    fleet.hosts.kill(victim)  # its process groups, then whatever else is in the namespace, until empty
    first_at: dict[int, float] = {}
    all_at: float | None = None
    market_at: float | None = None
    deadline = killed + bound
    next_sync_check = killed
    while time.monotonic() < deadline and (all_at is None or (led and market_at is None)):
        if time.monotonic() >= next_sync_check:
            k.sync_on |= fleet.syncing(live)
            next_sync_check = time.monotonic() + 1.0
        per_account, _market, conns, markets = fleet.snapshot()
        now = time.monotonic()
        if k.sim_saw_kill_s is None and all(
            per_account[i] <= len(conns[i]) and all(h != victim for h, _ in conns[i]) for i in moved
        ):
            k.sim_saw_kill_s = now - killed  # no dead connection left, at the forwarder or the simulator
        ok = 0
        for i in moved:
            elsewhere = [h for h, answered in conns[i] if h in live and answered]
            k.max_streams = max(k.max_streams, len(elsewhere))
            if per_account[i] >= 1 and elsewhere and not any(h == victim for h, _ in conns[i]):
                first_at.setdefault(i, now - killed)
                ok += 1
        if all_at is None and ok == len(moved):
            all_at = now - killed
        if led and market_at is None and any(h in live and answered for h, answered in markets):
            market_at = now - killed
        time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - now)))
    k.failover_s, k.per_account, k.mark_price_s = all_at, first_at, market_at
    if all_at is None:
        k.error = f"{len(moved) - len(first_at)} of {len(moved)} accounts not streaming elsewhere within {bound:.0f} s"
    elif led and market_at is None:
        k.error = f"mark-price not moved within {bound:.0f} s"
    times = list(first_at.values())
    log(
        f"kill {number}: {victim}'s accounts streaming elsewhere after {all_at if all_at is None else round(all_at, 2)} s"
        + (f" (per account p50 {p50(times):.2f} s, max {max(times):.2f} s)" if times else "")
        + (f", mark-price after {market_at if market_at is None else round(market_at, 2)} s" if led else "")
        + (f", simulator saw the kill after {k.sim_saw_kill_s:.2f} s" if k.sim_saw_kill_s is not None else "")
        + (f"; a periodic sync ran on {sorted(k.sync_on)} meanwhile" if k.sync_on else "")
    )
    if k.error:
        log(f"kill {number}: {k.error}\n{fleet.state()}")
    try:
        settle(fleet, live, 60 + 2 * (len(moved) / survivors) / rate, f"the fleet settled on {sorted(live)}")
    except WaitTimeout as exc:
        k.error = k.error or str(exc).splitlines()[0]
        log(f"kill {number}: {exc}")
    opened_after = fleet.opened()
    stayed = [i for i in fleet.ids.values() if i not in moved]
    k.others_reconnected = [i for i in stayed if opened_after[i] != opened_before[i]]
    if k.others_reconnected:
        log(f"kill {number}: accounts of the other hosts reconnected meanwhile: {k.others_reconnected}")
    # the host comes back: rendezvous gives it the same accounts back
    returned = time.monotonic()
    fleet.start_host(victim, args.namespace)
    back_bound = 120 + 2 * len(moved) / rate + 30
    try:
        settle(
            fleet, set(fleet.names), back_bound, f"{victim} restarted, the fleet back as before", want=before
        )
    except WaitTimeout as exc:
        k.error = k.error or str(exc).splitlines()[0]
        raise
    k.back_s = time.monotonic() - returned
    log(f"kill {number}: {victim} restarted, every account back where it was after {k.back_s:.1f} s")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def report(kills: list[Kill], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    out = [
        f"### Fleet failover at {args.hosts} hosts x {args.accounts // args.hosts} accounts"
        f" (`bench/fleet_failover.py {meta['argv']}`, {meta['started']:%H:%M}-{meta['ended']:%H:%M} UTC)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}, revision {meta['revision']}.",
        "",
        f"`fleet.failover_s` = {args.failover_s:g} (leases and membership expire {args.failover_s * 2 / 3:g} s after"
        f" their last renewal, renewed every {args.failover_s / 6:g} s); spawn pacing {meta['pacing']}."
        f" Exchange limits at the simulator and in kraite-mp: {args.weight_limit:,} weight/min,"
        f" {args.connection_limit:,} handshakes per 300 s per IP (ten times Binance's). Quiet time before"
        f" each kill {meta['quiet_s']:.0f} s. First start: every account streaming after {meta['startup_s']:.0f} s.",
        "",
        "| kill | host | accounts it owned | failover: all its accounts streaming elsewhere | per account p50 / max"
        " | mark-price moved | periodic sync on a survivor meanwhile | back after restart"
        " | load avg (1 min) at the kill |",
        "|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for k in kills:
        times = list(k.per_account.values())
        per = f"{p50(times):.2f} / {max(times):.2f} s" if times else "-"
        fail = f"{k.failover_s:.2f} s" if k.failover_s is not None else f"**not within bound** ({k.error})"
        mark = (
            (f"{k.mark_price_s:.2f} s" if k.mark_price_s is not None else "**not moved**")
            if k.led_mark_price
            else "(not the leader)"
        )
        back = f"{k.back_s:.1f} s" if k.back_s is not None else "-"
        sync = ", ".join(sorted(k.sync_on)) or "no"
        out.append(
            f"| {k.number} | {k.host} | {k.owned} | {fail} | {per} | {mark} | {sync} | {back}"
            f" | {k.load_1m:.2f} |"
        )
    done = [k.failover_s for k in kills if k.failover_s is not None]
    marks = [k.mark_price_s for k in kills if k.mark_price_s is not None]
    every = [t for k in kills for t in k.per_account.values()]
    out.append("")
    if done:
        out.append(
            f"Failover over {len(done)} kill(s): **p50 {p50(done):.2f} s, max {max(done):.2f} s**"
            f" (every account of the dead host streaming elsewhere); per account over all kills"
            f" ({len(every)} moves): p50 {p50(every):.2f} s, p90 {pct(every, 90):.2f} s, max {max(every):.2f} s."
        )
    if marks:
        out.append(
            f"Mark-price moved ({len(marks)} kill(s) of the leader): p50 {p50(marks):.2f} s, max {max(marks):.2f} s."
        )
    notes = []
    failed = [k for k in kills if k.failover_s is None or k.error]
    if failed:
        notes.append(
            f"{len(failed)} kill(s) with a problem: " + "; ".join(f"{k.number}: {k.error}" for k in failed)
        )
    reconnected = {k.number: k.others_reconnected for k in kills if k.others_reconnected}
    if reconnected:
        notes.append(f"accounts of other hosts that reconnected during a failover (kill: ids): {reconnected}")
    doubled = {k.number: k.max_streams for k in kills if k.max_streams > 1}
    if doubled:
        notes.append(
            f"a moved account on more than one live host's connection at once (kill: most): {doubled}"
        )
    if len(kills) < args.kills:
        notes.append(f"only {len(kills)} of {args.kills} kill(s) ran: {meta.get('aborted', '')}")
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out)


def machine_line(database_url: str, redis_url: str) -> tuple[str, str, str]:
    from run_all import cpu_model, git_revision, postgres_version, ram_total, redis_version

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    machine = (
        f"{usable} CPUs ({cpu_model()}), {ram_total()} RAM, {platform.system()} {platform.release()},"
        f" {platform.python_implementation()} {platform.python_version()}, {postgres_version(database_url)},"
        f" {redis_version(redis_url)}"
    )
    return machine, dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), git_revision()


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main() -> int:
    from kraite_mp.config import FleetSettings, SupervisorSettings

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=300, help="accounts in all (shared by the hosts)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument(
        "--failover-s", type=float, default=FleetSettings().failover_s, help="fleet.failover_s"
    )
    parser.add_argument("--spawn-pacing", choices=("deployed", "fast"), default="deployed")
    parser.add_argument(
        "--weight-limit", type=int, default=DEFAULT_WEIGHT_LIMIT, help="request weight per minute per IP"
    )
    parser.add_argument(
        "--connection-limit", type=int, default=DEFAULT_CONNECTION_LIMIT, help="handshakes per 300 s per IP"
    )
    parser.add_argument(
        "--sync-interval-s",
        type=float,
        default=None,
        help="supervisor.sync_interval_s (0: no periodic sync; default: the pacing's, 300 or 0)",
    )
    parser.add_argument(
        "--quiet-s", type=float, default=None, help="settled fleet left alone this long before a kill"
    )
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the hosts' and the worker's logs here"
    )
    args = parser.parse_args()
    if args.hosts < 2 or args.accounts < args.hosts or args.kills < 1:
        parser.error("needs --hosts >= 2, --accounts >= --hosts, --kills >= 1")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    from test_supervisor import FAST_ENV

    sup = SupervisorSettings()
    if args.spawn_pacing == "deployed":
        pacing_env: dict[str, str] = {}
        rate, burst = sup.spawn_rate_per_s, sup.spawn_burst
        pacing = f"as deployed (`supervisor.spawn_rate_per_s` {rate:g}, `spawn_burst` {burst}; every supervisor setting as deployed)"
    else:
        pacing_env = dict(FAST_ENV)
        rate = float(FAST_ENV["KRAITE__supervisor__spawn_rate_per_s"])
        burst = int(FAST_ENV["KRAITE__supervisor__spawn_burst"])
        pacing = f"fast (the netns test's `FAST_ENV`: `spawn_rate_per_s` {rate:g}, `spawn_burst` {burst}, no periodic sync)"
    if args.sync_interval_s is not None:
        pacing_env["KRAITE__supervisor__sync_interval_s"] = f"{args.sync_interval_s:g}"
        pacing += f"; `supervisor.sync_interval_s` {args.sync_interval_s:g}"
    quiet_s = args.quiet_s if args.quiet_s is not None else burst / rate + 2.0
    admin = os.environ.get("KRAITE_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL)
    redis_url = os.environ.get("KRAITE_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    for url in (admin, redis_url):
        m = re.match(r"^[a-z+]+://(?:[^@/]*@)?(?P<host>[^:/]+):(?P<port>\d+)", url)
        if not m or m.group("host") not in ("127.0.0.1", "localhost"):
            raise SystemExit(
                f"fleet_failover: needs PostgreSQL and Redis on loopback TCP with a port, got {url!r}"
            )

    started_wall = dt.datetime.now(dt.UTC)
    from run_all import git_revision

    revision_at_start = git_revision()  # the hosts import the tree at each (re)start: say if it moved
    t_start = time.monotonic()
    tag = uuid.uuid4().hex[:8]
    args.namespace = f"kraite-bench-ff-{tag}"
    names = [f"h{i + 1}" for i in range(args.hosts)]
    kills: list[Kill] = []
    meta: dict[str, Any] = {"pacing": pacing, "quiet_s": quiet_s, "startup_s": float("nan")}
    try:
        hosts = netns.Hosts()
    except netns.Unavailable as exc:
        print(
            f"### Fleet failover (`bench/fleet_failover.py`)\n\nNot run: network namespaces unavailable ({exc})."
        )
        return 0

    import redis as redis_lib
    from support import ProcessGroup

    from kraite_mp.ops.seed import seed_symbols
    from kraite_mp.simulator import Simulator
    from kraite_mp.store import db as kdb
    from kraite_mp.store.accounts import add_account, generate_secret_key

    sim = Simulator(
        accounts=args.accounts,
        symbols=SYMBOLS,
        rate=0.0,
        seed=31,
        weight_limit_1m=args.weight_limit,
        connection_limit=args.connection_limit,
    )
    workdir = Path(tempfile.mkdtemp(prefix="kraite-bench-ff-"))
    processes = ProcessGroup()
    dbname = f"kraite_bench_ff_{tag}"
    database_url: str | None = None
    client = redis_lib.Redis.from_url(redis_url)
    rc = 1
    try:
        for name in names:
            hosts.add_host(name)
        sim.start()
        database_url = kdb.create_database(admin, dbname)
        conn = kdb.connect(database_url)
        try:
            kdb.migrate(conn)
            seed_symbols(conn, [s for s, _ in sim.mark_symbols], exchanges=("binance",), coverage=1.0)
            secret_key = generate_secret_key()
            accounts = [
                add_account(conn, secret_key, name=f"acct{i}", api_key=a.api_key, api_secret=a.api_secret)
                for i, a in enumerate(sim.accounts)
            ]
            conn.commit()
        finally:
            conn.close()
        db_url, _ = hosts.forward_url(database_url)
        rds_url, _ = hosts.forward_url(redis_url)
        sim_url, sim_fwd = hosts.forward_url(sim.rest_url, per_host_source=True)
        common = {
            **pacing_env,
            "KRAITE_SECRET_KEY": secret_key,
            "KRAITE_REDIS_NAMESPACE": args.namespace,
            "KRAITE_LOG_LEVEL": "INFO",
            "KRAITE__supervisor__ownership": "fleet",
            "KRAITE__supervisor__mark_price": "true",
            "KRAITE__fleet__failover_s": str(args.failover_s),
            "KRAITE__binance__weight_limit_per_min": str(args.weight_limit),
            "KRAITE__binance__connection_limit": str(args.connection_limit),
            "PYTHONUNBUFFERED": "1",
        }
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KRAITE")}
        clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
        fleet = Fleet(
            sim=sim,
            hosts=hosts,
            sim_fwd=sim_fwd,
            base_env={
                **clean,
                **common,
                "KRAITE_DATABASE_URL": db_url,
                "KRAITE_REDIS_URL": rds_url,
                "KRAITE_BINANCE_REST_URL": sim_url,
                "KRAITE_BINANCE_WS_URL": sim_url.replace("http://", "ws://"),
            },
            workdir=workdir,
            ids={a.api_key: a.id for a in accounts},
            names=names,
        )
        worker_env = {
            **clean,
            **common,
            "KRAITE_DATABASE_URL": database_url,
            "KRAITE_REDIS_URL": redis_url,
            "KRAITE_BINANCE_REST_URL": sim.rest_url,
            "KRAITE_BINANCE_WS_URL": sim.ws_url,
            "KRAITE_RUN_DIR": str(workdir / "worker-run"),
        }
        processes.start(
            [sys.executable, "-m", "dramatiq", "kraite_mp.jobs", "--processes", "1", "--threads", "8"],
            worker_env,
            **processes.log_to(str(workdir), "dramatiq"),
        )
        log(
            f"{args.hosts} hosts ({hosts.prefix}, {hosts.subnet}), {args.accounts} accounts, fleet.failover_s"
            f" {args.failover_s:g}, spawn pacing {args.spawn_pacing} ({rate:g}/s, burst {burst}), quiet {quiet_s:.1f} s"
        )
        for name in names:
            fleet.start_host(name, args.namespace)
        per_host = args.accounts / args.hosts
        first = settle(
            fleet, set(names), 120 + 2 * per_host / rate, "every account streaming, once, at first"
        )
        meta["startup_s"] = time.monotonic() - t_start
        log(
            f"settled after {meta['startup_s']:.0f} s: {', '.join(f'{h}: {len(a)}' for h, a in first.items())}; mark-price on {fleet.market_host()}"
        )
        try:
            for n in range(args.kills):
                victim = names[n % len(names)]
                time.sleep(quiet_s)
                settle(fleet, set(names), 60, "the fleet still settled before the kill", want=first)
                one_kill(fleet, kills, victim, first, args, rate)
            rc = 0 if all(k.failover_s is not None and not k.error for k in kills) else 1
        except WaitTimeout as exc:
            meta["aborted"] = str(exc).splitlines()[0]
            log(f"aborted: {exc}\n{fleet.logs()}")
    except KeyboardInterrupt as exc:
        meta["aborted"] = f"interrupted ({exc or 'Ctrl-C'})"
        log(meta["aborted"])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("cleaning up")
        if args.keep_logs is not None:
            for path in workdir.glob("**/*.log"):
                dest = args.keep_logs / path.relative_to(workdir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest)
        for step, fn in (
            ("namespaces", hosts.close),  # every process in every host (SIGKILL), namespaces, veths, bridge
            ("worker", processes.stop_all),
            ("simulator", sim.stop),
        ):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                log(f"cleanup of the {step}: {exc}")
        if database_url is not None:
            try:
                kdb.drop_database(admin, dbname)
            except Exception as exc:  # noqa: BLE001
                log(f"cannot drop database {dbname}: {exc}")
        try:
            found = list(client.scan_iter(match=f"{args.namespace}*", count=1000))
            if found:
                client.delete(*found)
        except Exception as exc:  # noqa: BLE001
            log(f"cannot clean Redis: {exc}")
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)
        left = hosts.leftovers()
        if left:
            log(f"LEFT BEHIND: {left}")
    meta["ended"] = dt.datetime.now(dt.UTC)
    meta["started"] = started_wall
    meta["argv"] = shlex.join(sys.argv[1:])
    meta["command"] = shlex.join([".venv/bin/python", "bench/fleet_failover.py", *sys.argv[1:]])
    meta["machine"], meta["date"], meta["revision"] = machine_line(admin, redis_url)
    if meta["revision"] != revision_at_start:
        meta["revision"] = f"{revision_at_start} at the start, {meta['revision']} at the end"
    wall = time.monotonic() - t_start
    log(f"wall time {wall:.0f} s")
    if kills:
        print(report(kills, args, meta))
        print(f"\nWall time of the run: {wall / 60:.1f} min.")
    else:
        print(
            f"### Fleet failover (`bench/fleet_failover.py`)\n\nNo kill measured: {meta.get('aborted', 'see stderr')}."
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
