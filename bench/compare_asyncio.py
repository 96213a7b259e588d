"""Side by side: ``kraite-mp run`` (one process per account) vs a minimal asyncio process holding N streams.

One run, one simulator (``kraite_mp.simulator``, in a process of its own), the same accounts, the same
load, one design after the other for each N (default 200 and 1,000):

- **kraite-mp**: the real ``kraite-mp run`` (a fresh database with the N accounts; mark-price child off
  (``supervisor.mark_price = false``: the asyncio side has no mark prices), periodic sync off, spawn
  pacing and the connection/weight budgets raised so that the start takes seconds; everything else
  default: a spool per account (``spool_fsync = false``), its sender thread, the metrics child).
- **asyncio**: one Python process, N ``aiohttp`` WebSocket connections (listenKey by ``POST
  /fapi/v1/listenKey``, the URL ``kraite_mp.streams.userdata.stream_url`` builds, a reconnect loop
  per account, a listenKey keepalive task), and for every frame: the same spool record and Dramatiq
  message as kraite-mp (``kraite_mp.messages.frame_record`` / ``record_message``), appended to a
  per-account spool file (write + flush, no fsync: kraite-mp's default) and then enqueued with the
  same Redis operation Dramatiq's ``RedisBroker.enqueue`` runs (its own ``dispatch.lua`` "enqueue",
  through ``redis.asyncio``, awaited: the loop never blocks on Redis). The code is
  ``asyncio_side`` below: what a user would write, plus the three fault hooks.

Load: ``--rate`` scenario steps per second in total, round robin over the N accounts (one ``step``
control call at a time, from a process of its own; a step emits 1-4 frames), for ``--duration`` s.

Measured per design and N:

- memory: ``/proc/PID/smaps_rollup`` of every process of the design after the load window (USS =
  Private_Clean + Private_Dirty, PSS), in total and per account;
- CPU: ``/proc/PID/task/*/schedstat`` of every process over the load window (and the drain after
  it), per 1,000 frames;
- frame -> in Redis: a consumer of its own (the same for both designs) pops the Dramatiq queue
  (``BLPOP`` + ``LPOP``), stamps the time right after Redis handed the message over and compares it
  with the frame's ``received_at`` (stamped by the receiver when it got the frame; kraite-mp's own
  ``message_timestamp`` is taken before the enqueue's round trip, so it cannot serve). The consumer
  also acknowledges kraite-mp's frames like a worker (``messages.acknowledge``), so its spools trim
  as in production. Also reported: the simulator's event time ``E`` -> in Redis.
- faults (``--faults``, on by default), injected into one account each while the load goes on:
  **raise** (the frame handler raises), **leak** (the handler keeps ``--leak-mb`` per frame; that
  account gets ``--leak-rate`` extra steps/s during the window), **block** (the handler sleeps
  ``--block-s`` s, 0 = forever). A trigger frame (``send_raw`` of the simulator) switches the fault
  on. kraite-mp's product code is not changed: a ``sitecustomize.py`` on the ``PYTHONPATH`` of
  ``kraite-mp run`` wraps ``UserDataStream.on_frame`` for the three target accounts (the children are
  forked, so they inherit it). Per fault: the other accounts' frames/s in Redis before and during
  the window, their worst event -> Redis delay, what became of the faulty account (restarted? by
  whom? frames again after how long? events lost, reconciliation requested), and memory growth.

Usage::

    .venv/bin/python bench/compare_asyncio.py [--accounts 200,1000] [--rate 100] [--duration 60]
        [--faults | --no-faults] [--database-url URL] [--redis-url URL]

Services: the admin ``--database-url`` (a scratch database is created and dropped; default
``KRAITE_TEST_DATABASE_URL``, else postgresql://postgres@127.0.0.1:5432/postgres) and ``--redis-url``
(``KRAITE_TEST_REDIS_URL``, else redis://127.0.0.1:6379/0; keys under a private ``cmpbench-<tag>``
prefix, deleted at the end). kraite-mp needs ~12 MB per account: before each N the run waits
(``--memory-wait-s``, polling every 30 s) for ``MemAvailable`` >= 3 GB + 12 MB x N, else falls back to
500 accounts (and says so), and it aborts a design whose wait sees less than 1 GB available.

Prints a markdown section on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # tests/support.py, imported as the tests import it
# run_all.py and user_data_latency.py, when this file is imported rather than run
sys.path.insert(2, str(ROOT / "bench"))

from run_all import git_revision  # noqa: E402
from support import children_of  # noqa: E402
from user_data_latency import pct  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The simulator prints its JSON line within this long.
SIM_START_TIMEOUT_S = 60.0
#: Every account connected within BASE + PER_ACCOUNT * N seconds, or the design fails.
CONNECT_TIMEOUT_BASE_S = 60.0
CONNECT_TIMEOUT_PER_ACCOUNT_S = 0.5
#: After the load, every frame the simulator sent must be in Redis within this long.
DRAIN_TIMEOUT_S = 60.0
#: Bounded waits for processes to stop (then SIGKILL to their process group).
STOP_TIMEOUT_S = 60.0
#: A design's connections must be gone from the simulator within this long after it stopped.
DISCONNECT_TIMEOUT_S = 60.0
#: The faulty account must stream again within this long after the fault window (raise, block).
RECOVERY_TIMEOUT_S = 150.0
#: kraite-mp's per-child footprint for the memory gate (docs/BENCHMARKS.md: ~11.5 MB PSS per child).
MB_PER_CHILD = 12.0
MEMORY_BASE_MB = 3 * 1024.0
#: Abort a design (and stop it) when MemAvailable falls under this: the machine is shared.
MEMORY_FLOOR_MB = 1024.0
MEMORY_POLL_S = 30.0
#: The N used when the memory for a larger one never becomes available.
FALLBACK_ACCOUNTS = 500
KB_PER_MB = 1024.0
FAULT_TAG = "CMPBENCH_FAULT"
FAULT_KINDS = ("raise", "leak", "block")
QUEUE = "user-data-stream"  # user_data_stream.queue_name (default)


def log(msg: str) -> None:
    print(f"[compare_asyncio {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_ms() -> float:
    return time.time() * 1000.0


# -- /proc -------------------------------------------------------------------------------------------------


def smaps(pid: int) -> tuple[int, int]:
    """(USS kB, PSS kB) of ``pid``; (0, 0) if it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    values[parts[0][:-1]] = int(parts[1])
    except OSError:
        return 0, 0
    return values.get("Private_Clean", 0) + values.get("Private_Dirty", 0), values.get("Pss", 0)


