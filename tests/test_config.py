"""Server configuration: flags, environment fallbacks, defaults, validation."""

from __future__ import annotations

import dataclasses

import pytest

from pairscore_server.config import ServerConfig
from pairscore_server.engine.spec import ModelSpec
from pairscore_server.flags import build_config, make_parser


def test_defaults_without_flags_or_env() -> None:
    config = build_config([], {})
    assert config == ServerConfig()
    assert config.host == "[::]"
    assert config.port == 50051
    assert config.metrics_port == 9090
    assert config.model == ModelSpec()
    assert config.model.host_allocator == "retain"
    assert config.address == "[::]:50051"
    assert config.metrics_host == "::"


def test_flags_fill_every_field() -> None:
    config = build_config(
        [
            "--host",
            "127.0.0.1",
            "--port",
            "6000",
            "--metrics-port",
            "0",
            "--model",
            "/models/x",
            "--revision",
            "abc",
            "--device",
            "cuda:1",
            "--dtype",
            "bfloat16",
            "--prefix-token",
            "<s>",
            "--cache-dir",
            "/tmp/c",
            "--max-batch-tokens",
            "1024",
            "--max-batch-pairs",
            "8",
            "--max-wait-ms",
            "2.5",
            "--grace-period",
            "3",
            "--log-level",
            "debug",
            "--stream-max-in-flight",
            "2",
            "--max-message-bytes",
            "4096",
            "--prepare-workers",
            "3",
            "--packing",
            "OFF",
            "--host-allocator",
            "System",
        ],
        {},
    )
    assert config == ServerConfig(
        host="127.0.0.1",
        port=6000,
        metrics_port=0,
        model=ModelSpec(
            model="/models/x",
            revision="abc",
            device="cuda:1",
            dtype="bfloat16",
            prefix_token="<s>",
            cache_dir="/tmp/c",
            max_batch_tokens=1024,
            packing="off",
            host_allocator="system",
        ),
        max_batch_pairs=8,
        max_wait_ms=2.5,
        grace_period_s=3.0,
        log_level="DEBUG",
        stream_max_in_flight=2,
        max_message_bytes=4096,
        prepare_workers=3,
    )
    assert config.max_wait_s == pytest.approx(0.0025)


def test_env_is_the_fallback_and_flags_win() -> None:
    env = {
        "PAIRSCORE_PORT": "7000",
        "PAIRSCORE_METRICS_PORT": "7001",
        "PAIRSCORE_MODEL": "env-model",
        "PAIRSCORE_DTYPE": "float16",
        "PAIRSCORE_MAX_WAIT_MS": "9",
        "PAIRSCORE_LOG_LEVEL": "warning",
        "UNRELATED": "ignored",
    }
    from_env = build_config([], env)
    assert (from_env.port, from_env.metrics_port, from_env.max_wait_ms) == (7000, 7001, 9.0)
    assert from_env.model.model == "env-model"
    assert from_env.model.dtype == "float16"
    assert from_env.log_level == "WARNING"

    flags_win = build_config(["--port", "8000", "--model", "flag-model"], env)
    assert flags_win.port == 8000
    assert flags_win.model.model == "flag-model"
    assert flags_win.metrics_port == 7001  # not given as a flag: env still applies


def test_empty_env_values_count_as_unset() -> None:
    assert build_config([], {"PAIRSCORE_PORT": "", "PAIRSCORE_MODEL": ""}) == ServerConfig()


