"""Run a real supervisor (``Arbiter``) with controllable child entry points, for the supervisor tests.

Settings come from the environment exactly as for ``kraite-mp run``. The user-data child's behaviour
is chosen by the account's name prefix, so one supervisor can host healthy and broken accounts:

- ``crash-*``: raises at start, every time (backoff sequence);
- ``bad-*``: returns the FATAL credentials exit code with a reason, as for Binance -2015;
- ``hang-*``: beats once, then stops beating while staying alive (stale heartbeat);
- ``stubborn-*``: streams like a healthy child but ignores SIGTERM (SIGKILL escalation);
- anything else: a healthy streaming loop that counts "frames" and beats every 50 ms.

The sync child appends one line to ``<run_dir>/sync-runs.log`` per run; with
``KRAITE_TEST_SYNC_SLEEP_S`` it sleeps that long first (overlap and timeout tests).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from kraite_mp import exitcodes  # noqa: E402
from kraite_mp.config.load import load_settings  # noqa: E402
from kraite_mp.logs import setup_logging  # noqa: E402
from kraite_mp.supervisor.arbiter import Arbiter  # noqa: E402
from kraite_mp.supervisor.context import ChildContext  # noqa: E402
from kraite_mp.supervisor.publish import RedisStatus, Reporters  # noqa: E402

#: How often the healthy fake loop advances its frame counter and beats.
FRAME_INTERVAL_S = 0.05


def _stream(ctx: ChildContext, *, ignore_term: bool = False) -> int:
    frames = 0
    reloads = 0
    while True:
        if ctx.stop.is_set() and not ignore_term:
            break
        if ctx.reload.is_set():
            ctx.reload.clear()
            reloads += 1
        frames += 1
        ctx.beat("streaming", frames=frames, reloads=reloads)
        time.sleep(FRAME_INTERVAL_S)
    ctx.beat("stopped", force=True, frames=frames, reloads=reloads)
    return exitcodes.EXIT_OK


def user_data(ctx: ChildContext) -> int:
    name = ctx.account.name if ctx.account else ""
    if name.startswith("crash-"):
        raise RuntimeError("simulated crash at start")
    if name.startswith("bad-"):
        return ctx.fatal("Binance -2015: Invalid API-key, IP, or permissions for action")
    if name.startswith("hang-"):
        ctx.beat("streaming", force=True)
        while not ctx.stop.wait(0.05):
            pass  # alive, but the loop no longer beats
        return exitcodes.EXIT_OK
    if name.startswith("stubborn-"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _stream(ctx, ignore_term=True)
    return _stream(ctx)


def mark_price(ctx: ChildContext) -> int:
    return _stream(ctx)


def sync_orders(ctx: ChildContext) -> int:
    ctx.beat("syncing", force=True)
    ctx.stop.wait(float(os.environ.get("KRAITE_TEST_SYNC_SLEEP_S", "0")))
    with open(os.path.join(ctx.settings.run_dir, "sync-runs.log"), "a") as f:
        f.write(f"{os.getpid()} {time.time():.3f}\n")
    return exitcodes.EXIT_OK


def main() -> int:
    settings = load_settings(None, os.environ)
    setup_logging(settings.log_level)
    os.makedirs(settings.run_dir, exist_ok=True)
    arbiter = Arbiter(
        settings,
        targets={"user-data": user_data, "mark-price": mark_price, "sync-orders": sync_orders},
        reporters=Reporters([RedisStatus()]),
    )
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
