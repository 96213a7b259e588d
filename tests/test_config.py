"""Settings: production defaults, file then environment precedence, errors that name the key, and
``kraite-mp check-config``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kraite_mp.config import ConfigError
from kraite_mp.config.load import load_settings


@pytest.mark.unit
def test_config_defaults_are_production_binance(tmp_path) -> None:
    s = load_settings(None, environ={})
    assert s.binance.rest_url == "https://fapi.binance.com"
    assert s.binance.ws_url == "wss://fstream.binance.com"
    assert "ALGO_FILLED" in s.user_data_stream.binance.dispatched_executions
    assert "NEW" not in s.user_data_stream.binance.dispatched_executions


@pytest.mark.unit
def test_config_file_then_env_precedence(tmp_path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        'redis_url = "redis://127.0.0.1:1/0"\n[supervisor]\nhealthy_after_s = 5\n'
        '[user_data_stream.binance]\ndispatched_executions = ["TRADE"]\n'
    )
    s = load_settings(
        cfg, environ={"KRAITE_REDIS_URL": "redis://127.0.0.1:2/0", "KRAITE__supervisor__fatal_retry_s": "7"}
    )
    assert s.redis_url == "redis://127.0.0.1:2/0"
    assert s.supervisor.healthy_after_s == 5.0
    assert s.supervisor.fatal_retry_s == 7.0
    assert s.user_data_stream.binance.dispatched_executions == ["TRADE"]
    shadow = load_settings(None, environ={"KRAITE__user_data_stream__binance__dispatched_executions": ""})
    assert shadow.user_data_stream.binance.dispatched_executions == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[supervisor]\nhealthy_after_s = 'soon'\n", {}, "supervisor.healthy_after_s"),
        ("[supervisor]\nno_such = 1\n", {}, "supervisor.no_such"),
        ("", {"KRAITE_BINANCE_WS_URL": "wss://fstream.binance.com/ws"}, "binance.ws_url"),
        (
            "",
            {"KRAITE__user_data_stream__binance__dispatched_executions": "TRADE,FILLD"},
            "dispatched_executions",
        ),
        ("", {"KRAITE__supervisor__shard": "3/2"}, "supervisor.shard"),
        ("not toml [", {}, "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text: str, env: dict[str, str], key: str) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_settings(cfg, environ=env)


@pytest.mark.unit
def test_check_config_cli_redacts_and_fails_clearly(tmp_path) -> None:
    env = {
        "KRAITE_SECRET_KEY": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=",
        "KRAITE_DATABASE_URL": "postgresql://u:hunter2pw@127.0.0.1/db",
        "PATH": "/usr/bin:/bin",
    }
    ok = subprocess.run(
        [sys.executable, "-m", "kraite_mp", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "hunter2pw" not in ok.stdout and "c2VjcmV0" not in ok.stdout
    assert json.loads(ok.stdout)["database_url"] == "postgresql://u:***@127.0.0.1/db"
    bad = subprocess.run(
        [sys.executable, "-m", "kraite_mp", "check-config"],
        env={**env, "KRAITE__mark_price__strategy": "orm"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 78
    assert "mark_price.strategy" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.unit
def test_every_duration_is_checked_for_range() -> None:
    from kraite_mp.config import Settings
    from kraite_mp.config.load import POSITIVE_DURATIONS, _durations

    paths = {path for path, _ in _durations(Settings())}
    assert POSITIVE_DURATIONS <= paths  # no typo in the list of the ones that must be > 0
    for path in sorted(paths):
        env = {"KRAITE__" + path.replace(".", "__"): "-1"}
        with pytest.raises(ConfigError, match="^" + re.escape(path) + ": must be >"):
            load_settings(None, environ=env)
    for path in sorted(POSITIVE_DURATIONS):
        with pytest.raises(ConfigError, match="must be > 0"):
            load_settings(None, environ={"KRAITE__" + path.replace(".", "__"): "0"})
    # 0 stays valid where it means "off"
    assert (
        load_settings(None, environ={"KRAITE__supervisor__sync_interval_s": "0"}).supervisor.sync_interval_s
        == 0
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://user:pw@redis.example:6380/3", True),
        ("unix:///run/redis.sock?db=1", True),
        ("redis://127.0.0.1:port/0", False),
        ("redis://127.0.0.1:6379/db0", False),
        ("redis:///0", False),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", False),
    ],
)
def test_redis_url_must_parse(url: str, ok: bool) -> None:
    if ok:
        assert load_settings(None, environ={"KRAITE_REDIS_URL": url}).redis_url == url
    else:
        with pytest.raises(ConfigError, match="^redis_url: ") as e:
            load_settings(None, environ={"KRAITE_REDIS_URL": url})
        assert "pw" not in str(e.value)


@pytest.mark.unit
def test_env_typos_suggest_the_closest_known_name() -> None:
    from kraite_mp.config.load import env_typos

    environ = {
        "KRAITE_DATABSE_URL": "x",
        "KRAITE_REDIS_NAMESPCE": "x",
        "KRAITE_DATABASE_URL": "x",
        "KRAITE_SECRET_KEY_FILE": "x",  # a *_FILE variant of a known name is not a typo
        "KRAITE_TEST_DATABASE_URL": "x",
        "KRAITE__supervisor__shard": "all",
        "KRAITE_MP_HOME": "/opt/kraite-mp",
        "KRAITE_SOMETHING_ELSE_ENTIRELY": "x",  # nothing close: not guessed at
    }
    assert env_typos(environ) == [
        ("KRAITE_DATABSE_URL", "KRAITE_DATABASE_URL"),
        ("KRAITE_REDIS_NAMESPCE", "KRAITE_REDIS_NAMESPACE"),
    ]


@pytest.mark.unit
def test_preflight_names_a_bad_secret_key_and_unloadable_observers() -> None:
    from kraite_mp.config import Settings
    from kraite_mp.ops.cli import preflight

    settings = Settings(secret_key="")
    settings.jobs.observers = [
        "kraite_mp.observers.no_such",
        "nosuchpkg.fn",
        "kraite_mp.observers.publish_transition",
    ]
    problems = preflight(settings)
    assert problems[0].startswith("secret_key is not set")
    assert problems[1].startswith("jobs.observers: cannot load 'kraite_mp.observers.no_such':")
    assert problems[2].startswith("jobs.observers: cannot load 'nosuchpkg.fn':")
    assert len(problems) == 3


@pytest.mark.unit
def test_config_is_found_in_the_usual_places_first_one_wins(tmp_path) -> None:
    from kraite_mp.config.load import CONFIG_SEARCH_PATH, find_config

    assert CONFIG_SEARCH_PATH == (
        "etc/kraite-mp.toml",
        "{KRAITE_MP_HOME}/etc/kraite-mp.toml",
        "/etc/kraite-mp/kraite-mp.toml",
    )
    cwd, home, system = (tmp_path / d / "kraite-mp.toml" for d in ("cwd", "home/etc", "system"))
    search = (str(cwd), "{KRAITE_MP_HOME}/etc/kraite-mp.toml", str(system))
    for f, level in ((system, "ERROR"), (home, "WARNING"), (cwd, "DEBUG")):
        f.parent.mkdir(parents=True)
        f.write_text(f'log_level = "{level}"\n')
    env = {"KRAITE_MP_HOME": str(tmp_path / "home")}
    assert load_settings(None, environ=env, search=search).log_level == "DEBUG"
    cwd.unlink()
    s = load_settings(None, environ=env, search=search)
    assert (s.log_level, s.source) == ("WARNING", f"defaults + {home}")
    assert load_settings(None, environ={}, search=search).log_level == "ERROR"  # no KRAITE_MP_HOME: skipped
    home.unlink()
    assert find_config(env, search) == str(system)
    system.unlink()
    s = load_settings(None, environ=env, search=search)
    assert (s.log_level, s.source) == ("INFO", "defaults")
    # --config / KRAITE_CONFIG name the file: the search is not made
    named = tmp_path / "named.toml"
    named.write_text('log_level = "CRITICAL"\n')
    assert (
        load_settings(None, environ={**env, "KRAITE_CONFIG": str(named)}, search=search).log_level
        == "CRITICAL"
    )


@pytest.mark.unit
def test_secrets_and_urls_come_from_files(tmp_path) -> None:
    key_file = tmp_path / "secret_key"
    key_file.write_text("a-fernet-key\n")
    url_file = tmp_path / "db_url"
    url_file.write_text("postgresql://kraite:pw@db.internal:5432/kraite\n")
    s = load_settings(
        None,
        environ={"KRAITE_SECRET_KEY_FILE": str(key_file), "KRAITE_DATABASE_URL_FILE": str(url_file)},
        search=(),
    )
    assert (s.secret_key, s.database_url) == (
        "a-fernet-key",
        "postgresql://kraite:pw@db.internal:5432/kraite",
    )
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'secret_key_file = "{key_file}"\n')
    assert load_settings(cfg, environ={}).secret_key == "a-fernet-key"
    # the environment's key wins over the file's secret_key_file, and the other way round
    assert load_settings(cfg, environ={"KRAITE_SECRET_KEY": "from-env"}).secret_key == "from-env"
    cfg2 = tmp_path / "k2.toml"
    cfg2.write_text('secret_key = "in-the-file"\n')
    assert (
        load_settings(cfg2, environ={"KRAITE__secret_key_file": str(key_file)}).secret_key == "a-fernet-key"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"\n \n", "empty"),
        (b"\xff\xfekey\n", "not UTF-8"),
        (b"one\ntwo\n", "more than one line"),
    ],
)
def test_a_bad_secret_file_is_one_clear_error(tmp_path, content: bytes | None, message: str) -> None:
    f = tmp_path / "secret"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^KRAITE_SECRET_KEY_FILE: {re.escape(str(f))}: {message}"):
        load_settings(None, environ={"KRAITE_SECRET_KEY_FILE": str(f)}, search=())
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'secret_key_file = "{f}"\n')
    with pytest.raises(ConfigError, match=f"^secret_key_file: {re.escape(str(f))}: {message}"):
        load_settings(cfg, environ={})


@pytest.mark.unit
def test_a_value_and_its_file_together_are_refused(tmp_path) -> None:
    f = tmp_path / "secret"
    f.write_text("k\n")
    with pytest.raises(ConfigError, match="KRAITE_SECRET_KEY and KRAITE_SECRET_KEY_FILE are both set"):
        load_settings(None, environ={"KRAITE_SECRET_KEY": "k", "KRAITE_SECRET_KEY_FILE": str(f)}, search=())
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'secret_key = "k"\nsecret_key_file = "{f}"\n')
    with pytest.raises(ConfigError, match="secret_key and secret_key_file are both set"):
        load_settings(cfg, environ={})
