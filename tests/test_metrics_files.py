"""The shipped dashboard and alert rules parse and use only series kraite-mp writes (docs/METRICS.md)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from support import ROOT

pytestmark = pytest.mark.unit

SERIES = set(re.findall(r"^\| `(kraite_[a-z_]+)`", (ROOT / "docs" / "METRICS.md").read_text(), re.M))


def _names(expr: str) -> set[str]:
    return {n for n in re.findall(r"\bkraite_[a-z_]+", expr)}


def _known(name: str) -> bool:
    return any(name == s or name in (f"{s}_bucket", f"{s}_count", f"{s}_sum") for s in SERIES)


def test_the_documented_series_are_the_ones_the_code_defines() -> None:
    from kraite_mp.metrics import Series

    source = (ROOT / "kraite_mp" / "metrics.py").read_text()
    defined = set(re.findall(r'"(kraite_[a-z_]+)"', source))
    defined = {
        f"{n}_total" if f'Counter(\n            "{n}"' in source or f'Counter("{n}"' in source else n
        for n in defined
    }
    defined.add("kraite_dead_letters")  # collected by the metrics child at scrape time
    assert defined == SERIES
    assert Series  # importable without a metrics directory


def test_alert_rules_parse_and_use_known_series() -> None:
    rules = yaml.safe_load((ROOT / "etc" / "prometheus" / "kraite-mp-rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 4
    unknown = {n for e in exprs for n in _names(e) if not _known(n)}
    assert not unknown


def test_dashboard_parses_and_uses_known_series() -> None:
    dash = json.loads((ROOT / "etc" / "grafana" / "kraite-mp.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    unknown = {n for e in exprs for n in _names(e) if not _known(n)}
    assert not unknown


_SMALL_FILES_SCRIPT = """
import glob, os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from kraite_mp.metrics import MMAP_INITIAL_BYTES, series
from prometheus_client import CollectorRegistry, multiprocess

m = series()
m.USER_DATA_FRAMES.labels("1", "ORDER_TRADE_UPDATE").inc()
counter = glob.glob(os.path.join(sys.argv[1], "counter_*.db"))[0]
first = os.path.getsize(counter)
for i in range(2000):  # far more than 4 KiB of series: the file grows as prometheus_client grows it
    m.USER_DATA_FRAMES.labels(str(i), "ACCOUNT_UPDATE").inc(i + 1)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=sys.argv[1])
values = {
    s.labels["account"]: s.value
    for metric in registry.collect() if metric.name == "kraite_user_data_frames"
    for s in metric.samples if s.labels.get("event") == "ACCOUNT_UPDATE"
}
assert first == MMAP_INITIAL_BYTES, first
assert os.path.getsize(counter) > 16 * MMAP_INITIAL_BYTES
assert values == {str(i): float(i + 1) for i in range(2000)}, len(values)
print("ok")
"""


def test_metrics_files_start_small_and_grow_without_losing_a_series(tmp_path: Any) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _SMALL_FILES_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
