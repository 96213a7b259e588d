"""One supervised child as the parent sees it: its state machine, what happens when it exits or
is stopped, spawn pacing. The ``Arbiter`` owns the processes; this module decides their states."""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from kraite_mp import exitcodes
from kraite_mp.backoff import backoff_delay
from kraite_mp.supervisor import runfiles

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.store.accounts import Account

log = logging.getLogger(__name__)


class ChildState(enum.StrEnum):
    #: Not started yet (new, or restarting after a requested stop): waits for a spawn token.
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    EXITED = "EXITED"


#: The states in which a child without a process waits for its ``due_at`` to be spawned.
WAITING_STATES = frozenset({ChildState.PENDING, ChildState.BACKOFF, ChildState.FATAL})


class AfterStop(enum.Enum):
    """What to do once a child we asked to stop has exited."""

    #: Respawn at once (new credentials, new account name).
    RESTART = "restart"
    #: Counts as a failure (stale heartbeat).
    BACKOFF = "backoff"
    #: Forget it (account removed or deactivated).
    REMOVE = "remove"
    #: Leave it EXITED (one-shot timeout, shutdown).
    EXIT = "exit"


@dataclass
class Child:
    """One supervised slot (an account's stream, the mark-price stream, the periodic sync)."""

    key: str  #: unique slot name (runfiles.child_key): heartbeat file, process title, snapshot key
    role: str  #: runfiles.ROLE_*: which entry point the forked child runs
    account: Account | None = None  #: the account a user-data child streams (None for the others)
    #: Runs to completion and is never restarted (the periodic sync).
    one_shot: bool = False
    state: ChildState = ChildState.PENDING  #: changed only by set_state()
    pid: int | None = None  #: the live (not yet reaped) process; None when none runs
    #: time.monotonic() / time.time() of the last fork.
    spawned_at: float = 0.0
    spawned_wall: float = 0.0
    #: Consecutive failed starts: the backoff exponent. Reset after healthy_after_s of uptime.
    attempt: int = 0
    #: Forks after the first one.
    restarts: int = 0
    spawns: int = 0  #: forks in all (0: never started)
    last_exit: str | None = None  #: how the last process ended ("code 1 (error)", "signal SIGKILL")
    last_exit_code: int | None = None  #: its exit code (None when a signal ended it)
    last_exit_wall: float | None = None  #: time.time() of that exit
    #: time.monotonic() at which a PENDING/BACKOFF/FATAL child may be spawned.
    due_at: float = 0.0
    backoff_s: float | None = None  #: the delay of the current BACKOFF/FATAL wait, for the snapshot
    fatal_reason: str | None = None  #: why a FATAL child cannot run now (invalid credentials, ...)
    after_stop: AfterStop | None = None  #: what follows the exit of a child we asked to stop
    stop_reason: str | None = None  #: why we asked it to stop (logged and shown)
    stop_deadline: float | None = None  #: time.monotonic() after which a STOPPING child is SIGKILLed
    killed: bool = False  #: SIGKILL already sent (it is sent once)
    #: Changed since the supervisor last wrote its snapshot.
    dirty: bool = True
    #: mtime of its heartbeat file at the last check, and of the one last relayed to the status reporters.
    heartbeat_mtime: float = 0.0
    relayed_mtime: float = 0.0

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

    def kill(self, sig: int) -> None:
        # only pids not yet reaped are signalled, so a recycled pid is never hit
        if self.pid is None:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def snapshot(self, mono: float, wall: float) -> runfiles.ChildSnapshot:
        """This child in ``supervisor.json``; monotonic times turned into wall time (``mono`` ~ ``wall``)."""
        waiting = self.pid is None and self.state in WAITING_STATES
        return {
            "key": self.key,
            "role": self.role,
            "account_id": self.account_id,
            "account_name": self.account.name if self.account else None,
            "pid": self.pid,
            "state": self.state.value,
            "started_at": round(self.spawned_wall, 3) if self.spawns else None,
            "spawns": self.spawns,
            "restarts": self.restarts,
            "attempt": self.attempt,
            "last_exit": self.last_exit,
            "last_exit_code": self.last_exit_code,
            "last_exit_at": self.last_exit_wall,
            "backoff_s": self.backoff_s,
            "backoff_until": round(wall + (self.due_at - mono), 3) if waiting else None,
            "fatal_reason": self.fatal_reason,
        }