def sched_ns(pid: int) -> int:
    """CPU nanoseconds of every thread of ``pid`` (``schedstat``); 0 if it is gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / KB_PER_MB
    return float("inf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the asyncio design (its own process: `--asyncio-side CONFIG`) -----------------------------------------


class Faults:
    """The bench's fault hooks, the same in both designs: a trigger frame switches one on for its account."""

    def __init__(self, accounts: list[int], leak_bytes: int, block_s: float) -> None:
        self.accounts = set(accounts)
        self.leak_bytes = leak_bytes
        self.block_s = block_s if block_s > 0 else 365 * 86400.0
        self.leaking: set[int] = set()
        self.kept: list[bytes] = []

    def hit(self, account_id: int, text: str | bytes) -> bool:
        """Called first for every frame; True: the frame was the trigger (not forwarded)."""
        if account_id not in self.accounts:
            return False
        raw = text.encode() if isinstance(text, str) else text
        if FAULT_TAG.encode() in raw:
            if b'"kind":"raise"' in raw:
                raise RuntimeError(f"injected fault: the frame handler of account {account_id} raised")
            if b'"kind":"leak"' in raw:
                self.leaking.add(account_id)
            elif b'"kind":"leak-stop"' in raw:  # the bench ends the leak window (what leaked stays)
                self.leaking.discard(account_id)
            elif b'"kind":"block"' in raw:
                time.sleep(self.block_s)  # a blocking call in the handler (a sync client, a lock, ...)
            return True
        if account_id in self.leaking:
            self.kept.append(b"\x01" * self.leak_bytes)  # written, so resident
        return False


def asyncio_side(cfg_path: str) -> int:
    """N user-data streams in one asyncio process: frame -> spool file -> Redis (a Dramatiq message)."""
    import asyncio
    import random

    import aiohttp
    import redis.asyncio as aioredis
    from dramatiq.brokers import redis as dramatiq_redis

    from kraite_mp.messages import FrameIds, frame_record, record_message

    cfg = json.loads(Path(cfg_path).read_text())
    rest, ws_base, events, ping_s = cfg["rest_url"], cfg["ws_url"], cfg["events"], cfg["ping_interval_s"]
    spool_dir = Path(cfg["spool_dir"])
    spool_dir.mkdir(parents=True, exist_ok=True)
    namespace = f"{cfg['redis_namespace']}:dramatiq"  # messages.broker_namespace
    scripts = Path(dramatiq_redis.__file__).parent / "redis"
    faults = Faults(cfg["fault_accounts"], cfg["leak_bytes"], cfg["block_s"])

    async def main() -> None:
        r = aioredis.Redis.from_url(cfg["redis_url"], socket_timeout=5, socket_connect_timeout=2)
        dispatch = r.register_script((scripts / "dispatch.lua").read_text())
        max_unpack = int(await r.register_script((scripts / "maxstack.lua").read_text())()) // 2
        broker_id = str(uuid.uuid4())

        async def enqueue(record: bytes) -> None:
            """What RedisBroker.enqueue does (a unique redis_message_id, dispatch.lua "enqueue"), awaited."""
            rid = str(uuid.uuid4())
            message = record_message(record).copy(options={"redis_message_id": rid})
            maintenance = int(
                random.randint(1, dramatiq_redis.MAINTENANCE_SCALE)
                <= dramatiq_redis.DEFAULT_MAINTENANCE_CHANCE
            )
            args = [
                "enqueue",
                int(time.time() * 1000),
                QUEUE,
                broker_id,
                dramatiq_redis.DEFAULT_HEARTBEAT_TIMEOUT,
                dramatiq_redis.DEFAULT_DEAD_MESSAGE_TTL,
                maintenance,
                max_unpack,
                rid,
                message.encode(),
            ]
            await dispatch(keys=[namespace], args=args)

        async def on_frame(account_id: int, text: str, ids: FrameIds, spool: Any) -> None:
            received_us = time.time_ns() // 1000
            if faults.hit(account_id, text):
                return
            record = frame_record(
                QUEUE, account_id, text, ids.for_frame(text, received_us), received_us / 1000
            )
            spool.write(record + b"\n")
            spool.flush()  # to the page cache, no fsync (kraite-mp's default: user_data_stream.spool_fsync)
            await enqueue(record)

        async def keepalive(http: aiohttp.ClientSession, api_key: str) -> None:
            while True:
                await asyncio.sleep(cfg["keepalive_s"])
                async with http.put(f"{rest}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": api_key}):
                    pass

        async def stream(http: aiohttp.ClientSession, account_id: int, api_key: str) -> None:
            ids = FrameIds(account_id)
            spool = open(spool_dir / f"{account_id}.spool", "ab")  # noqa: SIM115 - open for the process's life
            while True:
                try:
                    async with http.post(
                        f"{rest}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": api_key}
                    ) as rsp:
                        listen_key = (await rsp.json())["listenKey"]
                    url = f"{ws_base}/private/ws?listenKey={listen_key}&events={events}"
                    async with http.ws_connect(url, heartbeat=ping_s) as ws:
                        ka = asyncio.create_task(keepalive(http, api_key))
                        try:
                            async for msg in ws:
                                if msg.type == aiohttp.WSMsgType.TEXT:
                                    await on_frame(account_id, msg.data, ids, spool)
                        finally:
                            ka.cancel()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - one account's error must not end the others
                    print(f"account {account_id}: {type(e).__name__}: {e}; reconnecting", file=sys.stderr)
                await asyncio.sleep(1.0)

        tls: Any = True
        if cfg.get("ca_file"):  # one client context for every stream and REST call, as kraite-mp's
            import ssl

            tls = ssl.create_default_context(cafile=cfg["ca_file"])
        connector = aiohttp.TCPConnector(limit=0, ssl=tls)  # the default limit (100) would hold 100 streams
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(stream(http, a["id"], a["api_key"]) for a in cfg["accounts"]))

    asyncio.run(main())
    return 0


# -- the kraite-mp fault hooks (a sitecustomize.py on the PYTHONPATH of `kraite-mp run`) -------------------

SITECUSTOMIZE = '''\
"""compare_asyncio's fault hooks for kraite-mp: wraps UserDataStream.on_frame for some accounts (no
product code changed). Patched when kraite_mp.streams.userdata is first imported (in the parent,
before the children are forked)."""
import importlib.abc
import importlib.util
import os
import sys
import time

_ACCOUNTS = {int(x) for x in os.environ.get("CMPBENCH_FAULT_ACCOUNTS", "").split(",") if x}
_LEAK = int(os.environ.get("CMPBENCH_LEAK_BYTES", "1048576"))
_BLOCK = float(os.environ.get("CMPBENCH_BLOCK_S", "0")) or 365 * 86400.0
_TAG = b"@TAG@"
_leaking = set()
_kept = []


def _patch(module):
    original = module.UserDataStream.on_frame

    def on_frame(self, data):
        account_id = self.account.id
        if account_id in _ACCOUNTS:
            raw = data.encode() if isinstance(data, str) else data
            if _TAG in raw:
                if b'"kind":"raise"' in raw:
                    raise RuntimeError(f"injected fault: the frame handler of account {account_id} raised")
                if b'"kind":"leak"' in raw:
                    _leaking.add(account_id)
                elif b'"kind":"leak-stop"' in raw:
                    _leaking.discard(account_id)
                elif b'"kind":"block"' in raw:
                    time.sleep(_BLOCK)
                return True
            if account_id in _leaking:
                _kept.append(b"\\x01" * _LEAK)
        return original(self, data)

    module.UserDataStream.on_frame = on_frame


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "kraite_mp.streams.userdata":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched_exec
        return spec


if _ACCOUNTS:
    sys.meta_path.insert(0, _Hook())
'''.replace("@TAG@", FAULT_TAG)


