"""Settings: production defaults, file then environment precedence, errors that name the key, and
``kraite-mp check-config``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kraite_mp.config import ConfigError, load_settings


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
    from kraite_mp.config import POSITIVE_DURATIONS, Settings, _durations

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
    from kraite_mp.config import env_typos

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