def change_state(
    child: Child,
    new_state: ChildState,
    now: float,
    *,
    reason: str | None = None,
    delay_s: float | None = None,
) -> None:
    """The one place a child's state is set, with the fields that go with it.

    ``delay_s``: BACKOFF and FATAL wait that long before the next spawn (a BACKOFF also counts one
    more failed attempt); STOPPING is SIGKILLed that long after its SIGTERM (None: no own deadline,
    as at shutdown). ``reason``: why a FATAL child cannot run now.
    """
    if child.state is not new_state:
        from kraite_mp.metrics import series

        gauge = series().CHILD_STATE
        gauge.labels(child.key, child.state.value).set(0)
        gauge.labels(child.key, new_state.value).set(1)
    child.state = new_state
    child.dirty = True
    if new_state is ChildState.PENDING:
        child.due_at = now
        child.backoff_s = None
        child.fatal_reason = None
    elif new_state is ChildState.STARTING:
        child.spawned_at = now
        child.spawned_wall = time.time()
        child.backoff_s = None
        child.killed = False
        child.stop_deadline = None
        child.after_stop = None
        child.stop_reason = None
    elif new_state is ChildState.BACKOFF:
        assert delay_s is not None
        child.attempt += 1
        child.due_at = now + delay_s
        child.backoff_s = delay_s
    elif new_state is ChildState.FATAL:
        assert delay_s is not None
        child.fatal_reason = reason
        child.due_at = now + delay_s
        child.backoff_s = delay_s
        child.attempt = 0
    elif new_state is ChildState.STOPPING and delay_s is not None:
        child.stop_deadline = now + delay_s


class ExitOutcome(NamedTuple):
    """What ``next_state_after_exit`` decided."""

    #: The child's next state; None: forget it (stopped because it is no longer wanted).
    state: ChildState | None
    #: Start the backoff sequence over (a restart we asked for, or a run longer than healthy_after_s).
    reset_attempts: bool


def next_state_after_exit(
    child: Child, code: int | None, uptime: float, settings: Settings, *, stopping: bool
) -> ExitOutcome:
    """What a child becomes once its process exited after ``uptime`` s (``code`` None: a signal)."""
    after = child.after_stop
    if stopping or after is AfterStop.EXIT:
        return ExitOutcome(ChildState.EXITED, False)
    if after is AfterStop.REMOVE:
        return ExitOutcome(None, False)
    if after is AfterStop.RESTART:
        return ExitOutcome(ChildState.PENDING, True)
    if child.one_shot:
        return ExitOutcome(ChildState.EXITED, False)
    if code in exitcodes.FATAL_EXIT_CODES and after is None:
        return ExitOutcome(ChildState.FATAL, False)
    return ExitOutcome(ChildState.BACKOFF, uptime >= settings.supervisor.healthy_after_s)


