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

The loop's helpers live beside it: ``forking`` (how a process is made), ``heartbeats`` (stale children,
beats relayed), ``periodic_sync`` and ``reporting`` (the process title and the status snapshot).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from kraite_mp import exitcodes, metrics
from kraite_mp.config import ConfigError, Settings
from kraite_mp.config.load import load_settings
from kraite_mp.supervisor import heartbeats, ownership, process, runfiles
from kraite_mp.supervisor.context import Target, load_targets
from kraite_mp.supervisor.forking import Forker
from kraite_mp.supervisor.periodic_sync import PeriodicSync
from kraite_mp.supervisor.process import WAITING_STATES, AfterStop, Child, ChildState, change_state
from kraite_mp.supervisor.publish import Reporters
from kraite_mp.supervisor.reporting import StatusReport
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
#: One pass of the loop forks for this long at most, then renews leases, reaps, ... before forking on.
SPAWN_SLICE_S = 0.5
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
        self.next_heartbeat_check_at = now
        self.stop_deadline: float | None = None
        #: Status hooks (best effort; none by default): called here and handed to every child.
        self.reporters = reporters if reporters is not None else Reporters()
        #: How processes are made; the title and status snapshot; the periodic sync's schedule.
        self.forker = Forker(self.reporters, self._become_child)
        self.report = StatusReport(self)
        self.periodic_sync = PeriodicSync(self, now)

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
                self.forker.start_server(self.settings, self.targets)
        self.signals.install()
        sup = self.settings.supervisor
        msg = "supervisor starting pid=%s shard=%s mark_price=%s spawn_rate=%.2f/s burst=%d"
        log.info(msg, self.pid, sup.shard, sup.mark_price, sup.spawn_rate_per_s, sup.spawn_burst)
        self._sync_mark_price_child()
        ownership.converge_metrics(self.children, self.settings, time.monotonic(), self.stop_child)
        self.refresh_accounts("start")
        self.report.update_title(force=True)

    def cleanup(self) -> None:
        self.forker.stop()
        self.report.write(force=True)
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
        self.periodic_sync.maybe_start(now)
        self.spawn_due(time.monotonic())
        self.report.update_title()
        self.report.write()

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
            wake = min(wake, self.periodic_sync.wake_at())
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
        self.report.dirty = True

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
        self.report.dirty = True
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
                self.report.dirty = True
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
        self.periodic_sync.reschedule()
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

    def spawn(self, child: Child) -> None:
        """Fork one child (``Forker.fork``) and record its process."""
        pid = self.forker.fork(child, self.settings, self.targets)
        if pid is None:
            return  # the fork failed: BACKOFF
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
        self.forker.close_in_child()
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
            if child is None and self.forker.server is not None:
                self.forker.server.reaped(pid, process.describe_status(status)[0])
            if child is not None:
                self.child_exited(child, pid, status)

    def child_exited(self, child: Child, pid: int, status: int) -> None:
        self.report.dirty = True
        heartbeats.relay_last_beat(child, pid, self.settings, self.reporters)
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
        self.next_heartbeat_check_at = heartbeats.next_check_at(self.settings, now)
        heartbeats.check(self.pids, self.settings, self.reporters, now, self.stop_child)

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
        self.report.dirty = True

    def shutdown(self) -> None:
        """Wait for the children after begin_shutdown; SIGKILL what outlives the graceful timeout."""
        assert self.stop_deadline is not None
        while self.pids and time.monotonic() < self.stop_deadline:
            self.report.update_title()
            self.report.write()
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
