"""What a wheel install needs: the shipped files inside the package (identical to etc/), ``kraite-mp init``
writing an install directory from them, systemd units that stop like the supervisord programs, a daemon
that runs without aiohttp (the ``simulator`` extra), and upper bounds plus constraints.txt for the
libraries whose internals kraite-mp relies on."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import ROOT

import kraite_mp
from kraite_mp.config import Settings
from kraite_mp.config.load import load_settings
from kraite_mp.ops import init_cmd as init
from kraite_mp.ops.init_cmd import EXIT_CANTCREAT, TEMPLATES, init_cmd

PACKAGE_TEMPLATES = ROOT / "kraite_mp" / "ops" / "templates"
ETC = ROOT / "etc"
VENV_BIN = Path(sys.executable).parent
KRAITE_EXE = str(VENV_BIN / "kraite-mp")
SYSTEMD_UNITS = ("kraite-mp", "kraite-mp-worker", "kraite-mp-reconcile-worker")
#: supervisord program -> the systemd unit that runs the same command
SAME_PROGRAM = {name: f"{name}.service" for name in SYSTEMD_UNITS}

#: Makes ``import aiohttp`` (and its submodules) fail as if the ``simulator`` extra were not installed.
BLOCK_AIOHTTP = """
import importlib.abc, sys
class _NoAiohttp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoAiohttp())
"""


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return parser


def _requirements(value: str) -> list[Requirement]:
    return [Requirement(line) for line in value.strip().splitlines() if line.strip()]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KRAITE")}


def _run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _init(home: Path, *args: str) -> Result:
    return CliRunner().invoke(init_cmd, [str(home), *args], catch_exceptions=False)


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def _supervisord_programs(conf_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """supervisord's own parser on ``conf_dir/*.conf``: program name -> its process config."""
    from supervisor.options import ServerOptions

    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[supervisord]\nlogfile={tmp_path / 'sd.log'}\npidfile={tmp_path / 'sd.pid'}\n"
        f"[include]\nfiles = {conf_dir}/*.conf\n"
    )
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return {g.name: g.process_configs[0] for g in options.process_group_configs}


# -- the shipped files ------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_package_ships_byte_identical_copies_of_etc() -> None:
    """etc/ is what a checkout installs in place; kraite_mp/ops/templates/ is what a wheel carries."""
    shipped = sorted(
        str(p.relative_to(PACKAGE_TEMPLATES)) for p in PACKAGE_TEMPLATES.rglob("*") if p.is_file()
    )
    assert shipped == sorted(TEMPLATES), "kraite_mp/ops/templates/ holds exactly init_cmd.TEMPLATES"
    in_etc = [str(p.relative_to(ETC)) for p in (*ETC.glob("supervisord.d/*"), *ETC.glob("systemd/*"))]
    assert sorted(in_etc) == sorted(t for t in TEMPLATES if "/" in t), "a file in etc/ is not shipped"
    differ = [
        name for name in TEMPLATES if (ETC / name).read_bytes() != (PACKAGE_TEMPLATES / name).read_bytes()
    ]
    assert differ == [], f"copy etc/X to kraite_mp/ops/templates/X (or back): {differ}"
    for name in TEMPLATES:
        assert init.template_text(name) == (ETC / name).read_text()


@pytest.mark.unit
def test_setup_cfg_ships_the_templates_and_the_migrations() -> None:
    data = _setup_cfg()["options.package_data"]
    globs = data["kraite_mp.ops"].split()
    for name in TEMPLATES:
        assert any(Path(name).match(g.removeprefix("templates/")) for g in globs), name
    assert data["kraite_mp.store"].strip() == "migrations/*.sql"