def finish(child: Child, pid: int, status: int, settings: Settings, *, stopping: bool) -> bool:
    """Record the exit of ``child``'s process (``waitpid`` ``status``) and move it on; True: forget it."""
    now = time.monotonic()
    text, code = describe_status(status)
    uptime = now - child.spawned_at
    child.pid = None
    child.last_exit = text
    child.last_exit_code = code
    child.last_exit_wall = time.time()
    child.stop_deadline = None
    child.dirty = True
    after, reason = child.after_stop, child.stop_reason
    outcome = next_state_after_exit(child, code, uptime, settings, stopping=stopping)
    child.after_stop = child.stop_reason = None
    if outcome.reset_attempts:
        child.attempt = 0
    exited = f"{child.label} pid={pid} exited with {text} after {uptime:.1f}s"
    if outcome.state is None:
        log.info("%s; stopped (%s)", exited, reason)
        return True
    if outcome.state is ChildState.PENDING:
        change_state(child, ChildState.PENDING, now)
        log.info("%s; restarting (%s)", exited, reason)
    elif outcome.state is ChildState.EXITED:
        change_state(child, ChildState.EXITED, now)
        # a one-shot child that ended on its own with an error is worth a warning
        failed = not stopping and after is not AfterStop.EXIT and code != exitcodes.EXIT_OK
        log.log(logging.WARNING if failed else logging.INFO, "%s", exited)
    elif outcome.state is ChildState.FATAL:
        beat = runfiles.read_heartbeat(runfiles.heartbeat_path(settings.run_dir, child.key))
        error = beat.get("error") if beat and beat.get("pid") == pid else None
        retry_s = settings.supervisor.fatal_retry_s
        change_state(child, ChildState.FATAL, now, reason=str(error) if error else text, delay_s=retry_s)
        log.error(
            "%s pid=%s exited with %s: FATAL (%s); next try in %.0fs",
            child.label,
            pid,
            text,
            child.fatal_reason,
            retry_s,
        )
    else:
        # why it could not run (a spool that cannot be opened, ...), as the child wrote it last
        beat = runfiles.read_heartbeat(runfiles.heartbeat_path(settings.run_dir, child.key))
        error = beat.get("error") if beat and beat.get("pid") == pid else None
        if error:
            child.last_exit = f"{text}: {error}"
        why = (
            f"{text} after {uptime:.1f}s"
            + (f" ({reason})" if reason else "")
            + (f": {error}" if error else "")
        )
        schedule_backoff(child, now, settings, why, pid)
    return False


def schedule_backoff(child: Child, now: float, settings: Settings, why: str, pid: int | None = None) -> None:
    """BACKOFF: the next spawn after ``backoff_delay(attempt)``."""
    sup = settings.supervisor
    delay = backoff_delay(
        child.attempt,
        base_s=sup.backoff_base_s,
        cap_exponent=sup.backoff_cap_exponent,
        jitter_ratio=sup.backoff_jitter_ratio,
    )
    change_state(child, ChildState.BACKOFF, now, delay_s=delay)
    log.warning(
        "%s pid=%s exited with %s; restarting in %.3fs (backoff attempt %d)",
        child.label,
        pid,
        why,
        delay,
        child.attempt,
    )


def begin_stop(child: Child, after: AfterStop, reason: str, now: float, graceful_s: float) -> None:
    """SIGTERM a live child (SIGKILL after ``graceful_s``); ``after`` decides what follows its exit."""
    child.after_stop, child.stop_reason = after, reason
    if child.state == ChildState.STOPPING:
        return
    change_state(child, ChildState.STOPPING, now, delay_s=graceful_s)
    log.info("stopping %s pid=%s (%s)", child.label, child.pid, reason)
    child.kill(signal.SIGTERM)


def heartbeat_mtime(path: str) -> float:
    """The heartbeat file's mtime, 0.0 when there is none: a stat, no read (cheap at 500 children)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def unrelayed_beat(child: Child, run_dir: str, pid: int | None, mtime: float) -> runfiles.Heartbeat | None:
    """The heartbeat ``child``'s run ``pid`` wrote at ``mtime``, if it is newer than the one last relayed to
    the status reporters (it counts as relayed from now on); None for a dead run's last beat."""
    if mtime <= child.relayed_mtime:
        return None
    child.relayed_mtime = child.heartbeat_mtime = mtime
    beat = runfiles.read_heartbeat(runfiles.heartbeat_path(run_dir, child.key))
    return beat if isinstance(beat, dict) and beat.get("pid") == pid else None


def check_heartbeat(child: Child, run_dir: str, now: float, wall: float, timeout_s: float) -> bool:
    """STARTING becomes RUNNING on its first real heartbeat; True when a long-lived child went silent."""
    path = runfiles.heartbeat_path(run_dir, child.key)
    mtime = child.heartbeat_mtime = heartbeat_mtime(path)
    if child.state == ChildState.STARTING and mtime >= child.spawned_wall:
        beat = runfiles.read_heartbeat(path)
        if beat and beat.get("pid") == child.pid and beat.get("state") not in (None, "starting"):
            change_state(child, ChildState.RUNNING, now)
            log.info("%s pid=%s running (state=%s)", child.label, child.pid, beat.get("state"))
    if child.one_shot:
        return False  # bounded by sync_timeout_s instead
    silent = wall - max(mtime, child.spawned_wall)
    if silent <= timeout_s:
        return False
    log.warning(
        "%s pid=%s heartbeat stale for %.1fs (timeout %.0fs)", child.label, child.pid, silent, timeout_s
    )
    return True


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


