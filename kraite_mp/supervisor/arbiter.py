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
it. Forks are paced by a token bucket (the host's start-up CPU); connection attempts, which Binance
counts per IP, by the egress's connection budget (``binance.connections``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kraite_mp import exitcodes, metrics
from kraite_mp.config import ConfigError, Settings, load_settings
from kraite_mp.supervisor import ownership, process, runfiles
from kraite_mp.supervisor.context import (
    CHILD_SIGNALS,
    ChildContext,
    Target,
    load_targets,
    run_child,
    set_process_title,
)
from kraite_mp.supervisor.forkserver import ForkServer, become_subreaper
from kraite_mp.supervisor.process import WAITING_STATES, AfterStop, Child, ChildState, change_state
from kraite_mp.supervisor.publish import Reporters
from kraite_mp.supervisor.runfiles import ROLE_MARK_PRICE, ROLE_METRICS, ROLE_SYNC, ROLE_USER_DATA
from kraite_mp.supervisor.signals import SignalQueue

if TYPE_CHECKING:
    from kraite_mp.store.accounts import Account

log = logging.getLogger(__name__)

#: Where each role's entry point lives; imported in the parent before the first fork.
DEFAULT_TARGETS: dict[str, str] = {
    ROLE_USER_DATA: "kraite_mp.streams.userdata:run_user_data_child",
    ROLE_MARK_PRICE: "kraite_mp.streams.markprice:run_mark_price_child",
    ROLE_SYNC: "kraite_mp.reconcile.runner:run_sync_child",
    ROLE_METRICS: "kraite_mp.supervisor.metrics_child:run_metrics_child",
}

#: The main loop wakes at least this often even when nothing is due.
TICK_S = 1.0
#: Title and status file are rewritten at most this often.
STATUS_INTERVAL_S = 1.0
#: ... and at least this often, so that a reader sees a fresh ``ts`` from a live supervisor.
STATUS_IDLE_INTERVAL_S = 5.0
#: The fork server is started (again, after it died) at most this often; then children are forked here.
FORK_SERVER_STARTS = 5
#: One pass of the loop forks for this long at most, then renews leases, reaps, ... before forking on.
SPAWN_SLICE_S = 0.5
#: Heartbeat files are checked every heartbeat_timeout_s / this, within the bounds below.
HEARTBEAT_CHECKS_PER_TIMEOUT = 10
HEARTBEAT_CHECK_MIN_S = 0.2
HEARTBEAT_CHECK_MAX_S = 5.0
#: After SIGKILL at shutdown, how long to wait for the kernel to hand back the children.
KILL_REAP_TIMEOUT_S = 5.0


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
        reporters: Reporters | None = None,
    ) -> None:
        self.settings = settings
        self._targets_given = dict(targets) if targets is not None else None
        self.targets: dict[str, Target] = {}
        self.config_path = config_path
        self.log_level_override = log_level_override
        self.environ = environ
        self.children: dict[str, Child] = {}
        self.pids: dict[int, Child] = {}
        #: Where user-data children are forked from (``supervisor.fork_server``); None: forked here.
        self.fork_server: ForkServer | None = None
        self._fork_server_starts = 0
        self.signals = SignalQueue()
        self.lock_fd: int | None = None
        self.pid = os.getpid()
        self.stopping = False
        self.restarts = 0
        self.accounts_count = 0
        #: ``supervisor.ownership = "fleet"``: the hosts share the accounts (the active ones, read from
        #: PostgreSQL, are ``fleet_accounts``; the fleet's view says which are streamed here).
        self.fleet = ownership.fleet_from_settings(settings)
        self.fleet_accounts: list[Account] = []
        now, sup = time.monotonic(), settings.supervisor
        self.started_wall = time.time()
        self.bucket = process.TokenBucket(sup.spawn_rate_per_s, sup.spawn_burst, now)
        self.next_refresh_at = now + sup.accounts_refresh_s
        self.next_sync_at = now + sup.sync_interval_s
        self.next_heartbeat_check_at = now
        self.stop_deadline: float | None = None
        self._last_title: str | None = None
        self._title_at = 0.0
        self._last_status_at = 0.0
        self._status_dirty = True
        self._warned_threads = False
        #: Status hooks (best effort; none by default): called here and handed to every child.
        self.reporters = reporters if reporters is not None else Reporters()

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
        os.makedirs(runfiles.heartbeat_dir(self.settings.run_dir), exist_ok=True)
        self.lock_fd = runfiles.acquire_lock(self.settings.run_dir, self.pid)
        given = self._targets_given
        ownership.prepare_metrics(self.settings)  # before anything imports prometheus_client
        self.targets = given if given is not None else load_targets(DEFAULT_TARGETS)
        if given is None:  # the real supervisor (tests that give targets run it inside pytest)
            process.prepare_to_fork(self.settings)
            if self.settings.supervisor.fork_server:
                self._start_fork_server()
        self.signals.install()
        sup = self.settings.supervisor
        msg = "supervisor starting pid=%s shard=%s mark_price=%s spawn_rate=%.2f/s burst=%d"
        log.info(msg, self.pid, sup.shard, sup.mark_price, sup.spawn_rate_per_s, sup.spawn_burst)
        self._sync_mark_price_child()
        ownership.converge_metrics(self.children, self.settings, time.monotonic(), self.stop_child)
        self.refresh_accounts("start")
        self.update_title(force=True)

    def cleanup(self) -> None:
        if self.fork_server is not None:
            pid = self.fork_server.pid
            self.fork_server.stop()
            if pid is not None:
                try:
                    os.waitpid(pid, 0)  # SIGKILLed: at once
                except ChildProcessError:
                    pass
        self.write_status(force=True)
        self.reporters.on_shutdown()
        self.signals.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # -- signals (gunicorn style: the handler only queues) -----------------------------------------
    def sleep(self, timeout_s: float) -> None:
        self.signals.wait(timeout_s)

    def dispatch_signals(self) -> None:
        for name in self.signals.pending():
            getattr(self, f"handle_{name}")()

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
        ownership.converge_metrics(self.children, self.settings, time.monotonic(), self.stop_child)
        self.refresh_accounts("SIGHUP")
        self.retry_fatal(lambda child: True, "SIGHUP")
        mark = self.children.get(ROLE_MARK_PRICE)
        if mark is not None and mark.pid is not None and mark.state != ChildState.STOPPING:
            mark.kill(signal.SIGHUP)
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
            gc.collect()  # the parent's own garbage, between forks (its collector is off)
        elif self.fleet is not None and now >= self.fleet.next_step_at:
            self.fleet_step("periodic")
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
            if child.pid is None and child.state in WAITING_STATES:
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
            if self.fleet is not None:
                wake = min(wake, self.fleet.next_step_at)
            if self.settings.supervisor.sync_interval_s > 0:
                wake = min(wake, self.next_sync_at)
            sync = self.children.get(ROLE_SYNC)
            if sync is not None and sync.pid is not None and sync.state != ChildState.STOPPING:
                wake = min(wake, sync.spawned_at + self.settings.supervisor.sync_timeout_s)
        return max(0.0, wake - now)

    # -- desired children -------------------------------------------------------------------------
    def _sync_mark_price_child(self) -> None:
        run = self.settings.supervisor.mark_price if self.fleet is None else self.fleet.view.lead_mark_price
        ownership.converge_mark_price(
            self.children, self.settings, time.monotonic(), self.stop_child, run=run
        )

    def fleet_step(self, reason: str) -> None:
        """Fleet ownership: renew membership and leases, then follow what the fleet says is ours."""
        assert self.fleet is not None
        streaming = {
            c.account.id for c in self.children.values() if c.account is not None and c.pid is not None
        }
        view = self.fleet.step(
            [a.id for a in self.fleet_accounts], streaming, may_lead=self.settings.supervisor.mark_price
        )
        if not view.ok:
            return  # Redis unreachable: keep streaming what is owned, take nothing new
        owned = [a for a in self.fleet_accounts if a.id in view.owned]
        counts = ownership.converge_accounts(self.children, owned, time.monotonic(), self.stop_child)
        self._sync_mark_price_child()
        self.accounts_count = len(owned)
        if any(counts) or reason != "periodic":
            msg = "fleet (%s): %d member(s), %d of %d accounts here, %d new, %d removed, %d changed%s"
            lead = ", mark-price leader" if view.lead_mark_price else ""
            log.info(msg, reason, len(view.members), len(owned), len(self.fleet_accounts), *counts, lead)
        self._status_dirty = True

    def refresh_accounts(self, reason: str) -> None:
        """Converge the user-data children on the owned accounts; keep everything if the DB is down."""
        self.next_refresh_at = time.monotonic() + self.settings.supervisor.accounts_refresh_s
        accounts = self._read_accounts()
        if accounts is None:
            return
        self.accounts_count = len(accounts)
        if self.fleet is not None:
            self.fleet_accounts = accounts
            self.fleet_step(reason)
            counts = (0, 0, 0)
        else:
            counts = ownership.converge_accounts(self.children, accounts, time.monotonic(), self.stop_child)
        # `accounts enable` cleared the error the child recorded before exiting 77: retry now, not after
        # fatal_retry_s (an account that is still marked keeps waiting)
        cleared = {runfiles.child_key(ROLE_USER_DATA, a.id) for a in accounts if a.credentials_error is None}
        self.retry_fatal(
            lambda c: c.key in cleared and c.last_exit_code == exitcodes.EXIT_FATAL_CREDENTIALS,
            "credentials cleared",
        )
        self._status_dirty = True
        if self.fleet is None and (any(counts) or reason != "periodic"):
            msg = "accounts (%s): %d owned, %d new, %d removed, %d changed"
            log.info(msg, reason, len(accounts), *counts)

    def retry_fatal(self, which: Callable[[Child], bool], reason: str) -> None:
        """Make the FATAL children ``which`` selects due now (the operator fixed something)."""
        now = time.monotonic()
        for child in self.children.values():
            if child.pid is None and child.state == ChildState.FATAL and which(child):
                child.attempt = 0
                change_state(child, ChildState.PENDING, now)
                self._status_dirty = True
                log.info("%s: retrying FATAL %s now", reason, child.label)

    def _read_accounts(self) -> list[Account] | None:
        try:
            return ownership.read_owned_accounts(self.settings)
        except ownership.AccountsUnavailable as e:
            log.warning("cannot read accounts, keeping the current children: %s", e)
            return None

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
    def spawn_due(self, now: float) -> None:
        """Fork what is due, as the spawn bucket allows, for ``SPAWN_SLICE_S`` at most: a burst of a hundred
        forks on a loaded host took 13 s, longer than the fleet's leases live, and the loop renews them."""
        due = [c for c in self.children.values() if c.state in WAITING_STATES and not c.alive]
        due = [c for c in due if c.due_at <= now]
        slice_ends = time.monotonic() + SPAWN_SLICE_S
        # the mark-price stream first: every account's trading depends on it, and a host that takes the
        # lead (its leader died) would otherwise spawn it after the accounts it took over in the same step
        for child in sorted(due, key=lambda c: (c.role != ROLE_MARK_PRICE, c.due_at)):
            if time.monotonic() >= slice_ends:
                return  # the rest next pass (due now: the loop comes straight back), after the fleet's step
            if not self.bucket.take(now):
                return
            self.spawn(child)

    # -- the fork server ---------------------------------------------------------------------------
    @contextmanager
    def _signals_blocked(self) -> Iterator[None]:
        """The children's signals blocked around a fork: none reaches the parent's handlers in the child."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _start_fork_server(self) -> None:
        """Start (or restart) the fork server, at most ``FORK_SERVER_STARTS`` times; without one, or
        without subreaping, children are forked here."""
        if self._fork_server_starts >= FORK_SERVER_STARTS:
            if self.fork_server is not None:
                log.error(
                    "fork server started %d times; the supervisor forks its children itself",
                    FORK_SERVER_STARTS,
                )
            self.fork_server = None
            return
        if self.fork_server is None:
            if not become_subreaper():
                log.warning("PR_SET_CHILD_SUBREAPER unavailable: no fork server, children are forked here")
                return
            self.fork_server = ForkServer(self.settings, self.targets, self.reporters, self._become_child)
        self._fork_server_starts += 1
        self.fork_server.settings = self.settings  # what the server starts with (restarted after a reload)
        if not self.fork_server.start(self._signals_blocked):
            self.fork_server = None

    def _spawn_from_fork_server(self, child: Child) -> int | None:
        if self.fork_server is None or child.role != ROLE_USER_DATA:
            return None
        if not self.fork_server.running:
            self._start_fork_server()
            if self.fork_server is None:
                return None
        pid = self.fork_server.spawn(self.settings, child.role, child.account, child.key)
        if pid is None and self.fork_server.failure == "timeout":  # hung: fork here from now on
            log.error("fork server failed for %s; the supervisor forks its children itself", child.label)
            self._fork_server_starts = FORK_SERVER_STARTS
        # "gone": this child is forked here, the server is reaped and started again at the next spawn;
        # "fork": no process could be made, this child's fork here most likely fails too (then backoff)
        return pid

    def spawn(self, child: Child) -> None:
        """Fork one child (from the fork server, for a user-data child, when it runs). A child forked here
        never returns into this stack: it leaves through ``os._exit``."""
        pid = self._spawn_from_fork_server(child)
        if pid is not None:
            self._spawned(child, pid)
            return
        target = self.targets[child.role]
        ctx = ChildContext(self.settings, child.role, child.account, key=child.key, reporters=self.reporters)
        if threading.active_count() > 1 and not self._warned_threads:
            self._warned_threads = True  # a thread's locks would be copied held into every child
            log.error("the supervisor has %d threads; forking is unsafe", threading.active_count())
        self.reporters.before_fork()  # no socket crosses the fork
        # (the parent runs with the collector off, see process.prepare_to_fork: no collection before the
        # fork frees holes in shared pages for the child to write into)
        gc.freeze()  # objects allocated so far are never touched by the collector: pages stay shared
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.error("fork failed for %s: %s", child.label, e)
            process.schedule_backoff(child, time.monotonic(), self.settings, f"fork failed: {e}")
            return
        if pid == 0:  # pragma: no cover - runs in the child (covered by the e2e tests)
            code = exitcodes.EXIT_ERROR
            try:
                self._become_child()
                code = run_child(ctx, target)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._spawned(child, pid)

    def _spawned(self, child: Child, pid: int) -> None:
        now = time.monotonic()
        if child.spawns:
            child.restarts += 1
            if not child.one_shot:
                self.restarts += 1
                metrics.series().CHILD_RESTARTS.labels(child.role).inc()
        child.spawns += 1
        child.pid = pid
        change_state(child, ChildState.STARTING, now)
        self.pids[pid] = child
        log.info("spawned %s pid=%s (spawn #%d)", child.label, pid, child.spawns)

    def _become_child(self) -> None:  # pragma: no cover - runs in the child
        """Drop the parent's machinery in a fresh child (signals stay blocked until after_fork)."""
        self.signals.close()
        if self.lock_fd is not None:
            try:
                os.close(self.lock_fd)
            except OSError:
                pass
        self.lock_fd = None
        self.children = {}
        self.pids = {}
        if self.fork_server is not None:
            self.fork_server.close_in_child()
            self.fork_server = None
        gc.enable()  # the child collects its own garbage; the frozen parent objects stay untouched

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
            metrics.process_dead(pid)
            if child is None and self.fork_server is not None:
                self.fork_server.reaped(pid, process.describe_status(status)[0])
            if child is not None:
                self.child_exited(child, pid, status)

    def child_exited(self, child: Child, pid: int, status: int) -> None:
        self._status_dirty = True
        if self.reporters.relays_child_beats:
            self._relay_last_beat(child, pid)
        if process.finish(child, pid, status, self.settings, stopping=self.stopping):
            self._forget(child)

    def _forget(self, child: Child) -> None:
        """A child stopped on purpose: drop it, its heartbeat file and its Redis status entry."""
        del self.children[child.key]
        runfiles.remove_heartbeat(self.settings.run_dir, child.key)
        self.reporters.on_forget(self.settings, child.key)

    # -- stopping ---------------------------------------------------------------------------------
    def stop_child(self, child: Child, after: AfterStop, reason: str) -> None:
        """SIGTERM now, SIGKILL after graceful_timeout_s; then ``after`` decides what comes next."""
        if child.pid is not None:
            graceful_s = self.settings.supervisor.graceful_timeout_s
            process.begin_stop(child, after, reason, time.monotonic(), graceful_s)
        elif after is AfterStop.REMOVE:
            self._forget(child)
            log.info("%s stopped (%s)", child.label, reason)
        elif after is AfterStop.RESTART:
            change_state(child, ChildState.PENDING, time.monotonic())

    def enforce_stop_deadlines(self, now: float) -> None:
        graceful_s = self.settings.supervisor.graceful_timeout_s
        for child in list(self.pids.values()):
            if child.stop_deadline is not None and not child.killed and now >= child.stop_deadline:
                log.warning(
                    "%s pid=%s did not stop within %.0fs: SIGKILL", child.label, child.pid, graceful_s
                )
                self._kill_now([child])

    def _kill_now(self, children: list[Child]) -> None:
        for child in children:
            child.killed = True
            child.kill(signal.SIGKILL)

    def check_heartbeats(self, now: float) -> None:
        sup = self.settings.supervisor
        interval = sup.heartbeat_timeout_s / HEARTBEAT_CHECKS_PER_TIMEOUT
        self.next_heartbeat_check_at = now + min(HEARTBEAT_CHECK_MAX_S, max(HEARTBEAT_CHECK_MIN_S, interval))
        wall = time.time()
        for child in list(self.pids.values()):
            if child.state in (ChildState.STARTING, ChildState.RUNNING) and process.check_heartbeat(
                child, self.settings.run_dir, now, wall, sup.heartbeat_timeout_s
            ):
                self.stop_child(child, AfterStop.BACKOFF, "heartbeat stale")
        if self.reporters.relays_child_beats:
            self.relay_beats()

    def relay_beats(self) -> None:
        """Hand the heartbeats written since the last check to the status reporters, all at once: the
        children publish nothing themselves (``RedisStatus(relay_children=True)``)."""
        run_dir = self.settings.run_dir
        found = (process.unrelayed_beat(c, run_dir, c.pid, c.heartbeat_mtime) for c in self.pids.values())
        beats = [beat for beat in found if beat is not None]
        if beats:
            self.reporters.on_child_beats(self.settings, beats)

    def _relay_last_beat(self, child: Child, pid: int) -> None:
        """A child's last words (``fatal`` and its error, ``stopped``) may come after the last check."""
        run_dir = self.settings.run_dir
        mtime = process.heartbeat_mtime(runfiles.heartbeat_path(run_dir, child.key))
        beat = process.unrelayed_beat(child, run_dir, pid, mtime)
        if beat is not None:
            self.reporters.on_child_beats(self.settings, [beat])

    # -- periodic sync ----------------------------------------------------------------------------
    def maybe_start_sync(self, now: float) -> None:
        sup = self.settings.supervisor
        child = self.children.get(ROLE_SYNC)
        if child is not None and child.pid is not None and child.state != ChildState.STOPPING:
            if now - child.spawned_at > sup.sync_timeout_s:
                timeout_s = sup.sync_timeout_s
                log.warning(
                    "%s pid=%s still running after %.0fs: stopping it", child.label, child.pid, timeout_s
                )
                self.stop_child(child, AfterStop.EXIT, "sync timeout")
        if sup.sync_interval_s <= 0 or now < self.next_sync_at:
            return
        self.next_sync_at = now + sup.sync_interval_s
        if self.fleet is not None and not self.fleet.view.lead_mark_price:
            # one periodic sync per fleet: the mark-price leader's. A host that takes the lead (its leader
            # died) syncs one interval later, not at once (its schedule ran on meanwhile): the streams it
            # takes over come first (each reconnect reconciles its own account)
            return
        if ROLE_SYNC not in self.targets:
            return
        if child is not None and child.pid is not None:
            msg = "%s pid=%s from the previous interval is still running: not starting another"
            log.warning(msg, child.label, child.pid)
            return
        if child is None:
            child = self.children[ROLE_SYNC] = Child(key=ROLE_SYNC, role=ROLE_SYNC, one_shot=True)
        self.spawn(child)  # REST only, no WebSocket: not paced by the spawn bucket

    # -- shutdown ---------------------------------------------------------------------------------
    def begin_shutdown(self, reason: str) -> None:
        if self.stopping:
            # a second SIGTERM/SIGINT: do not wait for the graceful timeout
            log.warning("%s during shutdown: killing the remaining children", reason)
            self._kill_now(list(self.pids.values()))
            return
        self.stopping = True
        now, graceful_s = time.monotonic(), self.settings.supervisor.graceful_timeout_s
        self.stop_deadline = now + graceful_s
        log.info("%s: stopping %d children (graceful timeout %.0fs)", reason, len(self.pids), graceful_s)
        for child in self.children.values():
            if child.pid is None:
                change_state(child, ChildState.EXITED, now)
            else:
                change_state(child, ChildState.STOPPING, now)  # bounded by the supervisor's own deadline
                child.kill(signal.SIGTERM)
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
            graceful_s = self.settings.supervisor.graceful_timeout_s
            log.warning("%d children did not stop within %.0fs: SIGKILL", len(self.pids), graceful_s)
            self._kill_now(list(self.pids.values()))
            deadline = time.monotonic() + KILL_REAP_TIMEOUT_S
            while self.pids and time.monotonic() < deadline:
                self.sleep(0.05)
                self.reap()
        if self.fleet is not None:
            self.fleet.release_all()  # the streams are down: the next owners may take them now
        log.info("supervisor stopped (restarts=%d)", self.restarts)

    # -- reporting --------------------------------------------------------------------------------
    def title(self) -> str:
        counts = f"accounts={self.accounts_count} children={len(self.pids)} restarts={self.restarts}"
        return f"kraite-mp: supervisor {counts}" + (" stopping" if self.stopping else "")

    def update_title(self, force: bool = False) -> None:
        title = self.title()
        if force or title != self._last_title:
            now = time.monotonic()
            if force or now - self._title_at >= STATUS_INTERVAL_S:
                self._title_at = now
                self._last_title = title
                set_process_title(title)

    def status(self) -> runfiles.Snapshot:
        mono, wall = time.monotonic(), time.time()
        children = [c.snapshot(mono, wall) for c in self.children.values()]
        return {
            "pid": self.pid,
            "state": "stopping" if self.stopping else "running",
            "started": round(self.started_wall, 3),
            "ts": round(wall, 3),
            "accounts": self.accounts_count,
            "children_alive": len(self.pids),
            "restarts": self.restarts,
            "children": children,
            "fork_server_pid": self.fork_server.pid if self.fork_server is not None else None,
        }

    def write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        age = now - self._last_status_at
        dirty = self._status_dirty or any(c.dirty for c in self.children.values())
        if not force and (age < STATUS_INTERVAL_S or (not dirty and age < STATUS_IDLE_INTERVAL_S)):
            return
        self._last_status_at = now
        self._status_dirty = False
        for c in self.children.values():
            c.dirty = False
        data = self.status()
        if force and not self.pids and self.stopping:
            data["state"] = "stopped"
        self.reporters.on_snapshot(self.settings, data, force=force)
        try:
            runfiles.write_snapshot(self.settings.run_dir, data)
        except OSError as e:
            log.warning("cannot write %s: %s", runfiles.status_path(self.settings.run_dir), e)