@pytest.mark.unit
def test_aiohttp_is_only_in_the_simulator_extra() -> None:
    cfg = _setup_cfg()
    runtime = {canonicalize_name(r.name) for r in _requirements(cfg["options"]["install_requires"])}
    assert "aiohttp" not in runtime
    extras = cfg["options.extras_require"]
    simulator = [str(r) for r in _requirements(extras["simulator"])]
    assert [r for r in simulator if r.startswith("aiohttp")] == simulator != []
    # `sim`, the former name, still installs the same (existing installs, old Makefiles)
    assert [str(r) for r in _requirements(extras["sim"])] == simulator


@pytest.mark.unit
def test_every_daemon_module_imports_without_aiohttp(tmp_path: Path) -> None:
    package = ROOT / "kraite_mp"
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if "simulator" not in p.relative_to(package).parts and p.name != "__main__.py"
    )
    assert "kraite_mp.jobs" in modules and "kraite_mp.ops.cli" in modules
    code = (
        BLOCK_AIOHTTP
        + "import importlib, json\n"
        + f"failed = {{}}\nfor name in {modules!r}:\n"
        + "    try:\n        importlib.import_module(name)\n"
        + "    except Exception as e:\n        failed[name] = repr(e)\n"
        + "simulator = ''\ntry:\n    import kraite_mp.simulator\nexcept ImportError as e:\n    simulator = str(e)\n"
        + "print(json.dumps([failed, simulator, sorted(m for m in sys.modules if m.startswith('aiohttp'))]))\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    failed, simulator, loaded = json.loads(result.stdout)
    assert failed == {}, "these modules need aiohttp (the simulator extra) at import"
    assert loaded == []
    assert "aiohttp" in simulator and "kraite-mp[s" in simulator  # the one line names the extra


@pytest.mark.unit
def test_cli_help_without_aiohttp(tmp_path: Path) -> None:
    """`kraite-mp --help` lists every command on a daemon-only install (simulate says it is unavailable)."""
    result = _run_python(
        BLOCK_AIOHTTP + "from kraite_mp.ops.cli import main\nsys.exit(main(['--help']))", tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check-config" in result.stdout and "simulate" in result.stdout
    assert "Traceback" not in result.stderr


# -- upper bounds and constraints.txt ---------------------------------------------------------------


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def _runtime_closure() -> dict[str, list[Requirement]]:
    """Every distribution the runtime requirements pull in (as installed here) -> the requirements on it."""
    found: dict[str, list[Requirement]] = {}
    todo = _requirements(_setup_cfg()["options"]["install_requires"])
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        seen = name in found
        found.setdefault(name, []).append(req)
        if seen:
            continue
        for raw in metadata.distribution(name).requires or []:
            sub = Requirement(raw)
            extras = set(req.extras) or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return found


@pytest.mark.unit
def test_libraries_whose_internals_are_overridden_have_upper_bounds() -> None:
    """dramatiq: KraiteRedisBroker.consume overrides RedisBroker's, dead-letters uses its Redis key layout;
    redis-py: the fleet runs Lock's own Lua release script."""
    from dramatiq.brokers.redis import RedisBroker
    from redis.lock import Lock

    from kraite_mp.broker import KraiteRedisBroker

    assert issubclass(KraiteRedisBroker, RedisBroker) and "consume" in vars(KraiteRedisBroker)
    assert hasattr(Lock, "lua_release") and hasattr(Lock, "register_scripts")  # what fleet.py runs
    bounded: dict[str, Requirement] = {
        str(canonicalize_name(r.name)): r for r in _requirements(_setup_cfg()["options"]["install_requires"])
    }
    for name in ("dramatiq", "redis"):
        assert any(s.operator in ("<", "<=", "~=") for s in bounded[name].specifier), (
            f"{name} needs an upper bound"
        )
        assert metadata.version(name) in bounded[name].specifier, (
            f"the installed {name} is outside setup.cfg's range"
        )


@pytest.mark.unit
def test_constraints_pin_the_tested_runtime_closure() -> None:
    pins = _constraints()
    closure = _runtime_closure()
    assert sorted(closure) == sorted(pins), "constraints.txt pins exactly the runtime requirements and theirs"
    not_installed = {n: (v, metadata.version(n)) for n, v in pins.items() if metadata.version(n) != v}
    assert not_installed == {}, "constraints.txt != this venv (pinned, installed): refresh one of them"
    for name, reqs in closure.items():
        for req in reqs:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"


@pytest.mark.unit
def test_make_venv_installs_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[test,embedded,lint,simulator]'" in makefile
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", makefile, re.MULTILINE)


# -- systemd units ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_systemd_units_stop_like_the_supervisord_programs(tmp_path: Path) -> None:
    settings = Settings()
    home = tmp_path / "home"  # the shipped files included in place, as in test_supervisord
    (home / "var" / "log").mkdir(parents=True)
    shutil.copytree(ETC / "supervisord.d", home / "etc" / "supervisord.d")
    programs = _supervisord_programs(home / "etc" / "supervisord.d", tmp_path)
    for name, unit_file in SAME_PROGRAM.items():
        unit = _unit(ETC / "systemd" / unit_file)
        service = unit["Service"]
        assert service["KillSignal"] == "SIGTERM"
        # TERM to the main process only (it forwards it), SIGKILL to the rest of the cgroup at the end
        assert service["KillMode"] == "mixed"
        assert service["Restart"] == "always" and float(service["RestartSec"]) > 0
        assert "78" in service["RestartPreventExitStatus"].split()  # a config error is not hot-looped
        assert service["User"] == "kraite"
        assert service["WorkingDirectory"] == "/opt/kraite-mp"
        assert service["EnvironmentFile"].startswith("-/opt/kraite-mp/")  # optional: "-"
        assert "Environment" in service and "SECRET" not in service["Environment"]
        timeout_s = float(service["TimeoutStopSec"])
        assert timeout_s == programs[name].stopwaitsecs
        # the same command as supervisord's program, installed executable aside
        program, *args = programs[name].command.split()
        exe, *unit_args = service["ExecStart"].split()
        assert exe == "/opt/kraite-mp/.venv/bin/kraite-mp" and os.path.basename(program) == "kraite-mp"
        assert unit_args == args
        if name == "kraite-mp":
            assert timeout_s >= settings.supervisor.graceful_timeout_s + 10
            assert (
                service["ExecReload"] == "/bin/kill -HUP $MAINPID"
            )  # SIGHUP: reload without dropping streams
            assert "kraite-mp-worker.service" in unit["Unit"]["After"]  # stopped before the workers
        else:
            m = re.search(r"--worker-shutdown-timeout (\d+)", service["ExecStart"])
            assert m and timeout_s >= int(m.group(1)) / 1000 + 5
        assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert programs["kraite-mp"].stopsignal == signal.SIGTERM


# -- kraite-mp init DIR -----------------------------------------------------------------------------


def _noncomment(text: str, comment: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(comment))


@pytest.mark.unit
def test_init_writes_an_install_directory(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    home = tmp_path / "srv" / "kmp"
    result = _init(home, "--user", "trader")
    assert result.exit_code == 0, result.output
    out = result.stdout
    config = home / "etc" / "kraite-mp.toml"
    written = [config, *(home / "etc" / name for name in TEMPLATES if name != init.CONFIG_TEMPLATE)]
    for path in written:
        assert f"wrote {path} (" in out
    for name, mode in init.DIRECTORIES.items():
        assert stat.S_IMODE((home / name).stat().st_mode) == mode, name
    # the configuration: the example with a new secret_key, readable by its owner only
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    settings = load_settings(config, environ={})
    Fernet(settings.secret_key.encode())
    header, text = config.read_text().split("\n", 1)
    assert header == f"## Written by `kraite-mp init {home}` (kraite-mp {kraite_mp.__version__})."
    example = init.template_text(init.CONFIG_TEMPLATE)
    assert text == example.replace('# secret_key = ""', f'secret_key = "{settings.secret_key}"', 1) != example
    # supervisord and systemd: absolute paths to DIR and to this kraite-mp, comments as shipped
    for name in TEMPLATES:
        if name == init.CONFIG_TEMPLATE:
            continue
        text = (home / "etc" / name).read_text()
        assert stat.S_IMODE((home / "etc" / name).stat().st_mode) == 0o644
        live = _noncomment(text, ";" if name.endswith(".conf") else "#")
        assert "%(here)s" not in live and "/opt/kraite-mp" not in live
        assert f"{KRAITE_EXE} " in live and str(home) in live
    unit = _unit(home / "etc" / "systemd" / "kraite-mp.service")["Service"]
    assert unit["ExecStart"] == f"{KRAITE_EXE} run"
    assert unit["WorkingDirectory"] == str(home) and unit["User"] == "trader"
    assert unit["EnvironmentFile"] == f"-{home}/etc/kraite-mp.env"


@pytest.mark.unit
def test_init_supervisord_files_are_accepted_by_supervisord(tmp_path: Path) -> None:
    home = tmp_path / "kraite"
    assert _init(home).exit_code == 0
    programs = _supervisord_programs(home / "etc" / "supervisord.d", tmp_path)
    assert set(programs) == {"kraite-mp", "kraite-mp-worker", "kraite-mp-reconcile-worker"}
    for name, process in programs.items():
        program, *args = process.command.split()
        assert program == KRAITE_EXE and args[0] in ("run", "worker")
        assert process.directory == str(home)
        assert process.stdout_logfile == f"{home}/var/log/{name}.log"
        assert process.environment == {"PYTHONUNBUFFERED": "1"}


@pytest.mark.unit
def test_init_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the configparser checks above still ran)")
    home = tmp_path / "kraite"
    assert _init(home, "--user", "root").exit_code == 0
    units = sorted(str(p) for p in (home / "etc" / "systemd").glob("*.service"))
    assert len(units) == 3
    result = subprocess.run(
        [analyze, "verify", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    mentions = [line for line in (result.stdout + result.stderr).splitlines() if "kraite-mp" in line]
    assert result.returncode == 0 and mentions == [], result.stdout + result.stderr


@pytest.mark.unit
def test_init_refuses_to_overwrite_and_force_keeps_the_secret_key(tmp_path: Path) -> None:
    home = tmp_path / "kraite"
    assert _init(home).exit_code == 0
    conf = home / "etc" / "supervisord.d" / "kraite-mp.conf"
    config = home / "etc" / "kraite-mp.toml"
    original_config = config.read_bytes()
    conf.write_text("; edited by hand\n")

    again = _init(home)
    assert again.exit_code == EXIT_CANTCREAT
    assert again.stdout == ""
    message = again.stderr
    assert message.count("\n") == 1 and message.startswith(f"kraite-mp: {config} exists (and 5 more)")
    assert "--force" in message
    assert conf.read_text() == "; edited by hand\n" and config.read_bytes() == original_config

    forced = _init(home, "--force")
    assert forced.exit_code == 0, forced.output
    assert f"overwrote {conf} (0644)" in forced.stdout
    assert f"kept {config}" in forced.stdout
    assert conf.read_text().startswith("; Written by `kraite-mp init")
    # the key that decrypts the stored API secrets is never replaced
    assert config.read_bytes() == original_config
    assert not [p for p in (home / "etc").rglob(".*") if p.is_file()], "no temporary file left behind"


@pytest.mark.unit
def test_init_errors_are_one_line_with_a_named_exit_code(tmp_path: Path) -> None:
    occupied = tmp_path / "file"
    occupied.write_text("x")
    cases = [
        (occupied, EXIT_CANTCREAT, "cannot create"),
        (tmp_path / "with space", 78, "whitespace"),
        (tmp_path / "per%cent", 78, "'%'"),
    ]
    for home, code, words in cases:
        result = CliRunner().invoke(init_cmd, [str(home)])
        assert result.exit_code == code, result.output
        assert isinstance(result.exception, SystemExit)  # not a traceback
        assert result.stderr.count("\n") == 1 and words in result.stderr and result.stdout == ""
    assert not (tmp_path / "with space").exists()
    unwritable = tmp_path / "ro"
    unwritable.mkdir()
    (unwritable / "etc").mkdir()
    (unwritable / "etc" / "supervisord.d").write_text("not a directory")
    result = CliRunner().invoke(init_cmd, [str(unwritable)])
    assert result.exit_code == EXIT_CANTCREAT and "a file of that name exists" in result.stderr
    bad_user = CliRunner().invoke(init_cmd, [str(tmp_path / "u"), "--user", "a b"])
    assert bad_user.exit_code == 2 and "not a user name" in bad_user.stderr


@pytest.mark.unit
def test_init_no_secret_key_leaves_the_example_as_shipped(tmp_path: Path) -> None:
    home = tmp_path / "kraite"
    result = _init(home, "--no-secret-key")
    assert result.exit_code == 0
    text = (home / "etc" / "kraite-mp.toml").read_text()
    assert text.split("\n", 1)[1] == init.template_text(init.CONFIG_TEMPLATE)
    assert load_settings(home / "etc" / "kraite-mp.toml", environ={}).secret_key == ""


@pytest.mark.unit
def test_init_is_a_kraite_mp_command(tmp_path: Path) -> None:
    home = tmp_path / "kraite"
    result = subprocess.run(
        [KRAITE_EXE, "init", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert (home / "etc" / "kraite-mp.toml").is_file()


# -- the wheel --------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_wheel_ships_the_templates_and_init_runs_from_it(tmp_path: Path) -> None:
    """Build the wheel from a copy of the source (the work tree gets no build/), install it without
    dependencies into a directory, and run `init` from that copy of the package."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "kraite_mp", src / "kraite_mp", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = out.glob("kraite_mp-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata_text = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for name in TEMPLATES:
        assert f"kraite_mp/ops/templates/{name}" in names
    migrations = sorted(p.name for p in (ROOT / "kraite_mp" / "store" / "migrations").glob("*.sql"))
    assert migrations and all(f"kraite_mp/store/migrations/{m}" in names for m in migrations)
    assert "kraite_mp/py.typed" in names
    assert 'Requires-Dist: aiohttp>=3.9; extra == "simulator"' in metadata_text
    assert not re.search(r"^Requires-Dist: aiohttp[^;]*$", metadata_text, re.MULTILINE)

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    home = tmp_path / "home"
    code = (
        "import kraite_mp, sys\nfrom kraite_mp.ops.init_cmd import init_cmd\n"
        "print(kraite_mp.__file__, flush=True)\n"
        f"init_cmd.main([{str(home)!r}], standalone_mode=True)\n"
    )
    env = dict(_clean_env(), PYTHONPATH=str(target))
    ran = _run_python(code, tmp_path, env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines()[0].startswith(str(target)), "init ran from the installed wheel"
    for name in TEMPLATES:
        assert (home / "etc" / name.replace(".toml.example", ".toml")).is_file()


@pytest.mark.unit
def test_pick_python_finds_the_newest_and_the_oldest_supported_cpython() -> None:
    """`make` builds .venv with the newest CPython 3.11-3.13 it finds (bin/pick-python); CI also runs the
    unit tier on the oldest."""
    import subprocess

    def version(which: str) -> tuple[int, int]:
        path = subprocess.run(
            [str(ROOT / "bin" / "pick-python"), *([which] if which else [])],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        out = subprocess.run(
            [path, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        major, minor = map(int, out.stdout.split())
        return major, minor

    newest, oldest = version(""), version("lowest")
    assert (3, 11) <= oldest <= newest <= (3, 13), (oldest, newest)
    here = sys.version_info[:2]
    assert oldest <= here <= newest or not (3, 11) <= here <= (3, 13)  # the running one is in between
