"""Configuration: flag > LOCKBROKER_* env > TOML > default, conversions, and validation. Pure unit tests."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from lockbroker.server import config
from lockbroker.server.app import is_loopback
from lockbroker.server.cli import build_parser
from lockbroker.server.config import Config, ConfigError, LockLimits


def flags(*argv: str) -> argparse.Namespace:
    """Parse exactly as `lockbroker serve ARGV` does."""
    return build_parser().parse_args(["serve", *argv])


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lockbroker.toml"
    path.write_text(text)
    return str(path)


def test_defaults_with_nothing_given() -> None:
    assert config.load(flags(), {}) == Config()
    assert config.load() == Config()
    c = Config()
    assert c.server.listen == "127.0.0.1:50051"
    assert c.etcd.endpoints == ()
    assert c.server.insecure_remote is False
    assert (c.limits.min_ttl, c.limits.default_ttl, c.limits.max_ttl) == (2, 10, 3600)


def test_precedence_flag_over_env_over_toml_over_default(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
[server]
listen = "127.0.0.1:1001"
grace_period = 3
[etcd]
endpoints = ["http://toml-a:2379", "http://toml-b:2379"]
key_root = "/from-toml"
[limits]
max_ttl = 100
""",
    )
    env = {
        "LOCKBROKER_LISTEN": "127.0.0.1:1002",
        "LOCKBROKER_ETCD_ENDPOINTS": "http://env-a:2379,http://env-b:2379",
        "LOCKBROKER_LIMITS_MAX_TTL": "200",
    }
    argv = ["--config", path, "--listen", "127.0.0.1:1003", "--etcd-endpoints", "http://flag:2379"]

    c = config.load(flags(*argv), env)
    assert c.server.listen == "127.0.0.1:1003"  # flag
    assert c.etcd.endpoints == ("http://flag:2379",)  # flag
    assert c.limits.max_ttl == 200  # env (no flag)
    assert c.etcd.key_root == "/from-toml"  # TOML (no flag, no env)
    assert c.server.grace_period == 3.0 and isinstance(c.server.grace_period, float)  # TOML int -> float
    assert c.server.health_interval == 1.0  # default

    c = config.load(flags("--config", path), env)
    assert c.server.listen == "127.0.0.1:1002"  # env beats TOML
    assert c.etcd.endpoints == ("http://env-a:2379", "http://env-b:2379")
    c = config.load(flags("--config", path), {})
    assert c.server.listen == "127.0.0.1:1001"  # TOML beats default
    assert c.etcd.endpoints == ("http://toml-a:2379", "http://toml-b:2379")  # TOML array -> tuple
    assert c.limits.max_ttl == 100


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://a:1", ("http://a:1",)),
        ("http://a:1,http://b:2", ("http://a:1", "http://b:2")),
        (" http://a:1 , http://b:2 ,", ("http://a:1", "http://b:2")),  # spaces and a trailing comma
    ],
)
def test_endpoints_are_comma_separated(raw: str, expected: tuple[str, ...]) -> None:
    assert config.load(flags("--etcd-endpoints", raw), {}).etcd.endpoints == expected
    assert config.load(flags(), {"LOCKBROKER_ETCD_ENDPOINTS": raw}).etcd.endpoints == expected


def test_endpoints_from_toml_string_or_array(tmp_path: Path) -> None:
    as_string = toml(tmp_path, '[etcd]\nendpoints = "http://a:1,http://b:2"\n')
    assert config.load(flags("--config", as_string), {}).etcd.endpoints == ("http://a:1", "http://b:2")
    as_array = toml(tmp_path, '[etcd]\nendpoints = ["http://a:1", "http://b:2"]\n')
    assert config.load(flags("--config", as_array), {}).etcd.endpoints == ("http://a:1", "http://b:2")


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on"])
def test_insecure_remote_env_true(raw: str) -> None:
    assert config.load(flags(), {"LOCKBROKER_INSECURE_REMOTE": raw}).server.insecure_remote is True


@pytest.mark.parametrize("raw", ["0", "false", "no", "off", "False"])
def test_insecure_remote_env_false_beats_toml_true(raw: str, tmp_path: Path) -> None:
    path = toml(tmp_path, "[server]\ninsecure_remote = true\n")
    assert config.load(flags("--config", path), {}).server.insecure_remote is True
    c = config.load(flags("--config", path), {"LOCKBROKER_INSECURE_REMOTE": raw})
    assert c.server.insecure_remote is False


