"""The shipped supervisord program files, run by real supervisord against the simulator.

The test includes ``etc/supervisord.d/*.conf`` unchanged, copied into a temporary install directory
(``%(here)s/../..``, whose ``.venv`` links to this virtualenv) as an operator would include them in
place; only that directory and the KRAITE_* environment are the test's (no KRAITE_MP_HOME).
Every process the test causes carries a unique marker in its environment, so that leftovers
(orphans) are found by scanning /proc, and killed at teardown whatever happened.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import MARKER_VAR, ROOT, marked_pids, wait_for

from kraite_mp.config import Settings
from kraite_mp.config.load import load_settings
from kraite_mp.store.accounts import add_account

SUPERVISORD_D = ROOT / "etc" / "supervisord.d"
PROGRAMS = ("kraite-mp", "kraite-mp-worker", "kraite-mp-reconcile-worker")
VENV_BIN = Path(sys.executable).parent
#: Environment variable whose (unique) value marks every process of one test.


def _bin(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install '.[test]')")
    return found


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@dataclass
class Supervisord:
    """One supervisord with its own unix socket, logs and marker, started in ``workdir``."""

    workdir: Path
    home: Path
    env: dict[str, str]
    marker: str
    proc: subprocess.Popen[bytes] | None = None
    conf: Path = field(init=False)
    ctl_conf: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        sock = self.workdir / "supervisor.sock"
        self.log = self.workdir / "supervisord.log"
        self.conf = self.workdir / "supervisord.conf"
        self.conf.write_text(
            f"[unix_http_server]\nfile={sock}\nchmod=0700\n\n"
            f"[supervisord]\nlogfile={self.log}\npidfile={self.workdir / 'supervisord.pid'}\n"
            f"childlogdir={self.workdir}\nnodaemon=true\nloglevel=info\n\n"
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{sock}\n\n"
            f"[include]\nfiles = {self.home}/etc/supervisord.d/kraite-mp.conf"
            f" {self.home}/etc/supervisord.d/kraite-mp-worker.conf\n"
        )
        # supervisorctl gets a config without [include]: it must not depend on the programs' environment
        self.ctl_conf = self.workdir / "supervisorctl.conf"
        self.ctl_conf.write_text(f"[supervisorctl]\nserverurl=unix://{sock}\n")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_bin("supervisord"), "-n", "-c", str(self.conf)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=str(self.workdir),
        )

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != MARKER_VAR}
        return subprocess.run(
            [_bin("supervisorctl"), "-c", str(self.ctl_conf), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, tuple[str, int | None]]:
        """program -> (state, pid) from ``supervisorctl status``."""
        out = self.ctl("status").stdout
        result: dict[str, tuple[str, int | None]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in PROGRAMS:
                m = re.search(r"pid (\d+)", line)
                result[parts[0]] = (parts[1], int(m.group(1)) if m else None)
        return result

    def all_running(self) -> dict[str, tuple[str, int | None]] | None:
        st = self.status()
        return st if all(st.get(p, ("?",))[0] == "RUNNING" for p in PROGRAMS) else None

    def program_log(self, program: str) -> str:
        path = self.home / "var" / "log" / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self) -> str:
        parts = [f"--- supervisorctl status\n{self.ctl('status').stdout}"] if self.running else []
        if self.log.exists():
            parts.append(f"--- supervisord.log\n{self.log.read_text(errors='replace')[-3000:]}")
        for p in PROGRAMS:
            parts.append(f"--- {p}.log\n{self.program_log(p)[-4000:]}")
        return "\n".join(parts)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def shutdown(self) -> None:
        """Stop supervisord (gracefully, then by force) and kill anything still carrying the marker."""
        if self.running:
            try:
                self.ctl("shutdown", timeout=90)
            except subprocess.TimeoutExpired:
                pass
            assert self.proc is not None
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for _ in range(3):
            leftovers = marked_pids(self.marker, self.workdir)
            if not leftovers:
                break
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _make_home(base: Path) -> Path:
    """An install directory like a real one: .venv (linked to ours), var/log, the shipped
    etc/supervisord.d (copied unchanged); no etc/kraite-mp.toml."""
    home = base / "home"
    (home / "var" / "log").mkdir(parents=True)
    (home / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    shutil.copytree(SUPERVISORD_D, home / "etc" / "supervisord.d")
    return home


@pytest.fixture()
def supervisord_factory(kraite_env: dict[str, str]) -> Iterator[Any]:
    started: list[Supervisord] = []
    # a short path: unix socket paths are limited to 108 bytes
    workdir = Path(tempfile.mkdtemp(prefix="ksv-"))

    def make(extra_env: dict[str, str]) -> Supervisord:
        marker = uuid.uuid4().hex
        home = _make_home(workdir)
        env = dict(kraite_env, **extra_env)
        env[MARKER_VAR] = marker
        sup = Supervisord(workdir=workdir, home=home, env=env, marker=marker)
        started.append(sup)
        return sup

    try:
        yield make
    finally:
        for sup in started:
            sup.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _program_section(path: Path, name: str) -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(inline_comment_prefixes=None)
    parser.read(path)
    return parser[f"program:{name}"]


@pytest.mark.unit
def test_program_files_are_consistent_with_graceful_timeouts() -> None:
    settings = Settings()
    main = _program_section(SUPERVISORD_D / "kraite-mp.conf", "kraite-mp")
    worker = _program_section(SUPERVISORD_D / "kraite-mp-worker.conf", "kraite-mp-worker")
    reconciler = _program_section(SUPERVISORD_D / "kraite-mp-worker.conf", "kraite-mp-reconcile-worker")
    for section in (main, worker, reconciler):
        assert section["stopsignal"] == "TERM"
        assert section["autostart"] == "true" and section["autorestart"] == "true"
        # only the main process gets TERM (it forwards it); the group is SIGKILLed only as a last resort
        assert section["stopasgroup"] == "false"
        assert section["killasgroup"] == "true"
        assert section["redirect_stderr"] == "true"
        # paths relative to the file itself: nothing depends on supervisord's environment
        assert section["command"].startswith("%(here)s/../../.venv/bin/kraite-mp ")
        assert section["directory"] == "%(here)s/../.."
        assert "ENV_" not in "".join(section.values())
    # supervisord must outwait kraite-mp's own SIGTERM -> SIGKILL timeout, with a margin
    assert int(main["stopwaitsecs"]) >= settings.supervisor.graceful_timeout_s + 10
    assert main["command"].endswith("kraite-mp run")
    for section in (worker, reconciler):
        m = re.search(r"--worker-shutdown-timeout (\d+)", section["command"])
        assert m, "the workers must set dramatiq's shutdown timeout explicitly (its default is 10 minutes)"
        assert int(section["stopwaitsecs"]) >= int(m.group(1)) / 1000 + 5
        # the wrapper checks the configuration (one line, exit 78) and runs the installed package
        assert "kraite-mp worker --queues" in section["command"]
        # supervisord starts the workers before the supervisor (lower priority number)
        assert int(section["priority"]) < int(main["priority"])
    # frames and reconciliations in separate pools: a rate-limited REST sweep never holds frame threads
    assert "--queues user-data-stream --" in worker["command"]
    assert "--queues reconcile --" in reconciler["command"]


@pytest.mark.unit
def test_supervisord_parses_the_program_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """supervisord's own parser accepts the files included in place, without KRAITE_MP_HOME in its
    environment (a missing variable used to make supervisord reject its whole configuration)."""
    from supervisor.options import ServerOptions

    monkeypatch.delenv("KRAITE_MP_HOME", raising=False)
    home = _make_home(tmp_path / "opt")
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[supervisord]\nlogfile={tmp_path / 'x.log'}\npidfile={tmp_path / 'x.pid'}\n"
        f"[include]\nfiles = {home}/etc/supervisord.d/*.conf\n"
    )
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    programs = {g.name: g.process_configs[0] for g in options.process_group_configs}
    assert set(programs) == set(PROGRAMS)
    main = programs["kraite-mp"]
    program, *args = main.command.split()
    assert os.path.normpath(program) == f"{home}/.venv/bin/kraite-mp" and args == ["run"]
    assert os.path.normpath(main.directory) == str(home)
    assert main.stopsignal == signal.SIGTERM
    assert main.stopasgroup is False and main.killasgroup is True
    assert os.path.normpath(main.stdout_logfile) == f"{home}/var/log/kraite-mp.log"
    assert main.environment == {"PYTHONUNBUFFERED": "1"}
    worker = programs["kraite-mp-worker"]
    program, *args = worker.command.split()
    assert os.path.normpath(program) == f"{home}/.venv/bin/kraite-mp" and args[:3] == [
        "worker",
        "--queues",
        "user-data-stream",
    ]


def _uncommented(example: str) -> str:
    """The example with its settings switched on: "## " lines are prose, "# " lines are settings."""
    out = []
    for line in example.splitlines():
        if line.startswith("##"):
            continue
        out.append(line[2:] if line.startswith("# ") else line)
    return "\n".join(out)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _all_settings() -> dict[str, Any]:
    data = dataclasses.asdict(Settings())
    data.pop("source")
    return _flatten(data)


@pytest.mark.unit
def test_example_config_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    example = ROOT / "etc" / "kraite-mp.toml.example"
    text = example.read_text()
    # as shipped (everything commented out) it is valid and means "defaults"
    assert load_settings(example, environ={}).redacted() == dict(
        Settings().redacted(), source=f"defaults + {example}"
    )
    # switched on, it holds every setting of kraite_mp.config at its default, and nothing else
    switched_on = _uncommented(text)
    documented = _flatten(tomllib.loads(switched_on))
    expected = _all_settings()
    assert sorted(set(expected) - set(documented)) == [], "settings missing from etc/kraite-mp.toml.example"
    assert sorted(set(documented) - set(expected)) == [], "the example documents settings that do not exist"
    wrong = {k: (documented[k], v) for k, v in expected.items() if documented[k] != v}
    assert wrong == {}, "example value != default (documented, real)"
    path = tmp_path / "kraite-mp.toml"
    path.write_text(switched_on)
    load_settings(path, environ={})


@pytest.mark.unit
def test_readme_configuration_reference_names_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in _all_settings() if f"`{k}`" not in readme]
    assert missing == [], "README's configuration reference misses these settings"


def _count(db: Any, sql: str) -> int:
    with db.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    db.commit()
    return int(row[0])


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_supervisord_runs_stops_and_restarts_kraite_mp(
    supervisord_factory: Any, simulator: Any, db: Any, secret_key: str
) -> None:
    from kraite_mp.ops.seed import seed_symbols

    for i, acc in enumerate(simulator.accounts):
        add_account(db, secret_key, name=f"sim-{i}", api_key=acc.api_key, api_secret=acc.api_secret)
    seed_symbols(db, [s for s, _ in simulator.mark_symbols])
    sup = supervisord_factory(
        {
            "KRAITE_BINANCE_REST_URL": simulator.rest_url,
            "KRAITE_BINANCE_WS_URL": simulator.ws_url,
        }
    )
    sup.start()
    try:
        running = wait_for(sup.all_running, timeout=120, message="both programs RUNNING")
        simulator.set_rate(2.0)

        # frames flow: user-data frames audited, mark prices written
        wait_for(
            lambda: _count(db, "SELECT count(*) FROM api_data_stream") >= 3,
            timeout=120,
            message="frames in api_data_stream",
        )
        wait_for(
            lambda: _count(db, "SELECT count(*) FROM exchange_symbols WHERE mark_price IS NOT NULL") > 0,
            timeout=60,
            message="mark prices written",
        )

        # the scan that later proves "nothing left" sees the whole tree now: supervisord, kraite-mp and
        # its 4 children, dramatiq's main process and its 2 worker processes
        assert len(marked_pids(sup.marker, sup.workdir)) >= 9

        # `kraite-mp status` (from Redis) lists the supervisor and its children, all fresh
        def status_rows() -> dict[str, Any] | None:
            result = subprocess.run(
                [sys.executable, "-m", "kraite_mp", "status", "--json"],
                env=sup.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            rows = {r["key"]: r for r in json.loads(result.stdout or "[]")} if result.returncode == 0 else {}
            wanted = {"supervisor", "mark-price", *(f"user-data-{i}" for i in (1, 2, 3))}
            ok = wanted <= set(rows) and all(rows[k]["state"] in ("running", "streaming") for k in wanted)
            return rows if ok else None

        rows = wait_for(status_rows, timeout=60, interval=1, message="kraite-mp status shows every process")
        assert not any(r["stale"] for r in rows.values())
        assert rows["supervisor"]["pid"] == running["kraite-mp"][1]
        assert rows["user-data-1"]["fields"]["frames"] >= 0

        # kill -9 kraite-mp's parent: its children follow it (PDEATHSIG), supervisord starts a new one
        old_pid = running["kraite-mp"][1]
        assert old_pid is not None
        old_children = wait_for(
            lambda: child_pids(old_pid) if len(child_pids(old_pid)) >= 4 else None,
            timeout=60,
            message="3 user-data children + mark-price forked",
        )
        os.kill(old_pid, signal.SIGKILL)
        wait_for(
            lambda: not set(old_children) & set(marked_pids(sup.marker, sup.workdir)),
            timeout=30,
            message="the killed parent's children exit",
        )
        restarted = wait_for(
            lambda: (st := sup.all_running()) and st["kraite-mp"][1] not in (None, old_pid) and st,
            timeout=120,
            message="supervisord restarts kraite-mp",
        )
        assert restarted["kraite-mp-worker"][1] == running["kraite-mp-worker"][1], (
            "the worker was not touched"
        )
        before = _count(db, "SELECT count(*) FROM api_data_stream")
        wait_for(
            lambda: _count(db, "SELECT count(*) FROM api_data_stream") > before,
            timeout=120,
            message="frames flow again after the restart",
        )

        # graceful stop of everything: exit status 0, nothing left behind
        simulator.set_rate(0.0)
        log_offset = sup.log.stat().st_size
        stopped = sup.ctl("stop", "all", timeout=180)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        for program in PROGRAMS:
            assert f"{program}: stopped" in stopped.stdout
        with open(sup.log) as f:
            f.seek(log_offset)
            stop_log = f.read()
        for program in PROGRAMS:
            assert f"stopped: {program} (exit status 0)" in stop_log, stop_log
        assert "SIGKILL" not in stop_log, "supervisord had to kill something: the stop was not graceful"
        main_log = sup.program_log("kraite-mp")
        assert "SIGTERM: stopping" in main_log and "supervisor stopped" in main_log
        assert "did not stop within" not in main_log
        assert "Killing worker process" not in sup.program_log("kraite-mp-worker")
        # nothing but supervisord itself carries the marker any more
        assert sup.proc is not None
        supervisord_pid = sup.proc.pid
        wait_for(
            lambda: not [p for p in marked_pids(sup.marker, sup.workdir) if p != supervisord_pid] or None,
            timeout=30,
            message="no process but supervisord left after stop all",
        )
        assert all(state == "STOPPED" for state, _ in sup.status().values())
    except BaseException:
        sys.stderr.write(sup.diagnostics())
        raise
    finally:
        sup.shutdown()
    assert marked_pids(sup.marker, sup.workdir) == []