@pytest.mark.parametrize("value", ["off", "OFF", "none", "-1"])
def test_metrics_can_be_switched_off(value: str) -> None:
    assert build_config(["--metrics-port", value], {}).metrics_port is None
    assert build_config([], {"PAIRSCORE_METRICS_PORT": value}).metrics_port is None


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["--port", "http"], {}, "--port"),
        ([], {"PAIRSCORE_PORT": "nope"}, "PAIRSCORE_PORT"),
        (["--port", "70000"], {}, "port must be"),
        (["--max-batch-pairs", "0"], {}, "max batch pairs"),
        (["--max-wait-ms", "-1"], {}, "max wait"),
        (["--device", "tpu"], {}, "device"),
        (["--dtype", "int8"], {}, "dtype"),
        (["--packing", "maybe"], {}, "packing must be"),
        ([], {"PAIRSCORE_HOST_ALLOCATOR": "tcmalloc"}, "host allocator must be one of ('retain', 'system')"),
        (["--log-level", "chatty"], {}, "log level"),
        (["--stream-max-in-flight", "0"], {}, "stream max in flight"),
        (["--max-pairs-per-request", "0"], {}, "max pairs per request"),
        (["--max-text-chars", "0"], {}, "max text chars"),
        (["--max-queue-tokens", "ten"], {}, "--max-queue-tokens"),
        (["--forward-timeout", "-5"], {}, "forward timeout"),
        (["--max-connection-age", "x"], {}, "--max-connection-age"),
        (["--tls-cert", "c.pem"], {}, "needs both --tls-cert and --tls-key"),
        (["--tls-client-ca", "ca.pem"], {}, "needs --tls-cert"),
        ([], {"PAIRSCORE_TLS_KEY": "k.pem"}, "needs both"),
        (["--no-such-flag"], {}, "unrecognized"),
    ],
)
def test_invalid_values_exit_2_naming_the_problem(
    argv: list[str], env: dict[str, str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_config(argv, env)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_config_is_frozen() -> None:
    config = build_config([], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.model = "other"  # type: ignore[misc]


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="grace period"):
        ServerConfig(grace_period_s=-1)


def test_help_names_every_flag_and_its_env_variable() -> None:
    text = make_parser().format_help()
    for flag, env in [
        ("--port", "PAIRSCORE_PORT"),
        ("--metrics-port", "PAIRSCORE_METRICS_PORT"),
        ("--model", "PAIRSCORE_MODEL"),
        ("--max-wait-ms", "PAIRSCORE_MAX_WAIT_MS"),
        ("--grace-period", "PAIRSCORE_GRACE_PERIOD"),
    ]:
        assert flag in text
        assert env in text


def test_reliability_and_security_settings_default_and_parse() -> None:
    default = build_config([], {})
    assert default.max_pairs_per_request == 1024
    assert default.max_text_chars == 100_000
    assert default.max_item_tokens is None  # the model's context
    assert default.max_queue_tokens is None  # 32 x max batch tokens
    assert default.max_concurrent_rpcs == 512
    assert default.forward_timeout_s == 120.0
    assert default.max_connection_age_s is None and default.max_connection_age_grace_s is None
    assert not default.tls and not default.auth_enabled

    config = build_config(
        [
            "--max-pairs-per-request",
            "10",
            "--max-text-chars",
            "500",
            "--max-item-tokens",
            "256",
            "--max-queue-tokens",
            "4096",
            "--max-concurrent-rpcs",
            "off",
            "--forward-timeout",
            "off",
            "--max-connection-age",
            "300",
            "--max-connection-age-grace",
            "30",
            "--tls-cert",
            "/etc/tls/tls.crt",
            "--tls-key",
            "/etc/tls/tls.key",
            "--tls-client-ca",
            "/etc/tls/ca.crt",
            "--auth-token-file",
            "/etc/pairscore/tokens",
        ],
        {},
    )
    assert (config.max_pairs_per_request, config.max_text_chars) == (10, 500)
    assert (config.max_item_tokens, config.max_queue_tokens) == (256, 4096)
    assert config.max_concurrent_rpcs is None and config.forward_timeout_s is None
    assert (config.max_connection_age_s, config.max_connection_age_grace_s) == (300.0, 30.0)
    assert config.tls and config.tls_client_ca == "/etc/tls/ca.crt"
    assert config.auth_enabled and config.auth_token_file == "/etc/pairscore/tokens"

    from_env = build_config([], {"PAIRSCORE_MAX_CONNECTION_AGE": "60", "PAIRSCORE_MAX_QUEUE_TOKENS": "0"})
    assert from_env.max_connection_age_s == 60.0
    assert from_env.max_queue_tokens is None  # 0 means the default


def test_auth_tokens_come_only_from_the_environment_and_never_show_in_repr() -> None:
    config = build_config([], {"PAIRSCORE_AUTH_TOKENS": "s3cret-one, s3cret-two\nthird"})
    assert config.auth_tokens == ("s3cret-one", "s3cret-two", "third")
    assert config.auth_enabled
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
    assert "--auth-tokens" not in make_parser().format_help()  # no flag: argv is visible in ps
    assert build_config([], {"PAIRSCORE_AUTH_TOKENS": " "}).auth_tokens == ()


def test_workers_and_device_lists() -> None:
    cfg = build_config(["--workers", "4", "--device", "cuda"], {})
    assert (cfg.model.workers, cfg.model.device) == (4, "cuda")
    cfg = build_config([], {"PAIRSCORE_DEVICE": "cuda:0,cuda:2"})
    assert cfg.model.device == "cuda:0,cuda:2" and cfg.model.workers == 1
    with pytest.raises(SystemExit):
        build_config(["--workers", "0"], {})
    with pytest.raises(SystemExit):
        build_config(["--device", "cuda:0,cpu"], {})