def test_insecure_remote_flag_beats_env_false() -> None:
    assert flags().__dict__["server.insecure_remote"] is None  # absent flag is "not given", not False
    c = config.load(flags("--insecure-remote"), {"LOCKBROKER_INSECURE_REMOTE": "false"})
    assert c.server.insecure_remote is True
    with pytest.raises(SystemExit):
        flags("--insecure-remote", "yes")  # a switch, takes no value


def test_bad_bool_names_its_source() -> None:
    with pytest.raises(ConfigError, match="LOCKBROKER_INSECURE_REMOTE"):
        config.load(flags(), {"LOCKBROKER_INSECURE_REMOTE": "maybe"})


@pytest.mark.parametrize(
    ("argv", "env", "toml_text", "named"),
    [
        (["--limits-max-ttl", "abc"], {}, "", "--limits-max-ttl"),
        (["--limits-max-ttl", "1.5"], {}, "", "--limits-max-ttl"),
        ([], {"LOCKBROKER_GRACE_PERIOD": "soon"}, "", "LOCKBROKER_GRACE_PERIOD"),
        ([], {}, "[limits]\nmax_ttl = 100.5\n", "[limits] max_ttl"),  # a float is not an int
        ([], {}, '[server]\nhealth_interval = "often"\n', "[server] health_interval"),
    ],
)
def test_bad_value_names_where_it_came_from(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml_text: str, named: str
) -> None:
    if toml_text:
        argv = [*argv, "--config", toml(tmp_path, toml_text)]
    with pytest.raises(ConfigError) as ei:
        config.load(flags(*argv), env)
    assert named in str(ei.value)


def test_numbers_are_converted() -> None:
    c = config.load(
        flags("--grace-period", "2.5", "--limits-default-ttl", "30"),
        {"LOCKBROKER_LIMITS_MAX_WAIT": "12.5", "LOCKBROKER_ETCD_REQUEST_TIMEOUT": "3"},
    )
    assert c.server.grace_period == 2.5
    assert c.limits.default_ttl == 30 and isinstance(c.limits.default_ttl, int)
    assert c.limits.max_wait == 12.5
    assert c.etcd.request_timeout == 3.0


def test_optional_strings_stay_none_unless_given() -> None:
    assert config.load(flags(), {}).etcd.ca_file is None
    assert config.load(flags(), {"LOCKBROKER_ETCD_CA_FILE": "/ca.pem"}).etcd.ca_file == "/ca.pem"
    assert config.load(flags("--embedded-binary", "/opt/etcd"), {}).embedded.binary == "/opt/etcd"


# Fields that accept only some strings.
_CHOICES = {
    ("audit", "fsync"): ("interval", '"interval"', "interval"),
    ("server", "backend"): ("memory", '"memory"', "memory"),
    ("server", "listen"): ("127.0.0.1:7", '"127.0.0.1:7"', "127.0.0.1:7"),
    ("server", "log_level"): ("debug", '"debug"', "debug"),
    ("server", "event_loop"): ("uvloop", '"uvloop"', "uvloop"),
    ("server", "health_listen"): ("0.0.0.0:8081", '"0.0.0.0:8081"', "0.0.0.0:8081"),
    ("server", "metrics_listen"): ("127.0.0.1:9464", '"127.0.0.1:9464"', "127.0.0.1:9464"),
}


def _sample(tp: object) -> tuple[str, str, object]:
    """(flag/env text, TOML literal, expected value) for a field of type `tp`."""
    base = config._base_type(tp)
    if typing.get_origin(base) is tuple:
        return "http://x:1,http://y:2", '["http://x:1", "http://y:2"]', ("http://x:1", "http://y:2")
    if base is bool:
        return "true", "true", True
    if base is int:
        return "7", "7", 7
    if base is float:
        return "7.5", "7.5", 7.5
    return "some-value", '"some-value"', "some-value"


def test_every_field_is_reachable_by_flag_env_and_toml(tmp_path: Path) -> None:
    # Sections whose fields take any value of their type; [limits] (cross-field rules) is covered below.
    for section in ("server", "etcd", "embedded"):
        cls = config._SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw, literal, value = _CHOICES.get((section, f.name)) or _sample(hints[f.name])
            flag, env = config._names(section, f.name)  # derived, but [embedded] binary's env is its own
            argv = [flag] if value is True else [flag, raw]
            assert getattr(getattr(config.load(flags(*argv), {}), section), f.name) == value, flag
            assert getattr(getattr(config.load(flags(), {env: raw}), section), f.name) == value, env
            path = toml(tmp_path, f"[{section}]\n{f.name} = {literal}\n")
            assert getattr(getattr(config.load(flags("--config", path), {}), section), f.name) == value, path