# -- helper processes: simulator, stepper, consumer ---------------------------------------------------------


def _on_term(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve_simulator(cfg: dict[str, Any]) -> int:
    """The simulator, with Binance's per-IP handshake and weight limits lifted (both designs connect N at once)."""
    from kraite_mp.simulator import Simulator

    stop = threading.Event()
    _on_term(stop)
    certificate = None
    if cfg.get("tls_dir"):  # https:// and wss:// with a test certificate, as production runs
        from kraite_mp.simulator.tls import make_test_certificate

        certificate = make_test_certificate(str(cfg["tls_dir"]))
    sim = Simulator(
        accounts=int(cfg["accounts"]),
        symbols=int(cfg["symbols"]),
        rate=0.0,
        mark_price_interval_s=60.0,
        seed=int(cfg["seed"]),
        weight_limit_1m=10_000_000,
        connection_limit=10_000_000,
        tls=certificate.server_context() if certificate is not None else None,
    )
    sim.start()
    try:
        line = {
            "ca_file": certificate.cert_file if certificate is not None else None,
            "rest_url": sim.rest_url,
            "ws_url": sim.ws_url,
            "control_url": sim.control_url,
            "accounts": [{"api_key": a.api_key, "api_secret": a.api_secret} for a in sim.accounts],
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


def stepper(cfg: dict[str, Any]) -> int:
    """``step`` control calls round robin over ``keys`` at ``rate``/s, for ``duration`` s or until SIGTERM."""
    import requests

    stop = threading.Event()
    _on_term(stop)
    keys, rate, duration = cfg["keys"], float(cfg["rate"]), cfg.get("duration")
    http = requests.Session()
    http.verify = cfg.get("ca_file") or True
    http.trust_env = not cfg.get("ca_file")  # REQUESTS_CA_BUNDLE would override the session's verify
    t0_wall, t0, i = now_ms(), time.monotonic(), 0
    while not stop.is_set():
        due = t0 + i / rate
        if duration is not None and due - t0 >= float(duration):
            break
        delay = due - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        try:
            http.post(cfg["control_url"] + "/step", json={"api_key": keys[i % len(keys)], "n": 1}, timeout=10)
        except requests.RequestException as e:
            print(f"stepper: {e}", file=sys.stderr)
        i += 1
    http.close()
    print(json.dumps({"t0_wall": t0_wall, "t1_wall": now_ms(), "steps": i}), flush=True)
    return 0


def consumer(cfg: dict[str, Any]) -> int:
    """Pops the design's frame queue; one line per frame: account received_at E in_redis (ms)."""
    import orjson
    import redis

    from kraite_mp.messages import ACK_KEY_TTL_S, event_time_ms

    stop = threading.Event()
    _on_term(stop)
    client = redis.Redis.from_url(cfg["redis_url"], socket_timeout=10)
    qkey = f"{cfg['redis_namespace']}:dramatiq:{QUEUE}"
    mkey = f"{qkey}.msgs"
    with open(cfg["out"], "a") as out:
        while not stop.is_set():
            got = client.blpop([qkey], timeout=1)
            if not got:
                continue
            ids = [got[1]]
            more = client.lpop(qkey, 999)
            stamp = now_ms()  # every id popped was in Redis by now
            if more:
                ids.extend(more)
            pipe = client.pipeline(transaction=False)
            pipe.hmget(mkey, ids)
            pipe.hdel(mkey, *ids)
            payloads = pipe.execute()[0]
            acks = client.pipeline(transaction=False)
            lines = []
            for payload in payloads:
                if payload is None:
                    continue
                kw = orjson.loads(payload).get("kwargs", {})
                event = event_time_ms(kw.get("frame", "")) or -1
                lines.append(f"{kw.get('account_id')} {kw.get('received_at', 0):.3f} {event} {stamp:.3f}\n")
                ack = kw.get("ack")
                if isinstance(ack, list) and len(ack) == 2:  # what a worker does after its COMMIT
                    acks.zadd(ack[0], {str(ack[1]): ack[1]})
                    acks.expire(ack[0], ACK_KEY_TTL_S)
            if len(acks):
                acks.execute()
            out.writelines(lines)
            out.flush()
    client.close()
    return 0


class Seen:
    """The consumer's lines, read incrementally: (account, received_ms, event_ms, in_redis_ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tail = b""
        self.rows: list[tuple[int, float, int, float]] = []

    def refresh(self) -> list[tuple[int, float, int, float]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.rows
        self.offset += len(data)
        lines = (self.tail + data).split(b"\n")
        self.tail = lines.pop()
        for line in lines:
            a, r, e, v = line.split()
            self.rows.append((int(a), float(r), int(e), float(v)))
        return self.rows


# -- the driver ---------------------------------------------------------------------------------------------


class Procs:
    """Every process the driver started; ``stop_all`` stops them (newest first), bounded, even on failure."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, start_new_session=True, cwd=str(ROOT), **kw)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} did not stop within {timeout:.0f}s: SIGKILL to its group")
        for sig in (signal.SIGKILL,):  # whatever is left of its group (kraite-mp's children)
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} still there after SIGKILL")
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.procs)):
            self.stop(proc)


