"""Test hosts as Linux network namespaces: real processes on real (virtual) networks, removed at the end.

``Hosts`` creates one bridge ``kmp<hex>br`` in the root namespace with a free ``10.x.y.0/24`` (the bridge
holds ``.1``) and, per host, a namespace ``kmp<hex>-<name>`` joined to the bridge by a veth pair (the
host holds ``.11``, ``.12``, ...), loopback up. ``<hex>`` is unique per run. PostgreSQL, Redis and the
simulator listen on the root namespace's loopback, which a namespace cannot reach (its 127.0.0.1 is its
own): ``forward(port)`` starts a TCP forwarder in this process, bound on the bridge address, that relays
every connection to ``127.0.0.1:<port>`` (real sockets, both directions, half-close and backpressure
kept). A forwarder may give each host its own loopback source address (``127.0.0.<10 + index>``), so that
a per-IP limit (the simulator's) sees one client per host as the exchange would; it also records the
request line of each connection (``GET /private/ws?...``), which says which host holds which stream.

- ``run(host, argv, env, log_path)`` starts ``argv`` in the host (``ip netns exec`` execs it: the pid is
  the command's, checked through /proc/PID/ns/net) in its own session and process group.
- ``partition(host)`` / ``heal(host)``: both ends of the host's veth down / up; established TCP
  connections stall (no reset), as on a real network.
- ``kill(host)``: SIGKILL the process groups the harness started there, then whatever ``ip netns pids``
  still lists, until the namespace is empty.
- ``close()`` (also ``with Hosts() as hosts``, the ``hosts_or_skip`` context and on any failure): kill
  every process in every namespace, delete the namespaces, veths and the bridge, stop the forwarders.

A run writes ``/run/kraite-netns/<prefix>.owner`` (its pid); at start, namespaces and links of this
harness's pattern whose owner is gone (a crashed run) are removed. When ``ip netns add`` is refused
(not root, no CAP_SYS_ADMIN) the harness raises ``Unavailable``; ``hosts_or_skip`` turns that into a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: ``kmp`` + 6 hex digits: the per-run prefix of every namespace and link this harness creates.
PREFIX_RE = re.compile(r"^kmp[0-9a-f]{6}$")
NETNS_RE = re.compile(r"^(kmp[0-9a-f]{6})-[a-z0-9]+$")
LINK_RE = re.compile(r"^(kmp[0-9a-f]{6})(br|v[a-z0-9]+)$")
OWNER_DIR = Path("/run/kraite-netns")
#: The bridge's address is .1 of the /24; host number i (1-based) is .(HOST_BASE + i).
HOST_BASE = 10
#: Bound of every wait in the harness (a kill, a command that should be quick).
KILL_TIMEOUT_S = 10.0


class Unavailable(RuntimeError):
    """Network namespaces cannot be created here (the reason is the message)."""


def ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """``ip ARGS``; raises with ip's stderr when ``check`` and it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def list_netns() -> list[str]:
    """Names of every network namespace (``ip netns list``; a line may end with ``(id: N)``)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[str]:
    """Names of every link in the root namespace (``veth@peer`` reduced to ``veth``)."""
    out = ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def netns_pids(ns: str) -> list[int]:
    """Pids of every process in namespace ``ns`` (``ip netns pids``); [] once it is gone."""
    proc = ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _pid_netns_inode(pid: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[4026532281]"
    except OSError:
        return None
    m = re.match(r"net:\[(\d+)\]", link)
    return int(m.group(1)) if m else None


def _kill_netns_processes(ns: str, timeout: float = KILL_TIMEOUT_S) -> list[int]:
    """SIGKILL everything in ``ns`` until it is empty (or ``timeout``); returns the pids still alive."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(ns) if _alive(p)]
        if not pids or time.monotonic() >= deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def remove_stale(pattern_owner_alive: Callable[[str], bool] | None = None) -> list[str]:
    """Remove namespaces and links of this harness's pattern whose run is gone; returns what was removed.

    A run is gone when its owner file is missing or names a dead pid (``pattern_owner_alive`` overrides
    that check, for tests)."""

    def owner_alive(prefix: str) -> bool:
        if pattern_owner_alive is not None:
            return pattern_owner_alive(prefix)
        try:
            pid = int((OWNER_DIR / f"{prefix}.owner").read_text().strip())
        except (OSError, ValueError):
            return False
        return _alive(pid)

    removed = []
    for ns in list_netns():
        m = NETNS_RE.match(ns)
        if m and not owner_alive(m.group(1)):
            _kill_netns_processes(ns)
            ip("netns", "del", ns, check=False)
            removed.append(ns)
    for link in list_links():
        m = LINK_RE.match(link)
        if m and not owner_alive(m.group(1)):
            ip("link", "del", link, check=False)
            removed.append(link)
    if OWNER_DIR.is_dir():
        for owner in OWNER_DIR.glob("kmp*.owner"):
            if not owner_alive(owner.name.split(".", 1)[0]):
                with contextlib.suppress(OSError):
                    owner.unlink()
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for token in ip(*args, check=False).stdout.split():
            with contextlib.suppress(ValueError):
                if "/" in token or token.count(".") == 3:
                    nets.append(ipaddress.IPv4Network(token, strict=False))
    return nets


def pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A free 10.x.y.0/24 (x in 200..249): no address or route of the root namespace overlaps it."""
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(200, 250)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise Unavailable("no free 10.x.y.0/24 found")


# -- TCP forwarder ------------------------------------------------------------------------------
@dataclass
class Relay:
    """One forwarded connection: the client's address and the first line it sent (an HTTP request line)."""

    peer: str
    first_line: str = ""
    open: bool = True
    #: time.monotonic() of the accept, of the client's first bytes (the request line), of the end
    opened_at: float = field(default_factory=time.monotonic)
    requested_at: float | None = None
    closed_at: float | None = None
    #: bytes relayed each way (client -> service, service -> client)
    up_bytes: int = 0
    down_bytes: int = 0
    transports: list[asyncio.Transport] = field(default_factory=list, repr=False)


class Forwarder:
    """Listens on ``listen_host`` (port chosen by the kernel) and relays each connection to ``target``.

    Runs on the harness's event loop thread. ``source_for(peer_ip)`` may give the outgoing connection a
    source address (a loopback alias) per client."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listen_host: str,
        target_port: int,
        target_host: str = "127.0.0.1",
        source_for: Callable[[str], str | None] | None = None,
        name: str = "",
    ) -> None:
        self.loop = loop
        self.listen_host = listen_host
        self.target = (target_host, target_port)
        self.source_for = source_for
        self.name = name or f"{target_host}:{target_port}"
        self.port = 0
        self.relays: list[Relay] = []
        self.accepted = 0
        self.failed = 0
        self._server: asyncio.AbstractServer | None = None
        self._lock = threading.Lock()

    def start(self) -> Forwarder:
        async def serve() -> int:
            self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return self

    def open_relays(self) -> list[Relay]:
        with self._lock:
            return [r for r in self.relays if r.open]

    def all_relays(self) -> list[Relay]:
        with self._lock:
            return list(self.relays)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername")[0])
        relay = Relay(peer=peer, transports=[writer.transport])  # type: ignore[list-item]
        with self._lock:
            self.accepted += 1
            self.relays.append(relay)
        source = self.source_for(peer) if self.source_for else None
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target, local_addr=(source, 0) if source else None), 10
            )
        except (TimeoutError, OSError):
            with self._lock:
                self.failed += 1
            relay.open, relay.closed_at = False, time.monotonic()
            writer.transport.abort()
            return
        relay.transports.append(up_writer.transport)  # type: ignore[arg-type]
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, relay, True), self._pipe(up_reader, writer, relay, False)
            )
        except Exception:  # noqa: BLE001 - one direction failed (and aborted both): the relay is over
            pass
        finally:
            relay.open, relay.closed_at = False, time.monotonic()
            for t in relay.transports:
                t.abort()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, relay: Relay, from_client: bool
    ) -> None:
        """One direction until EOF (passed on as a half-close); an error aborts both directions."""
        first = from_client
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if first:
                    relay.first_line = data.split(b"\r\n", 1)[0][:300].decode("latin-1")
                    relay.requested_at = time.monotonic()
                    first = False
                if from_client:
                    relay.up_bytes += len(data)
                else:
                    relay.down_bytes += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            for t in relay.transports:
                t.abort()
            raise

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            with self._lock:
                relays = list(self.relays)
            for r in relays:
                for t in r.transports:
                    t.abort()
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)

        if not self.loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)


# -- hosts --------------------------------------------------------------------------------------
@dataclass
class Host:
    name: str
    index: int
    ns: str
    ip: str
    veth_root: str
    veth_host: str = "eth0"
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)
    partitioned: bool = False


class Hosts:
    """N test hosts on one bridge; see the module docstring. Not thread-safe (one test drives it)."""

    def __init__(self, prefix: str | None = None, seed: int | None = None) -> None:
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
        if shutil.which("ip") is None:
            raise Unavailable("the ip command (iproute2) is not installed")
        rng = random.Random(seed)
        self.prefix = prefix or f"kmp{os.urandom(3).hex()}"
        assert PREFIX_RE.match(self.prefix), self.prefix
        self.bridge = f"{self.prefix}br"
        self.hosts: dict[str, Host] = {}
        self.forwarders: list[Forwarder] = []
        self.removed_stale = remove_stale()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.prefix}-fwd", daemon=True)
        self._thread.start()
        try:
            OWNER_DIR.mkdir(parents=True, exist_ok=True)
            (OWNER_DIR / f"{self.prefix}.owner").write_text(str(os.getpid()))
            probe = ip("netns", "add", f"{self.prefix}-probe", check=False)
            if probe.returncode != 0:
                raise Unavailable(f"ip netns add is refused: {probe.stderr.strip()}")
            ip("netns", "del", f"{self.prefix}-probe", check=False)
            self.subnet = pick_subnet(rng)
            self.bridge_ip = str(self.subnet.network_address + 1)
            ip("link", "add", "name", self.bridge, "type", "bridge", "forward_delay", "0")
            ip("addr", "add", f"{self.bridge_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    # -- lifecycle
    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge, loopback up; ``name`` is short ([a-z0-9], e.g. "h1")."""
        assert re.fullmatch(r"[a-z0-9]{1,5}", name) and name not in self.hosts, name
        index = len(self.hosts) + 1
        host = Host(
            name=name,
            index=index,
            ns=f"{self.prefix}-{name}",
            ip=str(self.subnet.network_address + HOST_BASE + index),
            veth_root=f"{self.prefix}v{name}",
        )
        self.hosts[name] = host
        peer = f"{self.prefix}p{name}"
        ip("netns", "add", host.ns)
        ip("link", "add", host.veth_root, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", host.ns)
        ip("-n", host.ns, "link", "set", peer, "name", host.veth_host)
        ip("link", "set", host.veth_root, "master", self.bridge)
        ip("link", "set", host.veth_root, "up")
        ip("-n", host.ns, "link", "set", "lo", "up")
        ip("-n", host.ns, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", host.veth_host)
        ip("-n", host.ns, "link", "set", host.veth_host, "up")
        return host

    def host(self, name: str | Host) -> Host:
        return name if isinstance(name, Host) else self.hosts[name]

    def host_of_ip(self, address: str) -> str | None:
        return next((h.name for h in self.hosts.values() if h.ip == address), None)

    # -- services
    def forward(self, port: int, per_host_source: bool = False, name: str = "") -> Forwarder:
        """Relay ``<bridge_ip>:<returned .port>`` to ``127.0.0.1:port`` for every host.

        ``per_host_source``: the connection to the service comes from ``127.0.0.<10 + host index>``."""

        def source_for(peer: str) -> str | None:
            host = self.host_of_ip(peer)
            return f"127.0.0.{HOST_BASE + self.hosts[host].index}" if host else None

        fwd = Forwarder(
            self._loop, self.bridge_ip, port, source_for=source_for if per_host_source else None, name=name
        ).start()
        self.forwarders.append(fwd)
        return fwd

    def forward_url(self, url: str, **kw: Any) -> tuple[str, Forwarder]:
        """``url`` (scheme://[user@]127.0.0.1:port/...) rewritten to a forwarder on the bridge address."""
        m = re.match(r"^(?P<head>[a-z+]+://(?:[^@/]*@)?)(?P<host>[^:/]+):(?P<port>\d+)(?P<tail>.*)$", url)
        if not m or m.group("host") not in ("127.0.0.1", "localhost"):
            raise ValueError(f"not a loopback URL with a port: {url!r}")
        fwd = self.forward(int(m.group("port")), **kw)
        return f"{m.group('head')}{self.bridge_ip}:{fwd.port}{m.group('tail')}", fwd

    # -- processes
    def run(
        self,
        host: str | Host,
        argv: list[str],
        env: dict[str, str],
        log_path: str | Path,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host`` (own session and process group), output to ``log_path``."""
        h = self.host(host)
        log = open(log_path, "ab")  # noqa: SIM115 - closed in kill()/close()
        h.logs.append(log)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", h.ns, *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(cwd) if cwd else None,
        )
        h.procs.append(proc)
        # ip netns exec does setns() and execvp(): the pid becomes the command itself, in the namespace
        want = _netns_inode(h.ns)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while _pid_netns_inode(proc.pid) != want and proc.poll() is None:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{argv[0]} did not enter {h.ns} in time")
            time.sleep(0.005)
        return proc

    def exec(
        self, host: str | Host, argv: list[str], env: dict[str, str] | None = None, timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``host`` and wait for it (output captured)."""
        h = self.host(host)
        return subprocess.run(
            ["ip", "netns", "exec", h.ns, *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def pids(self, host: str | Host) -> list[int]:
        """Live processes in the host's namespace (whoever started them)."""
        return [p for p in netns_pids(self.host(host).ns) if _alive(p)]

    def kill(self, host: str | Host) -> None:
        """SIGKILL every process the harness started in ``host`` (their process groups), then whatever
        else is still in its namespace; reap ours."""
        h = self.host(host)
        for proc in h.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        left = _kill_netns_processes(h.ns)
        for proc in h.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_TIMEOUT_S)
        h.procs.clear()
        for log in h.logs:
            log.close()
        h.logs.clear()
        if left:
            raise RuntimeError(f"processes {left} survived SIGKILL in {h.ns}")

    # -- faults
    def partition(self, host: str | Host) -> None:
        """Cut the host off: its veth down on both ends (connections stall, nothing is reset)."""
        h = self.host(host)
        ip("-n", h.ns, "link", "set", h.veth_host, "down")
        ip("link", "set", h.veth_root, "down")
        h.partitioned = True

    def heal(self, host: str | Host) -> None:
        h = self.host(host)
        ip("link", "set", h.veth_root, "up")
        ip("-n", h.ns, "link", "set", h.veth_host, "up")
        h.partitioned = False

    # -- teardown
    def _stop_loop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run that still exist (empty after ``close``)."""
        mine = [n for n in list_netns() if n.startswith(self.prefix + "-")]
        return mine + [link for link in list_links() if link.startswith(self.prefix)]

    def close(self) -> None:
        """Kill every process in every namespace, delete namespaces, veths and the bridge, stop forwarders.
        Idempotent; every step is attempted even when an earlier one fails."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for h in list(self.hosts.values()):
            try:
                self.kill(h)
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"kill {h.name}: {exc}")
            ip("netns", "del", h.ns, check=False)
            if h.veth_root in list_links():
                ip("link", "del", h.veth_root, check=False)
        for fwd in self.forwarders:
            fwd.stop()
        if self.bridge in list_links():
            ip("link", "del", self.bridge, check=False)
        if f"{self.prefix}-probe" in list_netns():
            ip("netns", "del", f"{self.prefix}-probe", check=False)
        self._stop_loop()
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()
        with contextlib.suppress(OSError):
            (OWNER_DIR / f"{self.prefix}.owner").unlink()
        left = self.leftovers()
        if left:
            errors.append(f"left behind: {left}")
        if errors:
            raise RuntimeError("netns teardown: " + "; ".join(errors))


@contextlib.contextmanager
def hosts_or_skip(*names: str) -> Iterator[Hosts]:
    """``Hosts`` with ``names`` added, or ``pytest.skip`` with the reason when namespaces are refused."""
    import pytest

    try:
        hosts = Hosts()
    except Unavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        for name in names:
            hosts.add_host(name)
        yield hosts
    finally:
        hosts.close()