def test_limits_reachable_all_three_ways(tmp_path: Path) -> None:
    want = LockLimits(min_ttl=3, max_ttl=600, default_ttl=20, max_wait=60.0)
    argv = ["--limits-min-ttl", "3", "--limits-max-ttl", "600", "--limits-default-ttl", "20", "--limits-max-wait", "60"]
    assert config.load(flags(*argv), {}).limits == want
    env = {
        "LOCKBROKER_LIMITS_MIN_TTL": "3",
        "LOCKBROKER_LIMITS_MAX_TTL": "600",
        "LOCKBROKER_LIMITS_DEFAULT_TTL": "20",
        "LOCKBROKER_LIMITS_MAX_WAIT": "60",
    }
    assert config.load(flags(), env).limits == want
    path = toml(tmp_path, "[limits]\nmin_ttl = 3\nmax_ttl = 600\ndefault_ttl = 20\nmax_wait = 60\n")
    assert config.load(flags("--config", path), {}).limits == want


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_ttl": 1},
        {"min_ttl": 0},
        {"min_ttl": 20, "default_ttl": 10},
        {"default_ttl": 4000},
        {"max_ttl": 5},
        {"max_wait": -1.0},
    ],
)
def test_lock_limits_reject_unsafe_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LockLimits(**kwargs)  # type: ignore[arg-type]


def test_lock_limits_accept_the_bounds() -> None:
    assert LockLimits(min_ttl=2, default_ttl=2, max_ttl=2, max_wait=0).max_ttl == 2


def test_min_ttl_below_two_is_refused_from_every_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_ttl"):
        config.load(flags("--limits-min-ttl", "1"), {})
    with pytest.raises(ConfigError, match="min_ttl"):
        config.load(flags(), {"LOCKBROKER_LIMITS_MIN_TTL": "1"})
    with pytest.raises(ConfigError, match="min_ttl"):
        config.load(flags("--config", toml(tmp_path, "[limits]\nmin_ttl = 1\n")), {})


def test_unknown_toml_section_is_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, '[serverr]\nlisten = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="serverr"):
        config.load(flags("--config", path), {})


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    path = toml(tmp_path, '[server]\nlisten = "127.0.0.1:1"\nlisten_port = 5\n')
    with pytest.raises(ConfigError, match="listen_port"):
        config.load(flags("--config", path), {})


def test_unreadable_or_malformed_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(flags("--config", str(tmp_path / "missing.toml")), {})
    with pytest.raises(ConfigError, match=r"lockbroker\.toml"):
        config.load(flags("--config", toml(tmp_path, "[server\nlisten =")), {})


def test_config_file_location_flag_beats_env(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text('[server]\nlisten = "127.0.0.1:1111"\n')
    b = tmp_path / "b.toml"
    b.write_text('[server]\nlisten = "127.0.0.1:2222"\n')
    assert config.load(flags(), {"LOCKBROKER_CONFIG": str(b)}).server.listen == "127.0.0.1:2222"
    assert config.load(flags("--config", str(a)), {"LOCKBROKER_CONFIG": str(b)}).server.listen == "127.0.0.1:1111"


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- the listen address safety check ---------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "127.0.0.1:0", "[::1]:50051", "localhost:50051", "127.3.4.5:1"])
def test_loopback_listen_addresses(listen: str) -> None:
    assert is_loopback(listen)


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "example.com:50051", ":50051"])
def test_non_loopback_listen_addresses(listen: str) -> None:
    assert not is_loopback(listen)


def test_empty_env_is_unset_and_timings_must_be_positive(tmp_path: Path) -> None:
    path = toml(tmp_path, '[etcd]\nendpoints = ["http://a:1"]\n')
    assert config.load(flags("--config", path), {"LOCKBROKER_ETCD_ENDPOINTS": ""}).etcd.endpoints == ("http://a:1",)
    for argv in (["--health-interval", "0"], ["--grace-period", "-1"], ["--etcd-request-timeout", "0"]):
        with pytest.raises(config.ConfigError):
            config.load(flags(*argv), {})


# -- issue 16: durations, forms named in errors, one env name per setting, the state dir -------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("10s", 10.0), ("250ms", 0.25), ("5m", 300.0), ("1h", 3600.0), ("2.5", 2.5), ("3", 3.0), (" 1.5s ", 1.5)],
)
def test_durations_accept_units_and_plain_seconds(raw: str, seconds: float) -> None:
    assert config.parse_duration(raw) == seconds
    assert config.load(flags("--grace-period", raw), {}).server.grace_period == seconds
    assert config.load(flags(), {"LOCKBROKER_ETCD_REQUEST_TIMEOUT": raw}).etcd.request_timeout == seconds


