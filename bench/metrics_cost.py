"""Benchmark: what the Prometheus series cost on the two hot paths, metrics on vs off, in one run.

1. The user-data receive path of one frame, as ``UserDataStream.on_frame`` runs it: content frame id,
   spool append (write-ahead, one ``write()``), and with metrics on the frame's event type counted in a
   dict that the child's beat adds to ``kraite_user_data_frames_total{account,event}`` once a second
   (prometheus_client's multiprocess mode, an mmap write: ~7 µs, a third of the path, if done per frame;
   the flush is charged to the round here).
2. The mark-price tick's bookkeeping with metrics on: one histogram observation, one counter, one gauge
   (the write itself, ~4-10 ms of SQL, is not repeated here; the ratio is against the receive path, the
   smaller of the two).

Variants are interleaved round by round; each round times ``--frames`` frames. Usage::

    .venv/bin/python bench/metrics_cost.py [--rounds 30] [--frames 2000]

Prints a markdown section.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS_DIR = tempfile.mkdtemp(prefix="kraite-metrics-bench-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR  # before prometheus_client is imported

from kraite_mp.messages import FrameIds, event_type_of, frame_record  # noqa: E402
from kraite_mp.metrics import series  # noqa: E402
from kraite_mp.streams.spool import Spool  # noqa: E402

FRAME = (
    '{"e":"ORDER_TRADE_UPDATE","T":1796133037082,"E":%d,"o":{"s":"BTCUSDT","c":"web_abc","S":"BUY",'
    '"o":"LIMIT","f":"GTC","q":"0.010","p":"96000.10","ap":"0","sp":"0","x":"NEW","X":"NEW","i":8886774,'
    '"l":"0","z":"0","L":"0","n":"0","N":"USDT","T":1796133037082,"t":0,"b":"960.001","a":"0","m":false,'
    '"R":false,"wt":"CONTRACT_PRICE","ot":"LIMIT","ps":"BOTH","cp":false,"rp":"0","pP":false,"si":0,"ss":0,'
    '"V":"EXPIRE_TAKER","pm":"NONE","gtd":0}}'
)


def receive_path(spool: Spool, ids: FrameIds, n: int, start: int, metrics: bool) -> float:
    counts: dict[str, int] = {}  # as UserDataStream.on_frame: counted per frame, added to the metric per beat
    t0 = time.perf_counter_ns()
    for i in range(start, start + n):
        text = FRAME % (1796133037082 + i)
        spool.append(frame_record("user-data-stream", 7, text, ids.for_frame(text), 1.0))
        if metrics:
            event = event_type_of(text)
            counts[event] = counts.get(event, 0) + 1
    if metrics:  # the beat's flush (once a second in the child), charged to this round's frames
        for event, k in counts.items():
            series().USER_DATA_FRAMES.labels("7", event).inc(k)
    return (time.perf_counter_ns() - t0) / n / 1000.0  # µs per frame


def tick_bookkeeping(n: int) -> float:
    m = series()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        m.MARK_PRICE_WRITE.observe(0.006)
        m.MARK_PRICE_ROWS.inc(2300)
        m.MARK_PRICE_LAST_TICK.set(time.time())
    return (time.perf_counter_ns() - t0) / n / 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--frames", type=int, default=2000)
    args = parser.parse_args()
    off: list[float] = []
    on: list[float] = []
    ticks: list[float] = []
    with tempfile.TemporaryDirectory() as spool_dir, Spool(spool_dir, ack_required=True).open() as spool:
        ids = FrameIds(7)
        seq = 0
        receive_path(spool, ids, 200, seq, True)  # warm up both
        seq += 200
        for _ in range(args.rounds):
            off.append(receive_path(spool, ids, args.frames, seq, False))
            seq += args.frames
            on.append(receive_path(spool, ids, args.frames, seq, True))
            seq += args.frames
            ticks.append(tick_bookkeeping(args.frames))
    p50_off, p50_on = statistics.median(off), statistics.median(on)
    print("## Metrics on the hot paths (`bench/metrics_cost.py`)\n")
    print(
        f"`bench/metrics_cost.py --rounds {args.rounds} --frames {args.frames}` on {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}, prometheus_client multiprocess mode (files in a tmp dir),"
        f" the spool on {spool_dir.split('/')[1] if spool_dir else '?'}; medians over the rounds (each round"
        " the mean of its frames), variants interleaved.\n"
    )
    print("| path | metrics off | metrics on | on / off |")
    print("|---|---:|---:|---:|")
    print(
        f"| receive one frame (frame id + spool append [+ frame counter]) | {p50_off:.2f} µs | {p50_on:.2f} µs"
        f" | {p50_on / p50_off:.3f} |"
    )
    print(
        f"| a mark-price tick's series (histogram + counter + gauge) | - | {statistics.median(ticks):.2f} µs | - |"
    )
    print(
        "\nGoal: < 5 % at p50 on the receive path."
        f" {'Met' if p50_on / p50_off < 1.05 else 'NOT met'} ({(p50_on / p50_off - 1) * 100:.1f} %)."
        " A mark-price tick writes ~2,300 rows in milliseconds; its series cost the microseconds above."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
