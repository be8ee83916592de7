"""Settings read from INFERGATE_* environment variables (infergate.config)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from infergate.config import DEFAULT_MODELS_DIR, Destination, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.ae_title == "INFERGATE"
    assert settings.scp_port == 11112
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert settings.series_quiet_seconds == 5.0
    assert settings.allowed_calling_aes == []
    assert settings.pacs == []
    assert settings.models_dir == DEFAULT_MODELS_DIR
    assert settings.routing_rules_path == DEFAULT_MODELS_DIR / "routing.yaml"
    # The embedded database lives inside the (absolute) data folder; the broker is the filesystem.
    assert settings.data_path == (tmp_path / "var").resolve()
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'var' / 'infergate.db'}"
    assert settings.celery_broker_url == "filesystem://"
    assert settings.broker_dir == settings.data_path / "broker"


def test_data_dir_from_env_moves_the_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERGATE_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'infergate.db'}"
    assert settings.instances_dir == tmp_path.resolve() / "data" / "instances"


def test_explicit_urls_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_DATABASE_URL", "postgresql+psycopg://u@db/infergate")
    monkeypatch.setenv("INFERGATE_BROKER_URL", "redis://redis:6379/0")
    settings = Settings()
    assert settings.sqlalchemy_url == "postgresql+psycopg://u@db/infergate"
    assert settings.celery_broker_url == "redis://redis:6379/0"


def test_pacs_list_parses_to_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_PACS", "ORTHANC@127.0.0.1:4242,B@h:104")
    settings = Settings()
    assert settings.pacs == [
        Destination(ae_title="ORTHANC", host="127.0.0.1", port=4242),
        Destination(ae_title="B", host="h", port=104),
    ]
    assert [str(d) for d in settings.pacs] == ["ORTHANC@127.0.0.1:4242", "B@h:104"]


def test_pacs_tolerates_spaces_and_empty_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_PACS", " A@h:1 , ,B@k:2,")
    assert [str(d) for d in Settings().pacs] == ["A@h:1", "B@k:2"]


@pytest.mark.parametrize(
    "text",
    [
        "ORTHANC",  # no host
        "ORTHANC@host",  # no port
        "ORTHANC@host:port",  # port not a number
        "ORTHANC@host:0",  # port out of range
        "ORTHANC@host:70000",
        "@host:104",  # empty AE title
        "WAY_TOO_LONG_AE_TITLE@host:104",  # > 16 characters
        "BAD\\AE@host:104",  # backslash
        "A@b@c:104",
        "A@host:104,garbage",  # one bad item spoils the list
    ],
)
def test_bad_pacs_refused(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("INFERGATE_PACS", text)
    with pytest.raises(ValueError, match="pacs"):
        Settings()


@pytest.mark.parametrize("title", ["A" * 17, "BAD\\AE", "", "   ", "TAB\tAE"])
def test_bad_ae_title_refused(monkeypatch: pytest.MonkeyPatch, title: str) -> None:
    monkeypatch.setenv("INFERGATE_AE_TITLE", title)
    with pytest.raises(ValueError, match="ae_title"):
        Settings()


def test_ae_title_of_sixteen_characters_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_AE_TITLE", "A" * 16)
    assert Settings().ae_title == "A" * 16


def test_allowed_calling_aes_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_ALLOWED_CALLING_AES", "ORTHANC, STORESCU ,,MODALITY1")
    assert Settings().allowed_calling_aes == ["ORTHANC", "STORESCU", "MODALITY1"]


@pytest.mark.parametrize("value", ["ORTHANC,BAD\\AE", "ORTHANC," + "X" * 17])
def test_bad_allowed_calling_aes_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("INFERGATE_ALLOWED_CALLING_AES", value)
    with pytest.raises(ValueError, match="allowed_calling_aes"):
        Settings()


@pytest.mark.parametrize("value", ["0", "-1", "-0.5"])
def test_non_positive_quiet_period_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("INFERGATE_SERIES_QUIET_SECONDS", value)
    with pytest.raises(ValueError, match="series_quiet_seconds"):
        Settings()


def test_quiet_period_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_SERIES_QUIET_SECONDS", "0.25")
    assert Settings().series_quiet_seconds == 0.25


@pytest.mark.parametrize("name", ["job_max_attempts", "export_max_attempts", "worker_concurrency"])
def test_counts_below_one_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(f"INFERGATE_{name.upper()}", "0")
    with pytest.raises(ValueError, match=name):
        Settings()


def test_ports_and_log_level_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_SCP_PORT", "104")
    monkeypatch.setenv("INFERGATE_API_PORT", "9000")
    monkeypatch.setenv("INFERGATE_LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert (settings.scp_port, settings.api_port, settings.log_level) == (104, 9000, "DEBUG")


def test_unknown_log_level_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_LOG_LEVEL", "CHATTY")
    with pytest.raises(ValueError, match="log_level"):
        Settings()


def test_cors_origins_and_public_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_CORS_ORIGINS", "http://127.0.0.1:3000/, https://ohif.example.org")
    monkeypatch.setenv("INFERGATE_PUBLIC_BASE_URL", "https://ai.example.org:8443/infergate/")
    settings = Settings()
    assert settings.cors_origins == ["http://127.0.0.1:3000", "https://ohif.example.org"]
    assert settings.public_base_url == "https://ai.example.org:8443/infergate"


@pytest.mark.parametrize("origin", ["*", "ohif.example.org", "https://ohif.example.org/viewer", "ftp://x.org"])
def test_bad_cors_origin_refused(monkeypatch: pytest.MonkeyPatch, origin: str) -> None:
    monkeypatch.setenv("INFERGATE_CORS_ORIGINS", origin)
    with pytest.raises(ValueError, match="cors_origins"):
        Settings()


@pytest.mark.parametrize("url", ["ai.example.org", "https://ai.example.org/?x=1", "ftp://ai.example.org"])
def test_bad_public_base_url_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("INFERGATE_PUBLIC_BASE_URL", url)
    with pytest.raises(ValueError, match="public_base_url"):
        Settings()


def test_retention_keeps_everything_by_default_and_when_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.retain_inputs, settings.retain_results, settings.cleanup_interval_seconds) == (None, None, 3600.0)
    monkeypatch.setenv("INFERGATE_RETAIN_INPUTS_DAYS", "")
    monkeypatch.setenv("INFERGATE_RETAIN_RESULTS_DAYS", "0")
    settings = Settings()
    assert settings.retain_inputs is None and settings.retain_results is None


def test_retention_days_become_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGATE_RETAIN_INPUTS_DAYS", "30")
    monkeypatch.setenv("INFERGATE_RETAIN_RESULTS_DAYS", "0.5")
    settings = Settings()
    assert settings.retain_inputs == timedelta(days=30) and settings.retain_results == timedelta(hours=12)


@pytest.mark.parametrize(
    ("name", "value"),
    [("RETAIN_INPUTS_DAYS", "-1"), ("RETAIN_RESULTS_DAYS", "a week"), ("CLEANUP_INTERVAL_SECONDS", "0")],
)
def test_bad_retention_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"INFERGATE_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()