class Run:
    """State shared by the designs of one run: the simulator, the database, Redis, the work directory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.work = Path(tempfile.mkdtemp(prefix="kraite-cmpbench-"))
        self.procs = Procs()
        self.sim: dict[str, Any] = {}
        self.http: Any = None
        self.database_url = ""
        self.secret_key = ""
        self.accounts: list[dict[str, Any]] = []  # {"id", "api_key"} in database order
        self.events = ""
        self.ping_interval_s = 30.0
        self.keepalive_s = 1800.0

    # simulator control
    def control(self, method: str, **kwargs: Any) -> Any:
        rsp = self.http.post(f"{self.sim['control_url']}/{method}", json=kwargs, timeout=30)
        rsp.raise_for_status()
        return rsp.json().get("result")

    def stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.sim['control_url']}/stats", timeout=30).json()  # type: ignore[no-any-return]

    def connected(self, keys: list[str]) -> int:
        current = self.stats()["current_connections"]
        return sum(1 for k in keys if current.get(k, 0) >= 1)

    def frames_sent(self, keys: list[str]) -> dict[str, int]:
        sent = self.stats()["frames_sent"]
        return {k: int(sent.get(k, 0)) for k in keys}

    def ensure_accounts(self, n: int) -> None:
        """The first ``n`` simulator accounts in the database (added in order; ids from the database)."""
        from kraite_mp.store import db as kdb
        from kraite_mp.store.accounts import add_account

        if len(self.accounts) >= n:
            return
        conn = kdb.connect(self.database_url)
        try:
            for i in range(len(self.accounts), n):
                a = self.sim["accounts"][i]
                acct = add_account(
                    conn, self.secret_key, name=f"cmp{i}", api_key=a["api_key"], api_secret=a["api_secret"]
                )
                self.accounts.append({"id": acct.id, "api_key": a["api_key"]})
            conn.commit()
        finally:
            conn.close()

    def guard_memory(self) -> None:
        available = mem_available_mb()
        if available < MEMORY_FLOOR_MB:
            raise RuntimeError(f"MemAvailable {available:.0f} MB < {MEMORY_FLOOR_MB:.0f} MB: stopping")


def wait_until(
    pred: Any, timeout: float, what: str, run: Run, alive: Any = None, interval: float = 0.5
) -> float:
    """Wait for ``pred()``; returns the seconds it took; raises after ``timeout`` or if ``alive()`` is False."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        if alive is not None and not alive():
            raise RuntimeError(f"the design died while waiting for {what}")
        run.guard_memory()
        time.sleep(interval)


class Design:
    """One design under test for one N: start, pids, memory, per-account process, stop."""

    name = ""

    def __init__(self, run: Run, n: int) -> None:
        self.run = run
        self.n = n
        self.accounts = run.accounts[:n]
        self.keys = [a["api_key"] for a in self.accounts]
        self.namespace = f"cmpbench-{run.tag}-{self.name}-{n}"
        self.dir = run.work / f"{self.name}-{n}"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.fault_accounts = [a["id"] for a in self.accounts[: len(FAULT_KINDS)]] if run.args.faults else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        raise NotImplementedError

    def pid_of(self, account_id: int) -> int | None:
        raise NotImplementedError

    def restarts(self) -> int | None:
        return None

    def reconcile_requests(self, account_id: int) -> int | None:
        return None

    def memory(self) -> tuple[int, int, int]:
        """(USS kB, PSS kB, processes) of the whole design."""
        uss = pss = count = 0
        for pid in self.pids():
            u, p = smaps(pid)
            if u or p:
                uss, pss, count = uss + u, pss + p, count + 1
        return uss, pss, count

    def start(self) -> None:
        raise NotImplementedError


