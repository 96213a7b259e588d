"""Memory stays flat over thousands of ticks of the real per-tick path (parse -> mailbox -> bulk write)."""

from __future__ import annotations

import gc
import os
import resource
import sys
from typing import Any

import orjson
import pytest

from kraite_mp.config import Settings
from kraite_mp.ops.seed import seed_symbols
from kraite_mp.simulator.market import Market
from kraite_mp.streams.markprice import MarkPriceStreamer
from kraite_mp.supervisor.context import ChildContext

#: Ticks measured after warm-up (as many as 50 minutes of the 1 Hz stream).
TICKS = 3000
WARMUP_TICKS = 300
#: Generous: the working set of one tick is ~1 MB; a leak of even 1 KB per tick would show as 3 MB+
#: of steady growth, so the assertion also checks the second half grows no more than the first.
MAX_GROWTH_BYTES = 24 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_rss_flat_over_3000_ticks(db: Any, settings: Settings) -> None:
    market = Market(570, seed=3)
    seeded = seed_symbols(db, [s for s, _ in market.symbols()])
    frames = [orjson.dumps(market.tick()) for _ in range(25)]
    ctx = ChildContext(settings, "mark-price")
    streamer = MarkPriceStreamer(settings, ctx)
    os.makedirs(os.path.dirname(ctx.heartbeat_path), exist_ok=True)
    writer = streamer.writer

    def tick(i: int) -> None:
        streamer.handle_frame(frames[i % len(frames)])
        written = writer.step(timeout=0)
        assert written is not None and written > 0
        streamer.beat()

    gc.freeze()  # as run_mark_price_child does: collect only what the ticks allocate
    try:
        for i in range(WARMUP_TICKS):
            tick(i)
        start = rss_bytes()
        samples = [start]
        for i in range(TICKS):
            tick(i)
            if (i + 1) % 500 == 0:
                samples.append(rss_bytes())
    finally:
        gc.unfreeze()
        writer.close()
    growth = samples[-1] - start
    first_half = samples[len(samples) // 2] - start
    second_half = samples[-1] - samples[len(samples) // 2]
    print(
        f"\nmark-price memory: {TICKS} ticks x {writer.stats.rows} rows ({seeded.row_count} seeded),"
        f" RSS {start / 2**20:.1f} MiB -> {samples[-1] / 2**20:.1f} MiB (growth {growth / 2**10:.0f} KiB);"
        f" samples MiB {[round(s / 2**20, 1) for s in samples]}",
        file=sys.stderr,
    )
    assert writer.stats.writes == WARMUP_TICKS + TICKS
    assert streamer.stats.ticks == WARMUP_TICKS + TICKS and streamer.stats.skipped == 0
    assert growth < MAX_GROWTH_BYTES
    assert second_half <= max(first_half, 0) + 4 * 1024 * 1024  # no steady climb
