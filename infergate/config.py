"""The one typed place for configuration.

Every process builds a :class:`Settings` at its entry point with :func:`get_settings` and passes it
down; nothing else reads ``os.environ``. All variables carry the ``INFERGATE_`` prefix.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The repository's ``models/`` folder, where the shipped ONNX models live.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash, no control chars
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


def _check_ae_title(value: str, name: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError(f'Argument "{name}" should be 1-16 printable characters without backslash.')
    return stripped


class Destination(BaseModel):
    """A DICOM peer to which results are sent with C-STORE."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@host:port``."""
        match = _DESTINATION.match(text.strip())
        if match is None:
            raise ValueError(f'Destination "{text}" should have the form AE@host:port.')
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f'Destination "{text}" has a port outside 1-65535.')
        return cls(ae_title=_check_ae_title(match["ae"], "ae_title"), host=match["host"], port=port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Settings of every infergate process, read from ``INFERGATE_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="INFERGATE_", extra="ignore")

    data_dir: Path = Field(
        Path("./var"), description="Where received instances, results and the embedded database live."
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in DATA_DIR.")
    broker_url: str | None = Field(None, description="Celery broker URL; default a filesystem broker in DATA_DIR.")

    ae_title: str = Field("INFERGATE", description="The node's DICOM AE title.")
    scp_host: str = Field("127.0.0.1", description="Address the DICOM SCP binds; 0.0.0.0 to accept from the network.")
    scp_port: int = Field(11112, description="DICOM SCP port.")
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated calling AE titles allowed to associate; empty allows all."
    )
    max_pdu: int = Field(1_048_576, description="Maximum PDU size the SCP and SCU accept (bytes; 0 = unlimited).")

    api_host: str = Field("127.0.0.1", description="Address the REST API binds.")
    api_port: int = Field(8000, description="REST API port.")

    series_quiet_seconds: float = Field(5.0, description="A series is complete after this long without a new instance.")
    watcher_interval_seconds: float = Field(1.0, description="How often the watcher looks for complete series.")
    routing_rules: Path | None = Field(None, description="JSON/YAML routing rules; default models/routing.yaml.")
    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="Folder of model packages (one sub-folder per model).")

    pacs: Annotated[list[Destination], NoDecode] = Field(
        default_factory=list, description="Comma-separated result destinations, each AE@host:port."
    )
    export_max_attempts: int = Field(8, description="C-STORE attempts per result object and destination.")
    export_backoff_seconds: float = Field(2.0, description="First retry delay; doubles per attempt.")
    export_backoff_max_seconds: float = Field(300.0, description="Cap on the export retry delay.")

    job_max_attempts: int = Field(3, description="Attempts of a job before it is marked failed.")
    job_lease_seconds: float = Field(900.0, description="A running job whose lease expired is re-queued.")
    reconcile_interval_seconds: float = Field(
        15.0, description="How often queued jobs without a live message are re-sent."
    )
    requeue_after_seconds: float = Field(60.0, description="A job queued this long without starting is re-sent.")

    onnx_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="ONNX Runtime providers in order; 'auto' takes TensorRT/CUDA when present, else CPU.",
    )
    onnx_threads: int = Field(0, description="Intra-op threads per ONNX session (0 = ONNX Runtime's default).")
    worker_concurrency: int = Field(1, description="Worker processes started by `infergate worker` / `up`.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of every process.")

    @field_validator("allowed_calling_aes", "onnx_providers", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(item, "allowed_calling_aes") for item in value]

    @field_validator("pacs", mode="before")
    @classmethod
    def _pacs(cls, value: object) -> object:
        value = _split_list(value)
        if isinstance(value, list):
            return [Destination.parse(item) if isinstance(item, str) else item for item in value]
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value, "ae_title")

    @model_validator(mode="after")
    def _positive(self) -> Settings:
        for name in ("series_quiet_seconds", "watcher_interval_seconds", "job_lease_seconds", "export_backoff_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f'Setting "{name}" should be positive.')
        for name in ("export_max_attempts", "job_max_attempts", "worker_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f'Setting "{name}" should be at least 1.')
        return self

    # Derived values -----------------------------------------------------------------------------
    @cached_property
    def data_path(self) -> Path:
        """Absolute data folder, so that nothing depends on the working directory later."""
        return self.data_dir.expanduser().resolve()

    @property
    def instances_dir(self) -> Path:
        return self.data_path / "instances"

    @property
    def results_dir(self) -> Path:
        return self.data_path / "results"

    @property
    def broker_dir(self) -> Path:
        return self.data_path / "broker"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'infergate.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def routing_rules_path(self) -> Path:
        return self.routing_rules or (self.models_dir / "routing.yaml")


def get_settings() -> Settings:
    """Read the settings from the environment; call only at process entry points."""
    return Settings()