def test_durations_in_toml_and_whole_second_ttls(tmp_path: Path) -> None:
    path = toml(tmp_path, '[limits]\nmax_ttl = "10m"\nmax_wait = "90s"\n[audit]\nfsync_interval = "250ms"\n')
    c = config.load(flags("--config", path), {})
    assert (c.limits.max_ttl, c.limits.max_wait, c.audit.fsync_interval) == (600, 90.0, 0.25)
    assert config.load(flags("--quota-max-wait", "2m"), {}).quota.max_wait == 120.0
    with pytest.raises(ConfigError, match=r"--limits-max-ttl: '1500ms' .*whole seconds"):
        config.load(flags("--limits-max-ttl", "1500ms"), {})


@pytest.mark.parametrize(
    ("argv", "env", "toml_text", "named_form"),
    [
        (["--grace-period", "10x"], {}, "", ("--grace-period", "250ms, 10s, 5m, 1h")),
        (["--listen", "nonsense"], {}, "", ("--listen", "HOST:PORT")),
        (["--listen", "127.0.0.1:99999"], {}, "", ("--listen", "HOST:PORT")),
        ([], {"LOCKBROKER_LISTEN": "::1:50051"}, "", ("LOCKBROKER_LISTEN", "[::1]:50051")),
        ([], {}, "[server]\nlisten = 50081\n", ("[server] listen", "HOST:PORT")),
        (["--log-level", "verbose"], {}, "", ("--log-level", "debug, info, warning, error")),
        ([], {"LOCKBROKER_AUDIT_FSYNC": "sometimes"}, "", ("LOCKBROKER_AUDIT_FSYNC", "always, interval, never")),
        ([], {}, '[server]\nhealth_interval = "often"\n', ("[server] health_interval", "a duration")),
        ([], {}, "[etcd]\nkey_root = 5\n", ("[etcd] key_root", "a string")),
    ],
)
def test_bad_values_name_the_setting_and_the_accepted_form(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml_text: str, named_form: tuple[str, str]
) -> None:
    named, form = named_form
    if toml_text:
        argv = [*argv, "--config", toml(tmp_path, toml_text)]
    with pytest.raises(ConfigError) as ei:
        config.load(flags(*argv), env)
    assert named in str(ei.value) and form in str(ei.value), str(ei.value)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "[::1]:0", "localhost:1", "0.0.0.0:50051", "broker-1.local:80"])
def test_good_listen_addresses(listen: str) -> None:
    assert config.load(flags("--listen", listen), {}).server.listen == listen


def test_etcd_binary_has_one_env_name() -> None:
    assert config._names("embedded", "binary") == ("--embedded-binary", "LOCKBROKER_ETCD_BINARY")
    assert config.load(flags(), {"LOCKBROKER_ETCD_BINARY": "/opt/etcd"}).embedded.binary == "/opt/etcd"
    assert config.load(flags(), {"LOCKBROKER_EMBEDDED_BINARY": "/opt/etcd"}).embedded.binary is None


def test_state_dir_is_xdg_unless_set_and_never_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Config().embedded.state_dir is None
    assert Config().embedded.resolved_state_dir({"XDG_STATE_HOME": "/xdg"}) == Path("/xdg/lockbroker")
    assert Config().embedded.resolved_state_dir({}) == Path.home() / ".local" / "state" / "lockbroker"
    rel = config.load(flags("--embedded-state-dir", "here"), {}).embedded.resolved_state_dir({})
    assert rel == tmp_path / "here" and rel.is_absolute()


def test_missing_files_are_refused_naming_the_setting(tmp_path: Path) -> None:
    ok = tmp_path / "ok.pem"
    ok.write_text("x")
    config.check_files(config.load(flags("--etcd-ca-file", str(ok)), {}))
    for argv, named in (
        (["--etcd-ca-file", str(tmp_path / "nope.pem")], "--etcd-ca-file / LOCKBROKER_ETCD_CA_FILE / [etcd] ca_file"),
        (["--tls-cert-file", str(tmp_path / "c.pem"), "--tls-key-file", str(ok)], "--tls-cert-file"),
        (["--auth-tenants-file", str(tmp_path / "t.toml")], "--auth-tenants-file"),
    ):
        with pytest.raises(ConfigError) as ei:
            config.check_files(config.load(flags(*argv), {}))
        assert named in str(ei.value) and "No such file" in str(ei.value), str(ei.value)