class KraiteMp(Design):
    name = "kraite-mp"

    def start(self) -> None:
        run, args = self.run, self.run.args
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAITE", "CMPBENCH"))}
        path = [str(ROOT)]
        if self.fault_accounts:
            hook = self.dir / "hook"
            hook.mkdir()
            (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
            path.insert(0, str(hook))
            env.update(
                CMPBENCH_FAULT_ACCOUNTS=",".join(str(a) for a in self.fault_accounts),
                CMPBENCH_LEAK_BYTES=str(int(args.leak_mb * 1024 * 1024)),
                CMPBENCH_BLOCK_S=str(args.block_s),
            )
        env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.run_dir = self.dir / "run"
        env.update(
            KRAITE_DATABASE_URL=run.database_url,
            KRAITE_REDIS_URL=args.redis_url,
            KRAITE_REDIS_NAMESPACE=self.namespace,
            KRAITE_SECRET_KEY=run.secret_key,
            KRAITE_RUN_DIR=str(self.run_dir),
            KRAITE__user_data_stream__spool_dir=str(self.dir / "spool"),
            KRAITE_BINANCE_REST_URL=run.sim["rest_url"],
            KRAITE_BINANCE_WS_URL=run.sim["ws_url"],
            KRAITE_LOG_LEVEL="WARNING",
            KRAITE__supervisor__spawn_rate_per_s="1000",
            KRAITE__supervisor__spawn_burst="1000",
            KRAITE__supervisor__sync_interval_s="0",
            KRAITE__supervisor__mark_price="false",
            KRAITE__binance__connection_limit="10000000",
            KRAITE__binance__weight_limit_per_min="10000000",
            KRAITE__binance__egress_id=f"cmpbench-{run.tag}-{self.n}",
            KRAITE__metrics__listen=f"127.0.0.1:{free_port()}",
        )
        if run.sim.get("ca_file"):
            env["KRAITE__binance__ca_file"] = str(run.sim["ca_file"])
        self.log_file = open(self.dir / "kraite-mp.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = run.procs.start(
            "kraite-mp run",
            [sys.executable, "-m", "kraite_mp", "run"],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children_of(self.proc.pid)]

    def heartbeats(self) -> dict[int, int]:
        """account id -> pid of its user-data child, per the heartbeat files."""
        out: dict[int, int] = {}
        for path in (self.run_dir / "heartbeats").glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("role") == "user-data" and data.get("account_id") is not None:
                out[int(data["account_id"])] = int(data["pid"])
        return out

    def pid_of(self, account_id: int) -> int | None:
        pid = self.heartbeats().get(account_id)
        if pid is None or not os.path.exists(f"/proc/{pid}"):
            return None
        return pid

    def restarts(self) -> int | None:
        try:
            return int(json.loads((self.run_dir / "supervisor.json").read_text()).get("restarts", 0))
        except (OSError, ValueError):
            return None

    def reconcile_requests(self, account_id: int) -> int | None:
        import orjson
        import redis

        client = redis.Redis.from_url(self.run.args.redis_url, socket_timeout=10)
        try:
            count = 0
            for payload in client.hvals(f"{self.namespace}:dramatiq:reconcile.msgs"):
                if orjson.loads(payload).get("kwargs", {}).get("account_id") == account_id:
                    count += 1
            return count
        finally:
            client.close()


class AsyncioSide(Design):
    name = "asyncio"

    def start(self) -> None:
        run, args = self.run, self.run.args
        cfg = {
            "rest_url": run.sim["rest_url"],
            "ws_url": run.sim["ws_url"].rstrip("/"),
            "ca_file": run.sim.get("ca_file"),
            "events": run.events,
            "ping_interval_s": run.ping_interval_s,
            "keepalive_s": run.keepalive_s,
            "redis_url": args.redis_url,
            "redis_namespace": self.namespace,
            "spool_dir": str(self.dir / "spool"),
            "accounts": self.accounts,
            "fault_accounts": self.fault_accounts,
            "leak_bytes": int(args.leak_mb * 1024 * 1024),
            "block_s": args.block_s,
        }
        cfg_path = self.dir / "asyncio.json"
        cfg_path.write_text(json.dumps(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KRAITE", "CMPBENCH"))}
        env["PYTHONPATH"] = str(ROOT)
        self.log_file = open(self.dir / "asyncio.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = run.procs.start(
            "asyncio side",
            [sys.executable, __file__, "--asyncio-side", str(cfg_path)],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def pid_of(self, account_id: int) -> int | None:
        return self.proc.pid if self.alive() else None  # type: ignore[union-attr]


def helper(run: Run, name: str, mode: str, cfg: dict[str, Any], **kw: Any) -> subprocess.Popen[bytes]:
    return run.procs.start(name, [sys.executable, __file__, mode, json.dumps(cfg)], **kw)


def run_stepper(run: Run, keys: list[str], rate: float, duration: float) -> dict[str, Any]:
    proc = helper(
        run,
        "stepper",
        "--stepper",
        {
            "control_url": run.sim["control_url"],
            "ca_file": run.sim.get("ca_file"),
            "keys": keys,
            "rate": rate,
            "duration": duration,
        },
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = proc.communicate(timeout=duration + 120)
    finally:
        run.procs.stop(proc)
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_design(design: Design) -> dict[str, Any]:
    run, args, n = design.run, design.run.args, design.n
    seen = Seen(design.dir / "consumed.txt")
    cons = helper(
        run,
        f"consumer {design.name}",
        "--consumer",
        {"redis_url": args.redis_url, "redis_namespace": design.namespace, "out": str(seen.path)},
    )
    result: dict[str, Any] = {"design": design.name, "n": n}
    try:
        t_start = time.monotonic()
        design.start()
        result["connect_s"] = wait_until(
            lambda: run.connected(design.keys) >= n,
            CONNECT_TIMEOUT_BASE_S + CONNECT_TIMEOUT_PER_ACCOUNT_S * n,
            f"{n} {design.name} streams connected",
            run,
            design.alive,
            interval=1.0,
        )
        log(f"N={n} {design.name}: {n} streams connected after {time.monotonic() - t_start:.1f}s")
        time.sleep(args.settle_s)
        uss, pss, procs = design.memory()
        result.update(idle_uss_kb=uss, idle_pss_kb=pss)

        # -- the load window
        pids = design.pids()
        sent0 = sum(run.frames_sent(design.keys).values())
        cpu0 = {pid: sched_ns(pid) for pid in pids}
        t_cpu0, t0_wall = time.monotonic(), now_ms()
        load = run_stepper(run, design.keys, args.rate, args.duration)
        sent = sum(run.frames_sent(design.keys).values()) - sent0
        wait_drained(design, seen, t0_wall, sent, "frames")
        elapsed = time.monotonic() - t_cpu0
        cpu_s = sum(max(0, sched_ns(pid) - cpu0[pid]) for pid in pids) / 1e9
        rows = [r for r in seen.refresh() if r[1] >= t0_wall]
        uss, pss, procs = design.memory()
        window = [r for r in rows if r[1] <= load["t1_wall"]]
        result.update(
            processes=procs,
            uss_kb=uss,
            pss_kb=pss,
            steps=load["steps"],
            steps_per_s=load["steps"] / ((load["t1_wall"] - load["t0_wall"]) / 1000),
            frames_sent=sent,
            frames=len(rows),
            frames_per_s=len(window) / args.duration,
            cpu_s=cpu_s,
            cpu_elapsed_s=elapsed,
            cpu_per_1000=cpu_s / len(rows) * 1000 if rows else float("nan"),
            rx_p50=pct([r[3] - r[1] for r in window], 50),
            rx_p99=pct([r[3] - r[1] for r in window], 99),
            ev_p50=pct([r[3] - r[2] for r in window if r[2] > 0], 50),
            ev_p99=pct([r[3] - r[2] for r in window if r[2] > 0], 99),
        )
        if args.burst_s > 0:
            result.update(measure_burst(design, seen))
        log(f"N={n} {design.name}: {json.dumps({k: v for k, v in result.items() if k != 'faults'})}")
        if args.faults:
            result["faults"] = run_faults(design, seen)
        return result
    finally:
        if design.proc is not None:
            t = time.monotonic()
            run.procs.stop(design.proc)
            design.log_file.close()
            log(f"N={n} {design.name}: stopped in {time.monotonic() - t:.1f}s")
        run.procs.stop(cons)
        try:
            wait_until(
                lambda: run.connected(design.keys) == 0,
                DISCONNECT_TIMEOUT_S,
                "the connections to close",
                run,
                interval=1.0,
            )
        except RuntimeError as e:
            log(f"N={n} {design.name}: {e}")


def wait_drained(design: Design, seen: Seen, t0_wall: float, sent: int, what: str) -> None:
    """Wait until the consumer has seen ``sent`` frames received from ``t0_wall`` on (logged if not)."""
    try:
        wait_until(
            lambda: sum(1 for r in seen.refresh() if r[1] >= t0_wall) >= sent,
            DRAIN_TIMEOUT_S,
            f"{sent} {what} in Redis",
            design.run,
            design.alive,
            interval=0.2,
        )
    except RuntimeError as e:
        log(f"N={design.n} {design.name}: {e} (have {sum(1 for r in seen.rows if r[1] >= t0_wall)})")


def measure_burst(design: Design, seen: Seen) -> dict[str, Any]:
    """Every account stepping at once: the simulator's own scheduler runs one step of every account in the
    same tick, ``--burst-rate`` times a second for ``--burst-s``; frame -> in Redis over those frames."""
    run, args = design.run, design.run.args
    sent0 = sum(run.frames_sent(design.keys).values())
    t0_wall = now_ms()
    run.control("set_rate", events_per_s=args.burst_rate)
    time.sleep(args.burst_s)
    run.control("set_rate", events_per_s=0.0)
    t1_wall = now_ms()
    sent = sum(run.frames_sent(design.keys).values()) - sent0
    wait_drained(design, seen, t0_wall, sent, "burst frames")
    rows = [r for r in seen.refresh() if r[1] >= t0_wall]
    return {
        "burst_sent": sent,
        "burst_frames": len(rows),
        "burst_s": (t1_wall - t0_wall) / 1000,
        "burst_rx_p50": pct([r[3] - r[1] for r in rows], 50),
        "burst_rx_p99": pct([r[3] - r[1] for r in rows], 99),
        "burst_ev_p50": pct([r[3] - r[2] for r in rows if r[2] > 0], 50),
        "burst_ev_p99": pct([r[3] - r[2] for r in rows if r[2] > 0], 99),
    }


def run_faults(design: Design, seen: Seen) -> list[dict[str, Any]]:
    """Inject each fault into its own account while the load goes on; see what the others and it go through."""
    import requests

    run, args, n = design.run, design.run.args, design.n
    load = helper(
        run,
        "fault-phase stepper",
        "--stepper",
        {
            "control_url": run.sim["control_url"],
            "ca_file": run.sim.get("ca_file"),
            "keys": design.keys,
            "rate": args.rate,
        },
        stdout=subprocess.DEVNULL,
    )
    http = requests.Session()
    http.verify = run.sim.get("ca_file") or True
    http.trust_env = not run.sim.get("ca_file")  # REQUESTS_CA_BUNDLE would override the session's verify
    out: list[dict[str, Any]] = []
    try:
        for kind, account in zip(FAULT_KINDS, design.accounts, strict=False):
            aid, key = account["id"], account["api_key"]
            others = [k for k in design.keys if k != key]
            time.sleep(args.fault_pre_s)
            run.guard_memory()
            if not design.alive():
                out.append({"kind": kind, "account": aid, "skipped": f"{design.name} is not running"})
                continue
            uss0, _, _ = design.memory()
            pid0 = design.pid_of(aid)
            target_uss0 = smaps(pid0)[0] if pid0 else 0
            restarts0 = design.restarts()
            reconcile0 = design.reconcile_requests(aid)
            st0 = run.stats()
            t_inj = now_ms()
            run.control("send_raw", api_key=key, text=trigger(kind))
            log(f"N={n} {design.name}: injected {kind!r} into account {aid}")
            steps_per_s = args.leak_rate if kind == "leak" else 1.0  # the faulty account: leak load / probes
            t_end = t_inj + args.fault_window_s * 1000
            probe_steps = 0
            while now_ms() < t_end:
                http.post(
                    run.sim["control_url"] + "/step", json={"api_key": key, "n": int(steps_per_s)}, timeout=10
                )
                probe_steps += int(steps_per_s)
                time.sleep(max(0.0, min(1.0, (t_end - now_ms()) / 1000)))
            if kind == "leak":  # what leaked stays; it stops growing, so the next fault's growth is its own
                run.control("send_raw", api_key=key, text=trigger("leak-stop"))
            st1 = run.stats()
            uss1, _, _ = design.memory()
            pid1 = design.pid_of(aid)
            target_uss1 = smaps(pid1)[0] if pid1 else 0
            rows = seen.refresh()
            pre0 = t_inj - args.fault_pre_s * 1000
            before = sum(1 for r in rows if r[0] != aid and pre0 <= r[3] < t_inj) / args.fault_pre_s
            during_rows = [r for r in rows if r[0] != aid and t_inj <= r[3] < t_end]
            during = len(during_rows) / args.fault_window_s
            sent_others = sum(st1["frames_sent"].get(k, 0) - st0["frames_sent"].get(k, 0) for k in others)
            delays = [r[3] - r[2] for r in during_rows if r[2] > 0]

            def back(aid: int = aid, t_inj: float = t_inj) -> float | None:
                for r in seen.refresh():
                    if r[0] == aid and r[2] > t_inj:
                        return (r[3] - t_inj) / 1000
                return None

            # the faulty account: does it stream again (frames emitted after the injection in Redis)?
            deadline = time.monotonic() + (RECOVERY_TIMEOUT_S if kind != "leak" else 0)
            while back() is None and time.monotonic() < deadline and design.alive():
                http.post(run.sim["control_url"] + "/step", json={"api_key": key, "n": 1}, timeout=10)
                time.sleep(1.0)
            recovered = back()
            st2 = run.stats()
            pid2 = design.pid_of(aid)
            res = {
                "kind": kind,
                "account": aid,
                "others_before_fps": before,
                "others_during_fps": during,
                "others_sent": sent_others,
                "others_in_redis": len(during_rows),
                "others_delay_p99_ms": pct(delays, 99),
                "others_delay_max_ms": max(delays) if delays else float("nan"),
                "target_back_after_s": recovered,
                "target_lost_events": st2["events_lost"].get(key, 0) - st0["events_lost"].get(key, 0),
                "target_pid_before": pid0,
                "target_pid_after": pid2,
                "restarts": None if restarts0 is None else (design.restarts() or 0) - restarts0,
                "reconcile_requests": None
                if reconcile0 is None
                else (design.reconcile_requests(aid) or 0) - reconcile0,
                "design_alive": design.alive(),
                "uss_growth_kb": uss1 - uss0,
                "target_uss_growth_kb": target_uss1 - target_uss0 if pid0 and pid0 == pid1 else None,
                "probe_steps": probe_steps,
            }
            log(f"N={n} {design.name}: {json.dumps(res)}")
            out.append(res)
    finally:
        http.close()
        run.procs.stop(load)
    return out


def trigger(kind: str) -> str:
    """The frame that switches a fault on (``Faults.hit``, the sitecustomize's ``on_frame``)."""
    return json.dumps({"e": FAULT_TAG, "E": int(now_ms()), "kind": kind}, separators=(",", ":"))


def gate_memory(n: int, args: argparse.Namespace) -> tuple[int | None, str]:
    """Wait (bounded) until MemAvailable allows kraite-mp with ``n`` accounts; else a smaller N or None."""
    for candidate in (n, FALLBACK_ACCOUNTS) if n > FALLBACK_ACCOUNTS else (n,):
        need = MEMORY_BASE_MB + MB_PER_CHILD * candidate
        deadline = time.monotonic() + args.memory_wait_s
        while True:
            available = mem_available_mb()
            if available >= need:
                log(f"N={candidate}: MemAvailable {available / 1024:.1f} GB >= {need / 1024:.1f} GB needed")
                note = (
                    ""
                    if candidate == n
                    else f"N={n} skipped: MemAvailable never reached {need / 1024:.1f} GB"
                )
                return candidate, note
            if time.monotonic() >= deadline:
                break
            log(f"N={candidate}: MemAvailable {available / 1024:.1f} GB < {need / 1024:.1f} GB; waiting")
            time.sleep(MEMORY_POLL_S)
        log(f"N={candidate}: MemAvailable stayed under {need / 1024:.1f} GB for {args.memory_wait_s:.0f}s")
        if candidate == FALLBACK_ACCOUNTS or n <= FALLBACK_ACCOUNTS:
            break
    return None, f"N={n} skipped: not enough MemAvailable"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> str:
    from importlib import metadata

    parts = []
    for name in ("aiohttp", "websocket-client", "redis", "dramatiq"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


# -- the report ---------------------------------------------------------------------------------------------


def mb(kb: float) -> str:
    if abs(kb) < KB_PER_MB:
        return f"{kb:.0f} kB"
    return f"{kb / KB_PER_MB:,.0f} MB" if kb >= 100 * KB_PER_MB else f"{kb / KB_PER_MB:.1f} MB"


def num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def describe_fault(design: str, f: dict[str, Any], args: argparse.Namespace) -> str:
    """What became of the faulty account (from the measured fields)."""
    if f.get("skipped"):
        return f["skipped"]
    parts = []
    back = f["target_back_after_s"]
    if design == "kraite-mp":
        new_pid = f["target_pid_after"] is not None and f["target_pid_after"] != f["target_pid_before"]
        if new_pid:
            parts.append(f"its child was replaced by the supervisor (restarts +{f['restarts']})")
        elif f["kind"] != "leak":
            parts.append("same child")
    else:
        parts.append("process alive" if f["design_alive"] else "process gone")
    if f["kind"] == "leak":
        parts.append("kept streaming while leaking" if back is not None else "no frame of it in Redis")
    elif back is not None:
        parts.append(f"its frames in Redis again {back:.1f} s after the fault")
    else:
        total = args.fault_window_s + RECOVERY_TIMEOUT_S
        parts.append(f"no frame of it in Redis within {total:.0f} s")
    if f["target_lost_events"]:
        parts.append(f"{f['target_lost_events']} events lost while disconnected")
    if f["reconcile_requests"]:
        parts.append(f"{f['reconcile_requests']} REST reconciliation(s) requested")
    return "; ".join(parts)


def report(results: list[dict[str, Any]], notes: list[str], args: argparse.Namespace, argv: list[str]) -> str:
    block = "forever" if args.block_s <= 0 else f"{args.block_s:g} s"
    out = ["## kraite-mp vs a minimal asyncio process (`bench/compare_asyncio.py`)", ""]
    out.append(f"Command: `{' '.join(['.venv/bin/python', 'bench/compare_asyncio.py', *argv])}`  ")
    out.append(
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs ({cpu_model()}), "
        f"{mem_total_gib():.1f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{versions()}; kraite-mp revision {git_revision()}; {'TLS (https://, wss://)' if args.tls else 'plain http:// and ws://'}. Simulator, both designs (one after the other), "
        "the load and the Redis consumer on this machine, with other test runs going on: compare the "
        "designs within one run."
    )
    out.append("")
    out.append(
        f"Load: {args.rate:g} scenario steps/s in total, round robin over the accounts (1-4 frames each), "
        f"{args.duration:g} s. kraite-mp: `kraite-mp run` without its mark-price child and periodic sync; "
        "its processes are the supervisor, one child per account and the metrics child. asyncio: one process, "
        "aiohttp streams, the same spool record (own file per account, write + flush, no fsync: "
        "kraite-mp's default `spool_fsync = false`) and the same Dramatiq message, enqueued with Dramatiq's "
        "own Redis script through `redis.asyncio`. Memory after the load (smaps_rollup; USS = private, PSS "
        "= with a share of the pages shared between processes); CPU from schedstat of every process over "
        "the load and its drain. Frame -> in Redis: from the receiver's `received_at` to the moment a "
        "separate consumer got the message from Redis (the same consumer for both; it also acknowledges "
        "kraite-mp's frames like a worker); event -> in Redis: from the simulator's event time `E` (1 ms). "
        "MB = MiB."
    )
    out.append("")
    out += [
        "| accounts | design | processes | USS total | PSS total | USS / account | PSS / account "
        "| CPU-s per 1,000 frames | CPU (% of one core) | frames (per s) | frame -> in Redis p50 / p99 "
        "| event -> in Redis p50 / p99 | start to all connected |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "uss_kb" not in r:
            continue
        out.append(
            f"| {r['n']} | {r['design']} | {r['processes']} | {mb(r['uss_kb'])} | {mb(r['pss_kb'])} "
            f"| {mb(r['uss_kb'] / r['n'])} | {mb(r['pss_kb'] / r['n'])} | {num(r['cpu_per_1000'], '.2f')} "
            f"| {r['cpu_s'] / r['cpu_elapsed_s'] * 100:.1f} % | {r['frames']} ({r['frames_per_s']:.0f}) "
            f"| {num(r['rx_p50'])} / {num(r['rx_p99'])} ms | {num(r['ev_p50'])} / {num(r['ev_p99'])} ms "
            f"| {r['connect_s']:.1f} s |"
        )
    ratios = []
    for n in sorted({r["n"] for r in results}):
        k = next((r for r in results if r["n"] == n and r["design"] == "kraite-mp" and "uss_kb" in r), None)
        a = next((r for r in results if r["n"] == n and r["design"] == "asyncio" and "uss_kb" in r), None)
        if k and a:
            ratios.append(
                f"N={n}: kraite-mp / asyncio = {k['uss_kb'] / a['uss_kb']:.0f}x the USS, "
                f"{k['pss_kb'] / a['pss_kb']:.0f}x the PSS, {k['cpu_per_1000'] / a['cpu_per_1000']:.1f}x the "
                f"CPU per frame, p99 frame -> in Redis {num(k['rx_p99'])} vs {num(a['rx_p99'])} ms"
            )
    sizes = sorted({r["n"] for r in results if "uss_kb" in r})
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        for design in ("kraite-mp", "asyncio"):
            a = next((r for r in results if r["n"] == lo and r["design"] == design and "uss_kb" in r), None)
            b = next((r for r in results if r["n"] == hi and r["design"] == design and "uss_kb" in r), None)
            if a and b:
                ratios.append(
                    f"{design}, each account beyond {lo} (N={lo} -> {hi}): "
                    f"{mb((b['uss_kb'] - a['uss_kb']) / (hi - lo))} USS, {mb((b['pss_kb'] - a['pss_kb']) / (hi - lo))} PSS"
                )
    if ratios:
        out += ["", "Ratios within this run: " + "; ".join(ratios) + "."]
    bursts = [r for r in results if "burst_frames" in r]
    if bursts:
        out += [
            "",
            f"Burst: every account stepping at once, the simulator's scheduler running one step of every account in "
            f"the same tick {args.burst_rate:g} times a second for {args.burst_s:g} s (after the load window).",
            "",
            "| accounts | design | frames sent / in Redis | frame -> in Redis p50 / p99 | event -> in Redis p50 / p99 |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in bursts:
            out.append(
                f"| {r['n']} | {r['design']} | {r['burst_sent']} / {r['burst_frames']} "
                f"| {num(r['burst_rx_p50'])} / {num(r['burst_rx_p99'])} ms "
                f"| {num(r['burst_ev_p50'])} / {num(r['burst_ev_p99'])} ms |"
            )
    if any(r.get("faults") for r in results):
        out += [
            "",
            f"Faults, each in one account of its own while the load goes on: **raise** (the frame handler "
            f"raises on a trigger frame), **leak** (from the trigger on the handler keeps {args.leak_mb:g} MB "
            f"per frame; that account gets {args.leak_rate:g} extra steps/s), **block** (the handler sleeps "
            f"{block}). kraite-mp: wrapped `UserDataStream.on_frame` (a sitecustomize, no product change); "
            f"asyncio: the same hooks in its handler. Windows: {args.fault_pre_s:g} s before, "
            f"{args.fault_window_s:g} s from the trigger; then up to {RECOVERY_TIMEOUT_S:.0f} s for frames of "
            "the faulty account to reach Redis again (1 probe step/s).",
            "",
            "| accounts | design | fault | other accounts' frames/s in Redis, before -> during | others' frames "
            "in Redis / sent during the window | others' event -> in Redis p99 / max | memory growth (design "
            "/ faulty process) | the faulty account |",
            "|---:|---|---|---:|---:|---:|---:|---|",
        ]
        for r in results:
            for f in r.get("faults", []):
                if f.get("skipped"):
                    out.append(f"| {r['n']} | {r['design']} | {f['kind']} | - | - | - | - | {f['skipped']} |")
                    continue
                if r["design"] == "asyncio":
                    target = "(the same process)"
                elif f["target_uss_growth_kb"] is None:
                    target = "(replaced)"
                else:
                    target = mb(f["target_uss_growth_kb"])
                delay = (
                    "none in Redis"
                    if not f["others_in_redis"]
                    else f"{f['others_delay_p99_ms'] / 1000:.2f} / {f['others_delay_max_ms'] / 1000:.2f} s"
                )
                out.append(
                    f"| {r['n']} | {r['design']} | {f['kind']} | {f['others_before_fps']:.0f} -> "
                    f"{f['others_during_fps']:.0f} | {f['others_in_redis']} / {f['others_sent']} | {delay} "
                    f"| {mb(f['uss_growth_kb'])} / {target} | {describe_fault(r['design'], f, args)} |"
                )
    for note in notes:
        out += ["", f"Note: {note}."]
    return "\n".join(out)


def mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / KB_PER_MB / KB_PER_MB
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--asyncio-side", help=argparse.SUPPRESS)
    parser.add_argument("--serve-simulator", help=argparse.SUPPRESS)
    parser.add_argument("--stepper", help=argparse.SUPPRESS)
    parser.add_argument("--consumer", help=argparse.SUPPRESS)
    parser.add_argument("--accounts", default="200,1000", help="comma-separated N values (default 200,1000)")
    parser.add_argument(
        "--designs", default="asyncio,kraite-mp", help="comma-separated designs to run (default both)"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="scenario steps/s in total (default 100)")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load per design (default 60)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="https:// and wss:// for both designs (the simulator's test certificate), as production runs",
    )
    parser.add_argument(
        "--faults", action=argparse.BooleanOptionalAction, default=True, help="inject raise/leak/block"
    )
    parser.add_argument("--leak-mb", type=float, default=1.0, help="MB kept per frame by the leaking handler")
    parser.add_argument("--leak-rate", type=float, default=5.0, help="extra steps/s of the leaking account")
    parser.add_argument(
        "--block-s", type=float, default=0.0, help="seconds the blocking handler sleeps (0 = forever)"
    )
    parser.add_argument(
        "--burst-s", type=float, default=10.0, help="seconds of every account stepping at once (0 = skip)"
    )
    parser.add_argument(
        "--burst-rate", type=float, default=1.0, help="steps per second of every account in the burst"
    )
    parser.add_argument("--fault-pre-s", type=float, default=10.0)
    parser.add_argument("--fault-window-s", type=float, default=20.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--memory-wait-s", type=float, default=1200.0)
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the work directory (logs, consumer files, spools)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("KRAITE_TEST_DATABASE_URL") or DEFAULT_ADMIN_URL,
        help="admin URL (CREATE DATABASE)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("KRAITE_TEST_REDIS_URL") or DEFAULT_REDIS_URL)
    args = parser.parse_args()
    if args.asyncio_side:
        return asyncio_side(args.asyncio_side)
    if args.serve_simulator:
        return serve_simulator(json.loads(args.serve_simulator))
    if args.stepper:
        return stepper(json.loads(args.stepper))
    if args.consumer:
        return consumer(json.loads(args.consumer))

    counts = sorted({int(x) for x in args.accounts.split(",") if x.strip()})
    if args.faults and min(counts) <= len(FAULT_KINDS):
        parser.error(f"--faults needs more than {len(FAULT_KINDS)} accounts")
    return drive(args, counts)


def drive(args: argparse.Namespace, counts: list[int]) -> int:
    import requests

    from kraite_mp.config.load import load_settings
    from kraite_mp.store import db as kdb
    from kraite_mp.store.accounts import generate_secret_key

    started = time.monotonic()
    run = Run(args)
    run.http = requests.Session()
    defaults = load_settings(None, environ={"KRAITE_DATABASE_URL": "postgresql://unused/unused"})
    run.events = "/".join(defaults.user_data_stream.events)
    run.ping_interval_s = defaults.user_data_stream.ping_interval_s
    run.keepalive_s = defaults.user_data_stream.keepalive_interval_s
    assert defaults.user_data_stream.queue_name == QUEUE
    dbname = f"kraite_cmpbench_{run.tag}"
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    run.database_url = kdb.create_database(args.database_url, dbname)
    try:
        conn = kdb.connect(run.database_url)
        try:
            kdb.migrate(conn)
        finally:
            conn.close()
        run.secret_key = generate_secret_key()
        sim_log = open(run.work / "simulator.log", "wb")  # noqa: SIM115 - the simulator's, kept open
        sim = helper(
            run,
            "simulator",
            "--serve-simulator",
            {
                "accounts": max(counts),
                "symbols": args.symbols,
                "seed": 7,
                "tls_dir": str(run.work / "tls") if args.tls else None,
            },
            stdout=subprocess.PIPE,
            stderr=sim_log,
        )
        assert sim.stdout is not None
        import select

        ready, _, _ = select.select([sim.stdout], [], [], SIM_START_TIMEOUT_S)
        if not ready:
            raise RuntimeError("the simulator printed nothing")
        run.sim = json.loads(sim.stdout.readline())
        run.http.verify = run.sim.get("ca_file") or True
        run.http.trust_env = not run.sim.get("ca_file")  # REQUESTS_CA_BUNDLE would override verify
        log(f"simulator up with {max(counts)} accounts; work dir {run.work}")
        for n in counts:
            actual, note = gate_memory(n, args)
            if note:
                notes.append(note)
            if actual is None or any(r["n"] == actual for r in results):
                continue
            run.ensure_accounts(actual)
            for cls in (AsyncioSide, KraiteMp):
                if cls.name not in args.designs.split(","):
                    continue
                design = cls(run, actual)
                try:
                    results.append(measure_design(design))
                except Exception as e:  # noqa: BLE001 - report it and go on with the next design
                    log(f"N={actual} {design.name} FAILED: {type(e).__name__}: {e}")
                    notes.append(f"N={actual} {design.name} failed: {type(e).__name__}: {e}")
                    results.append({"design": design.name, "n": actual, "error": str(e)})
    finally:
        run.procs.stop_all()
        run.http.close()
        kdb.drop_database(args.database_url, dbname)
        try:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"cmpbench-{run.tag}*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
            client.close()
        except Exception as e:  # noqa: BLE001
            log(f"cannot clean Redis: {e}")
        if args.keep_work:
            log(f"work directory kept: {run.work}")
        else:
            shutil.rmtree(run.work, ignore_errors=True)
        log(f"done in {time.monotonic() - started:.0f}s")
    print(report(results, notes, args, sys.argv[1:]))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