#: glibc's mallopt(M_ARENA_MAX, ...): one malloc arena per process instead of one per thread and core.
M_ARENA_MAX = -8


def prepare_to_fork(settings: Settings) -> None:
    """Once in the supervisor, before its first fork: do now what every child would otherwise do on its
    own, so that the pages it touches stay shared (issue 17: each item was measured in USS per child).

    - the collector off in the parent (``gc.freeze()`` before each fork; children re-enable it): a
      collection before a fork would free objects whose holes the children then fill, copying pages;
    - one malloc arena (glibc), inherited by the children: a child's threads would each get their own;
    - redis-py's DriverInfo built once (it scans the installed packages for every new connection);
    - prometheus_client imported and the series built (after ``PROMETHEUS_MULTIPROC_DIR`` is set);
    - ``requests``' lazy imports done (adapters, certificates, idna);
    - the one TLS client context of every child's ``wss://`` and ``https://`` (``binance.tls``): made here,
      its trust store is parsed once and its pages shared, not 2.4 MB of C heap in each child;
    - one HTTPS round trip through that context (``warm_rest``), as each child's first listenKey call;
    - then, on CPython 3.12 and 3.13, every object reachable so far made immortal (``immortal``), so that a
      child taking and dropping references to the parent's objects writes nothing to their pages.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.disable()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
    from kraite_mp.messages import redis_driver_info
    from kraite_mp.metrics import series

    redis_driver_info()
    series()  # prometheus_client imported and every series built here, not in each child
    try:
        import requests

        requests.Session().close()
        requests.utils.DEFAULT_CA_BUNDLE_PATH  # noqa: B018 - certifi's lookup, done here once
        "warm".encode("idna")
        from kraite_mp.binance.tls import client_context

        client_context(settings.binance.ca_file)
    except Exception:  # noqa: BLE001 - a warm-up never stops the supervisor
        log.debug("warm-up before fork failed", exc_info=True)
    warm_rest(settings)
    if settings.supervisor.immortalize_before_fork:
        from kraite_mp.supervisor import immortal

        if immortal.supported():
            made = immortal.immortalize_heap()
            log.info("made %d objects immortal before the first fork (their pages stay shared)", made)
        else:
            version = sys.version.split()[0]
            log.info("objects not made immortal before the first fork: not supported on Python %s", version)


#: The warm-up's REST calls wait at most this long (seconds): a start-up never hangs on it.
WARM_REST_TIMEOUT_S = 3.0


def warm_rest(settings: Settings, calls: int = 2) -> int:
    """Run the code of a child's first REST call here, in the parent: unsigned ``GET /fapi/v1/time`` (weight
    1 each, through the egress budget) over the shared TLS context, so that the pages CPython writes when
    it first runs that code (reference counts, inline caches) are written once, not copied into every
    child (docs/BENCHMARKS.md). The first call also measures the clock offset the children inherit. Best
    effort: returns the calls that succeeded; no socket is left open for a fork to copy."""
    from kraite_mp.binance.budget import shared_budget
    from kraite_mp.binance.rest import BinanceRest

    budget = shared_budget(settings)
    rest = BinanceRest(
        settings.binance.rest_url,
        "",
        timeout_s=min(settings.binance.rest_timeout_s, WARM_REST_TIMEOUT_S),
        budget=budget,
        ca_file=settings.binance.ca_file,
        max_budget_wait_s=0.0,
    )
    done = 0
    try:
        rest.sync_time()
        done += 1
        for _ in range(calls - 1):
            rest.server_time()
            done += 1
    except Exception as e:  # noqa: BLE001 - a warm-up never stops the supervisor (BinanceError, the budget's)
        log.info("warm-up before the first fork: %s (the children start all the same)", e)
    finally:
        rest.close()
        budget.disconnect()
    return done
