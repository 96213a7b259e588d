"""The supervisor (``kraite-mp run``): a pre-fork parent that does nothing but manage its children.

Modelled on gunicorn's arbiter (signal handlers only queue the signal; the main loop reaps with
``waitpid(-1, WNOHANG)``, spawns what is missing, kills what is stale) and on supervisor's process
state machine::

    PENDING --spawn--> STARTING --first non-"starting" heartbeat--> RUNNING
       ^                  |  exit (unexpected)                         |
       |                  v                                            v
       +------------- BACKOFF (1, 2, 4 .. 32 s + jitter) <-------- exit (unexpected)
       +------------- FATAL   (exit code 77/78; retried after fatal_retry_s)
    any live state --stop (account removed/changed, heartbeat stale, shutdown)--> STOPPING
    one-shot children (the periodic sync) and every child at shutdown end in EXITED.

Children: one ``user-data`` per owned account, one ``mark-price`` (``supervisor.mark_price``) and,
every ``supervisor.sync_interval_s``, a one-shot ``sync-orders``. Their entry points are imported
here before the first fork so that every child shares the parent's pages (and ``gc.freeze()``
keeps the collector from dirtying them). The parent never starts a thread and holds no socket,
DB connection or broker across a fork: it opens PostgreSQL only to read the accounts, then closes
it. New WebSocket connections are paced by a token bucket (Binance: 300 per 5 minutes per IP).

Files: ``<run_dir>/heartbeats/<key>.json`` (written by the children), ``<run_dir>/supervisor.json``
(status snapshot, at most once a second), ``<run_dir>/supervisor.lock`` (one supervisor per run_dir).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import gc
import importlib
import json
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kraite_mp import exitcodes
from kraite_mp.backoff import backoff_delay
from kraite_mp.config import ConfigError, Settings, load_settings
from kraite_mp.supervisor.context import (
    CHILD_SIGNALS,
    ChildContext,
    heartbeat_dir,
    read_heartbeat,
    run_child,
    set_process_title,
)

if TYPE_CHECKING:
    from kraite_mp.store.accounts import Account

log = logging.getLogger(__name__)

Target = Callable[[ChildContext], int]

ROLE_USER_DATA = "user-data"
ROLE_MARK_PRICE = "mark-price"
ROLE_SYNC = "sync-orders"

#: Where each role's entry point lives; imported in the parent before the first fork.
DEFAULT_TARGETS: dict[str, str] = {
    ROLE_USER_DATA: "kraite_mp.streams.userdata:run_user_data_child",
    ROLE_MARK_PRICE: "kraite_mp.streams.markprice:run_mark_price_child",
    ROLE_SYNC: "kraite_mp.reconcile:run_sync_child",
}

#: The main loop wakes at least this often even when nothing is due.
TICK_S = 1.0
#: Title and status file are rewritten at most this often.
STATUS_INTERVAL_S = 1.0
#: ... and at least this often, so that a reader sees a fresh ``ts`` from a live supervisor.
STATUS_IDLE_INTERVAL_S = 5.0
#: Heartbeat files are checked every heartbeat_timeout_s / this, within the bounds below.
HEARTBEAT_CHECKS_PER_TIMEOUT = 10
HEARTBEAT_CHECK_MIN_S = 0.2
HEARTBEAT_CHECK_MAX_S = 5.0
#: After SIGKILL at shutdown, how long to wait for the kernel to hand back the children.
KILL_REAP_TIMEOUT_S = 5.0

STATUS_FILE = "supervisor.json"
LOCK_FILE = "supervisor.lock"

#: The signals the parent handles; handlers only queue them.
SIGNALS: tuple[int, ...] = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
SIG_NAMES: dict[int, str] = {s: signal.Signals(s).name.lower() for s in SIGNALS}


class ChildState(enum.StrEnum):
    #: Not started yet (new, or restarting after a requested stop): waits for a spawn token.
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    EXITED = "EXITED"


#: What to do once a child we asked to stop has exited.
AFTER_RESTART = "restart"  # respawn at once (new credentials, new account name)
AFTER_BACKOFF = "backoff"  # counts as a failure (stale heartbeat)
AFTER_REMOVE = "remove"  # forget it (account removed or deactivated)
AFTER_EXIT = "exit"  # leave it EXITED (one-shot timeout, shutdown)


@dataclass
class Child:
    """One supervised slot (an account's stream, the mark-price stream, the periodic sync)."""

    key: str
    role: str
    account: Account | None = None
    #: Runs to completion and is never restarted (the periodic sync).
    one_shot: bool = False
    state: ChildState = ChildState.PENDING
    pid: int | None = None
    #: time.monotonic() / time.time() of the last fork.
    spawned_at: float = 0.0
    spawned_wall: float = 0.0
    #: Consecutive failed starts: the backoff exponent. Reset after healthy_after_s of uptime.
    attempt: int = 0
    #: Forks after the first one.
    restarts: int = 0
    spawns: int = 0
    last_exit: str | None = None
    last_exit_code: int | None = None
    last_exit_wall: float | None = None
    #: time.monotonic() at which a PENDING/BACKOFF/FATAL child may be spawned.
    due_at: float = 0.0
    backoff_s: float | None = None
    fatal_reason: str | None = None
    after_stop: str | None = None
    stop_reason: str | None = None
    stop_deadline: float | None = None
    killed: bool = False

    @property
    def account_id(self) -> int | None:
        return self.account.id if self.account else None

    @property
    def label(self) -> str:
        """How log lines name a child: key plus account id, never a secret."""
        return f"{self.key} account={self.account.id}" if self.account else self.key

    @property
    def alive(self) -> bool:
        return self.pid is not None


class TokenBucket:
    """Spawn pacing: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate = max(rate_per_s, 1e-6)
        self.burst = max(burst, 1)
        self.tokens = float(self.burst)
        self.updated = now

    def configure(self, rate_per_s: float, burst: int) -> None:
        self.rate = max(rate_per_s, 1e-6)
        self.burst = max(burst, 1)
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds until the next token."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


def load_targets(spec: Mapping[str, str]) -> dict[str, Target]:
    """Import every entry point ("module:attr") now, in the parent, before any fork."""
    targets: dict[str, Target] = {}
    for role, path in spec.items():
        module_name, attr = path.split(":")
        targets[role] = getattr(importlib.import_module(module_name), attr)
    return targets


def describe_status(status: int) -> tuple[str, int | None]:
    """A waitpid status as text ("code 1 (error)", "signal SIGKILL") and the exit code (None if killed)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"signal {name}", None
    code = os.waitstatus_to_exitcode(status)
    return f"code {code} ({exitcodes.describe(code)})", code


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this run_dir's lock."""


class Arbiter:
    """The supervisor's parent process. ``run()`` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        targets: Mapping[str, Target] | None = None,
        config_path: str | None = None,
        log_level_override: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._targets_given = dict(targets) if targets is not None else None
        self.targets: dict[str, Target] = {}
        self.config_path = config_path
        self.log_level_override = log_level_override
        self.environ = environ
        self.children: dict[str, Child] = {}
        self.pids: dict[int, Child] = {}
        self.sig_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.pipe: tuple[int, int] | None = None
        self.lock_fd: int | None = None
        self.pid = os.getpid()
        self.stopping = False
        self.restarts = 0
        self.accounts_count = 0
        now = time.monotonic()
        self.started_wall = time.time()
        self.bucket = TokenBucket(settings.supervisor.spawn_rate_per_s, settings.supervisor.spawn_burst, now)
        self.next_refresh_at = now + settings.supervisor.accounts_refresh_s
        self.next_sync_at = now + settings.supervisor.sync_interval_s
        self.next_heartbeat_check_at = now
        self.stop_deadline: float | None = None
        self._last_title: str | None = None
        self._title_at = 0.0
        self._last_status_at = 0.0
        self._status_dirty = True
        self._warned_threads = False
        #: kraite_mp.ops.status (issue 7) when importable: Redis status for `kraite-mp status`, best effort.
        self._redis_status: Any = None

    # -- paths ------------------------------------------------------------------------------------
    @property
    def status_path(self) -> str:
        return os.path.join(self.settings.run_dir, STATUS_FILE)

    def heartbeat_path(self, child: Child) -> str:
        return os.path.join(heartbeat_dir(self.settings), f"{child.key}.json")

    # -- lifecycle --------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, loop until SIGTERM/SIGINT, stop the children; EXIT_OK, or EXIT_ERROR after a bug."""
        code = exitcodes.EXIT_OK
        self.start()
        try:
            try:
                while not self.stopping:
                    self.tick()
            except Exception:  # a bug here must not leave the children to PR_SET_PDEATHSIG alone
                log.exception("supervisor error: stopping the children")
                code = exitcodes.EXIT_ERROR
                if not self.stopping:
                    self.begin_shutdown("error")
            self.shutdown()
        finally:
            self.cleanup()
        return code

    def start(self) -> None:
        os.makedirs(heartbeat_dir(self.settings), exist_ok=True)
        self._acquire_lock()
        self.targets = self._targets_given if self._targets_given is not None else load_targets(DEFAULT_TARGETS)
        self._install_status_publisher()
        self._init_signals()
        log.info(
            "supervisor starting pid=%s shard=%s mark_price=%s spawn_rate=%.2f/s burst=%d",
            self.pid, self.settings.supervisor.shard, self.settings.supervisor.mark_price,
            self.settings.supervisor.spawn_rate_per_s, self.settings.supervisor.spawn_burst,
        )
        self._sync_mark_price_child()
        self.refresh_accounts("start")
        self.update_title(force=True)

    def _install_status_publisher(self) -> None:
        try:
            from kraite_mp.ops import status
        except ImportError:  # pragma: no cover - status is optional to the supervisor
            return
        try:
            status.install(self.settings)  # registers the child hook; connects nothing before the fork
        except Exception:  # noqa: BLE001 - status reporting never stops the supervisor
            log.warning("status publisher unavailable", exc_info=True)
            return
        self._redis_status = status

    def _redis_status_call(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self._redis_status is None:
            return
        try:
            getattr(self._redis_status, name)(*args, **kwargs)
        except Exception:  # noqa: BLE001
            log.debug("status %s failed", name, exc_info=True)

    def cleanup(self) -> None:
        self.write_status(force=True)
        self._redis_status_call("close_connection")
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if self.pipe:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _acquire_lock(self) -> None:
        path = os.path.join(self.settings.run_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another supervisor is running with run_dir {self.settings.run_dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.pid}\n".encode())
        self.lock_fd = fd

    # -- signals (gunicorn style: the handler only queues) -----------------------------------------
    def _init_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe = (read_fd, write_fd)
        for sig in SIGNALS:
            signal.signal(sig, self._signal)

    def _signal(self, signum: int, frame: object) -> None:
        self.sig_queue.put_nowait(signum)
        self.wakeup()

    def wakeup(self) -> None:
        if self.pipe is None:
            return
        try:
            os.write(self.pipe[1], b".")
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def sleep(self, timeout_s: float) -> None:
        """Wait for a signal (via the pipe) or the timeout."""
        assert self.pipe is not None
        try:
            ready, _, _ = select.select([self.pipe[0]], [], [], max(0.0, timeout_s))
            if ready:
                while os.read(self.pipe[0], 4096):
                    pass
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def dispatch_signals(self) -> None:
        while True:
            try:
                signum = self.sig_queue.get_nowait()
            except queue.Empty:
                return
            getattr(self, f"handle_{SIG_NAMES[signum]}")()

    def handle_sigchld(self) -> None:
        self.reap()

    def handle_sigterm(self) -> None:
        self.begin_shutdown("SIGTERM")

    def handle_sigint(self) -> None:
        self.begin_shutdown("SIGINT")

    def handle_sighup(self) -> None:
        if self.stopping:
            return
        log.info("SIGHUP: reloading configuration and accounts")
        self.reload_settings()
        self._sync_mark_price_child()
        self.refresh_accounts("SIGHUP")
        mark = self.children.get(ROLE_MARK_PRICE)
        if mark is not None and mark.pid is not None and mark.state != ChildState.STOPPING:
            self._kill(mark, signal.SIGHUP)
            log.info("forwarded SIGHUP to %s pid=%s", mark.label, mark.pid)

    # -- main loop --------------------------------------------------------------------------------
    def tick(self) -> None:
        self.sleep(self.next_wakeup_s())
        self.dispatch_signals()
        self.reap()
        if self.stopping:
            return
        now = time.monotonic()
        if now >= self.next_refresh_at:
            self.refresh_accounts("periodic")
        self.enforce_stop_deadlines(now)
        if now >= self.next_heartbeat_check_at:
            self.check_heartbeats(now)
        self.maybe_start_sync(now)
        self.spawn_due(time.monotonic())
        self.update_title()
        self.write_status()

    def next_wakeup_s(self) -> float:
        now = time.monotonic()
        wake = now + TICK_S
        waiting = False
        for child in self.children.values():
            if child.pid is None and child.state in (ChildState.PENDING, ChildState.BACKOFF, ChildState.FATAL):
                if child.due_at <= now:
                    waiting = True
                wake = min(wake, child.due_at)
            if child.stop_deadline is not None and not child.killed:
                wake = min(wake, child.stop_deadline)
        if waiting:
            wake = min(wake, now + self.bucket.wait_s(now))
        if self.stop_deadline is not None:
            wake = min(wake, self.stop_deadline)
        if not self.stopping:
            wake = min(wake, self.next_refresh_at, self.next_heartbeat_check_at)
            if self.settings.supervisor.sync_interval_s > 0:
                wake = min(wake, self.next_sync_at)
            sync = self.children.get(ROLE_SYNC)
            if sync is not None and sync.pid is not None and sync.state != ChildState.STOPPING:
                wake = min(wake, sync.spawned_at + self.settings.supervisor.sync_timeout_s)
        return max(0.0, wake - now)

    # -- desired children -------------------------------------------------------------------------
    def _sync_mark_price_child(self) -> None:
        child = self.children.get(ROLE_MARK_PRICE)
        if self.settings.supervisor.mark_price and child is None:
            self.children[ROLE_MARK_PRICE] = Child(key=ROLE_MARK_PRICE, role=ROLE_MARK_PRICE, due_at=time.monotonic())
        elif self.settings.supervisor.mark_price and child is not None and child.after_stop == AFTER_REMOVE:
            child.after_stop = AFTER_RESTART  # re-enabled while it was stopping
        elif not self.settings.supervisor.mark_price and child is not None:
            self.stop_child(child, AFTER_REMOVE, "mark_price disabled")

    def refresh_accounts(self, reason: str) -> None:
        """Converge the user-data children on the owned accounts; keep everything if the DB is down."""
        self.next_refresh_at = time.monotonic() + self.settings.supervisor.accounts_refresh_s
        accounts = self._read_accounts()
        if accounts is None:
            return
        self.accounts_count = len(accounts)
        wanted = {f"{ROLE_USER_DATA}-{a.id}": a for a in accounts}
        added = removed = changed = 0
        now = time.monotonic()
        for key, child in list(self.children.items()):
            if child.role != ROLE_USER_DATA:
                continue
            account = wanted.get(key)
            if account is None:
                if child.after_stop != AFTER_REMOVE:
                    removed += 1
                    self.stop_child(child, AFTER_REMOVE, "account removed or deactivated")
            elif child.account is None or account.fingerprint != child.account.fingerprint:
                changed += 1
                child.account = account
                child.attempt = 0
                if child.pid is not None:
                    self.stop_child(child, AFTER_RESTART, "account changed")
                else:  # also ends a FATAL wait: new credentials deserve a try now
                    self._set_pending(child, now)
            elif child.after_stop == AFTER_REMOVE:  # came back while stopping
                child.after_stop = AFTER_RESTART
        for key, account in wanted.items():
            if key not in self.children:
                added += 1
                self.children[key] = Child(key=key, role=ROLE_USER_DATA, account=account, due_at=now)
        self._status_dirty = True
        if added or removed or changed or reason != "periodic":
            log.info("accounts (%s): %d owned, %d new, %d removed, %d changed", reason, len(accounts), added,
                     removed, changed)

    def _read_accounts(self) -> list[Account] | None:
        import psycopg2

        from kraite_mp.store.db import DatabaseUnavailable, connect
        from kraite_mp.supervisor.ownership import owned_accounts

        try:
            conn = connect(self.settings.database_url, application_name="kraite-mp supervisor")
        except DatabaseUnavailable as e:
            log.warning("cannot read accounts, keeping the current children: %s", e)
            return None
        try:
            return owned_accounts(conn, self.settings)
        except (psycopg2.Error, ValueError) as e:
            log.warning("cannot read accounts, keeping the current children: %s: %s", type(e).__name__,
                        str(e).strip().splitlines()[0] if str(e).strip() else "")
            return None
        finally:
            conn.close()  # never let a connection cross a fork

    def reload_settings(self) -> None:
        try:
            new = load_settings(self.config_path, self.environ if self.environ is not None else os.environ)
        except ConfigError as e:
            log.error("reload: configuration error, keeping the previous settings: %s", e)
            return
        if self.log_level_override:
            new.log_level = self.log_level_override.upper()
        if new.run_dir != self.settings.run_dir:
            log.warning("reload: run_dir cannot change while running; keeping %s", self.settings.run_dir)
            new.run_dir = self.settings.run_dir
        logging.getLogger().setLevel(new.log_level)
        self.settings = new
        self.bucket.configure(new.supervisor.spawn_rate_per_s, new.supervisor.spawn_burst)
        self.next_sync_at = min(self.next_sync_at, time.monotonic() + new.supervisor.sync_interval_s)
        log.info("reloaded configuration from %s (new children use it; running ones keep theirs)", new.source)

    # -- spawning ---------------------------------------------------------------------------------
    def _set_pending(self, child: Child, now: float) -> None:
        child.state = ChildState.PENDING
        child.due_at = now
        child.backoff_s = None
        child.fatal_reason = None
        self._status_dirty = True

    def spawn_due(self, now: float) -> None:
        due = [
            c for c in self.children.values()
            if c.pid is None and c.state in (ChildState.PENDING, ChildState.BACKOFF, ChildState.FATAL)
            and c.due_at <= now
        ]
        due.sort(key=lambda c: c.due_at)
        for child in due:
            if not self.bucket.take(now):
                return
            self.spawn(child)

    def spawn(self, child: Child) -> None:
        """Fork one child. The child never returns into this stack: it leaves through ``os._exit``."""
        target = self.targets[child.role]
        ctx = ChildContext(self.settings, child.role, child.account, key=child.key)
        if threading.active_count() > 1 and not self._warned_threads:
            self._warned_threads = True  # a thread's locks would be copied held into every child
            log.error("the supervisor has %d threads; forking is unsafe", threading.active_count())
        self._redis_status_call("close_connection")  # no socket crosses the fork
        gc.collect()
        gc.freeze()  # objects allocated so far are never touched by the collector: pages stay shared
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.error("fork failed for %s: %s", child.label, e)
            self._schedule_backoff(child, time.monotonic(), f"fork failed: {e}")
            return
        if pid == 0:  # pragma: no cover - runs in the child (covered by the e2e tests)
            code = exitcodes.EXIT_ERROR
            try:
                self._become_child()
                code = run_child(ctx, target)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        now = time.monotonic()
        if child.spawns:
            child.restarts += 1
            if not child.one_shot:
                self.restarts += 1
        child.spawns += 1
        child.pid = pid
        child.state = ChildState.STARTING
        child.spawned_at = now
        child.spawned_wall = time.time()
        child.backoff_s = None
        child.killed = False
        child.stop_deadline = None
        child.after_stop = None
        child.stop_reason = None
        self.pids[pid] = child
        self._status_dirty = True
        log.info("spawned %s pid=%s (spawn #%d)", child.label, pid, child.spawns)

    def _become_child(self) -> None:  # pragma: no cover - runs in the child
        """Drop the parent's machinery in a fresh child (signals stay blocked until after_fork)."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in (*(self.pipe or ()), self.lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pipe = None
        self.lock_fd = None
        self.children = {}
        self.pids = {}

    # -- exits ------------------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.pids.pop(pid, None)
            if child is not None:
                self.child_exited(child, pid, status)

    def child_exited(self, child: Child, pid: int, status: int) -> None:
        now = time.monotonic()
        text, code = describe_status(status)
        uptime = now - child.spawned_at
        child.pid = None
        child.last_exit = text
        child.last_exit_code = code
        child.last_exit_wall = time.time()
        child.stop_deadline = None
        after, reason = child.after_stop, child.stop_reason
        child.after_stop = child.stop_reason = None
        self._status_dirty = True
        if self.stopping or after == AFTER_EXIT:
            child.state = ChildState.EXITED
            log.info("%s pid=%s exited with %s after %.1fs", child.label, pid, text, uptime)
            return
        if after == AFTER_REMOVE:
            self._forget(child)
            log.info("%s pid=%s exited with %s after %.1fs; stopped (%s)", child.label, pid, text, uptime, reason)
            return
        if after == AFTER_RESTART:
            child.attempt = 0
            self._set_pending(child, now)
            log.info("%s pid=%s exited with %s after %.1fs; restarting (%s)", child.label, pid, text, uptime, reason)
            return
        if child.one_shot:
            child.state = ChildState.EXITED
            level = logging.INFO if code == exitcodes.EXIT_OK else logging.WARNING
            log.log(level, "%s pid=%s exited with %s after %.1fs", child.label, pid, text, uptime)
            return
        if code in exitcodes.FATAL_EXIT_CODES and after is None:
            self._set_fatal(child, pid, now, text)
            return
        if uptime >= self.settings.supervisor.healthy_after_s:
            child.attempt = 0
        why = f"{text} after {uptime:.1f}s" + (f" ({reason})" if reason else "")
        self._schedule_backoff(child, now, why, pid)

    def _schedule_backoff(self, child: Child, now: float, why: str, pid: int | None = None) -> None:
        sup = self.settings.supervisor
        delay = backoff_delay(child.attempt, base_s=sup.backoff_base_s, cap_exponent=sup.backoff_cap_exponent,
                              jitter_ratio=sup.backoff_jitter_ratio)
        child.attempt += 1
        child.state = ChildState.BACKOFF
        child.due_at = now + delay
        child.backoff_s = delay
        self._status_dirty = True
        log.warning("%s pid=%s exited with %s; restarting in %.3fs (backoff attempt %d)", child.label, pid, why,
                    delay, child.attempt)

    def _set_fatal(self, child: Child, pid: int, now: float, text: str) -> None:
        beat = read_heartbeat(self.heartbeat_path(child))
        reason = beat.get("error") if beat and beat.get("pid") == pid else None
        child.fatal_reason = str(reason) if reason else text
        child.state = ChildState.FATAL
        child.due_at = now + self.settings.supervisor.fatal_retry_s
        child.backoff_s = self.settings.supervisor.fatal_retry_s
        child.attempt = 0
        log.error("%s pid=%s exited with %s: FATAL (%s); next try in %.0fs", child.label, pid, text,
                  child.fatal_reason, self.settings.supervisor.fatal_retry_s)

    def _forget(self, child: Child) -> None:
        """A child stopped on purpose: drop it, its heartbeat file and its Redis status entry."""
        del self.children[child.key]
        try:
            os.unlink(self.heartbeat_path(child))
        except FileNotFoundError:
            pass
        self._redis_status_call("remove_status", self.settings, child.key)

    # -- stopping ---------------------------------------------------------------------------------
    def _kill(self, child: Child, sig: int) -> None:
        # only pids not yet reaped are signalled, so a recycled pid is never hit
        if child.pid is None:
            return
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def stop_child(self, child: Child, after: str, reason: str) -> None:
        """SIGTERM now, SIGKILL after graceful_timeout_s; then ``after`` decides what comes next."""
        if child.pid is None:
            if after == AFTER_REMOVE:
                self._forget(child)
                log.info("%s stopped (%s)", child.label, reason)
            elif after == AFTER_RESTART:
                self._set_pending(child, time.monotonic())
            return
        child.after_stop, child.stop_reason = after, reason
        if child.state == ChildState.STOPPING:
            return
        child.state = ChildState.STOPPING
        child.stop_deadline = time.monotonic() + self.settings.supervisor.graceful_timeout_s
        self._status_dirty = True
        log.info("stopping %s pid=%s (%s)", child.label, child.pid, reason)
        self._kill(child, signal.SIGTERM)

    def enforce_stop_deadlines(self, now: float) -> None:
        for child in list(self.pids.values()):
            if child.stop_deadline is not None and not child.killed and now >= child.stop_deadline:
                child.killed = True
                log.warning("%s pid=%s did not stop within %.0fs: SIGKILL", child.label, child.pid,
                            self.settings.supervisor.graceful_timeout_s)
                self._kill(child, signal.SIGKILL)

    def check_heartbeats(self, now: float) -> None:
        sup = self.settings.supervisor
        interval = sup.heartbeat_timeout_s / HEARTBEAT_CHECKS_PER_TIMEOUT
        self.next_heartbeat_check_at = now + min(HEARTBEAT_CHECK_MAX_S, max(HEARTBEAT_CHECK_MIN_S, interval))
        wall = time.time()
        for child in list(self.pids.values()):
            if child.state not in (ChildState.STARTING, ChildState.RUNNING):
                continue
            path = self.heartbeat_path(child)
            try:
                mtime = os.stat(path).st_mtime  # a stat per child, no read: cheap at 500 children
            except OSError:
                mtime = 0.0
            fresh = mtime >= child.spawned_wall
            if child.state == ChildState.STARTING and fresh:
                beat = read_heartbeat(path)
                if beat and beat.get("pid") == child.pid and beat.get("state") not in (None, "starting"):
                    child.state = ChildState.RUNNING
                    self._status_dirty = True
                    log.info("%s pid=%s running (state=%s)", child.label, child.pid, beat.get("state"))
            if child.one_shot:
                continue  # bounded by sync_timeout_s instead
            silent = wall - max(mtime, child.spawned_wall)
            if silent > sup.heartbeat_timeout_s:
                log.warning("%s pid=%s heartbeat stale for %.1fs (timeout %.0fs)", child.label, child.pid, silent,
                            sup.heartbeat_timeout_s)
                self.stop_child(child, AFTER_BACKOFF, "heartbeat stale")

    # -- periodic sync ----------------------------------------------------------------------------
    def maybe_start_sync(self, now: float) -> None:
        sup = self.settings.supervisor
        child = self.children.get(ROLE_SYNC)
        if child is not None and child.pid is not None and child.state != ChildState.STOPPING:
            if now - child.spawned_at > sup.sync_timeout_s:
                log.warning("%s pid=%s still running after %.0fs: stopping it", child.label, child.pid,
                            sup.sync_timeout_s)
                self.stop_child(child, AFTER_EXIT, "sync timeout")
        if sup.sync_interval_s <= 0 or now < self.next_sync_at:
            return
        self.next_sync_at = now + sup.sync_interval_s
        if ROLE_SYNC not in self.targets:
            return
        if child is not None and child.pid is not None:
            log.warning("%s pid=%s from the previous interval is still running: not starting another",
                        child.label, child.pid)
            return
        if child is None:
            child = self.children[ROLE_SYNC] = Child(key=ROLE_SYNC, role=ROLE_SYNC, one_shot=True)
        self.spawn(child)  # REST only, no WebSocket: not paced by the spawn bucket

    # -- shutdown ---------------------------------------------------------------------------------
    def begin_shutdown(self, reason: str) -> None:
        if self.stopping:
            # a second SIGTERM/SIGINT: do not wait for the graceful timeout
            log.warning("%s during shutdown: killing the remaining children", reason)
            for child in list(self.pids.values()):
                child.killed = True
                self._kill(child, signal.SIGKILL)
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.supervisor.graceful_timeout_s
        log.info("%s: stopping %d children (graceful timeout %.0fs)", reason, len(self.pids),
                 self.settings.supervisor.graceful_timeout_s)
        for child in self.children.values():
            if child.pid is None:
                child.state = ChildState.EXITED
            else:
                child.state = ChildState.STOPPING
                self._kill(child, signal.SIGTERM)
        self._status_dirty = True

    def shutdown(self) -> None:
        """Wait for the children after begin_shutdown; SIGKILL what outlives the graceful timeout."""
        assert self.stop_deadline is not None
        while self.pids and time.monotonic() < self.stop_deadline:
            self.update_title()
            self.write_status()
            self.sleep(min(TICK_S, max(0.0, self.stop_deadline - time.monotonic())))
            self.dispatch_signals()
            self.reap()
        if self.pids:
            log.warning("%d children did not stop within %.0fs: SIGKILL", len(self.pids),
                        self.settings.supervisor.graceful_timeout_s)
            for child in list(self.pids.values()):
                child.killed = True
                self._kill(child, signal.SIGKILL)
            deadline = time.monotonic() + KILL_REAP_TIMEOUT_S
            while self.pids and time.monotonic() < deadline:
                self.sleep(0.05)
                self.reap()
        log.info("supervisor stopped (restarts=%d)", self.restarts)

    # -- reporting --------------------------------------------------------------------------------
    def title(self) -> str:
        return (f"kraite-mp: supervisor accounts={self.accounts_count} children={len(self.pids)} "
                f"restarts={self.restarts}" + (" stopping" if self.stopping else ""))

    def update_title(self, force: bool = False) -> None:
        title = self.title()
        if force or title != self._last_title:
            now = time.monotonic()
            if force or now - self._title_at >= STATUS_INTERVAL_S:
                self._title_at = now
                self._last_title = title
                set_process_title(title)

    def status(self) -> dict[str, Any]:
        mono, wall = time.monotonic(), time.time()

        def to_wall(t: float) -> float:
            return round(wall + (t - mono), 3)

        children = []
        for c in self.children.values():
            waiting = c.pid is None and c.state in (ChildState.BACKOFF, ChildState.FATAL, ChildState.PENDING)
            children.append({
                "key": c.key,
                "role": c.role,
                "account_id": c.account_id,
                "account_name": c.account.name if c.account else None,
                "pid": c.pid,
                "state": c.state.value,
                "started_at": round(c.spawned_wall, 3) if c.spawns else None,
                "spawns": c.spawns,
                "restarts": c.restarts,
                "attempt": c.attempt,
                "last_exit": c.last_exit,
                "last_exit_code": c.last_exit_code,
                "last_exit_at": c.last_exit_wall,
                "backoff_s": c.backoff_s,
                "backoff_until": to_wall(c.due_at) if waiting else None,
                "fatal_reason": c.fatal_reason,
            })
        return {
            "pid": self.pid,
            "state": "stopping" if self.stopping else "running",
            "started": round(self.started_wall, 3),
            "ts": round(wall, 3),
            "accounts": self.accounts_count,
            "children_alive": len(self.pids),
            "restarts": self.restarts,
            "children": children,
        }

    def write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        age = now - self._last_status_at
        if not force and (age < STATUS_INTERVAL_S or (not self._status_dirty and age < STATUS_IDLE_INTERVAL_S)):
            return
        self._last_status_at = now
        self._status_dirty = False
        data = self.status()
        if force and not self.pids and self.stopping:
            data["state"] = "stopped"
        self._redis_status_call("publish_supervisor", self.settings, data, force=force)
        tmp = f"{self.status_path}.{self.pid}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.status_path)
        except OSError as e:
            log.warning("cannot write %s: %s", self.status_path, e)


def read_status(run_dir: str) -> dict[str, Any] | None:
    """The supervisor's last status snapshot (``<run_dir>/supervisor.json``), or None."""
    try:
        with open(os.path.join(run_dir, STATUS_FILE)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


