"""The one typed place for configuration.

Every process builds a :class:`Settings` at its entry point with :func:`get_settings` and passes it
down; nothing else reads ``os.environ``. All variables carry the ``INFERGATE_`` prefix.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from infergate.config_types import (  # noqa: F401 - re-exported: the one place to import settings from
    JWT_ALGORITHMS,
    ApiKey,
    Destination,
    Scope,
    Source,
    _check_ae_title,
    _parse_items,
    _split_list,
    is_loopback,
)

#: The repository's ``models/`` folder, where the shipped ONNX models live.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    """Settings of every infergate process, read from ``INFERGATE_*`` environment variables."""

    # Errors name the setting and the reason but never echo the value: a misplaced API key or a database
    # password would otherwise reach the console and the logs of a refused start.
    model_config = SettingsConfigDict(env_prefix="INFERGATE_", extra="ignore", hide_input_in_errors=True)

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
    scp_require_called_ae: bool = Field(True, description="Reject associations whose called AE is not AE_TITLE.")
    scp_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated addresses or CIDR networks allowed to associate; empty: all."
    )
    scp_max_associations: int = Field(64, ge=1, description="Associations served at once; more: transient reject.")
    scp_max_associations_per_host: int = Field(16, ge=1, description="Associations per peer address at once; likewise.")
    scp_acse_timeout_seconds: float = Field(30.0, gt=0, description="Wait for A-ASSOCIATE/A-RELEASE or TLS handshake.")
    scp_dimse_timeout_seconds: float = Field(60.0, gt=0, description="Longest wait for a DIMSE message.")
    scp_network_timeout_seconds: float = Field(60.0, gt=0, description="Idle association or stalled PDU: aborted.")
    min_free_bytes: int = Field(1024**3, ge=0, description="Free-space watermark of DATA_DIR (0: off); see README.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate (chain) of the SCP; set to require TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key of TLS_CERT_FILE.")
    tls_ca_file: Path | None = Field(None, description="PEM CA of the senders' client certificates; needed with TLS.")
    audit_log: str | None = Field(None, description="Audit file, syslog://host:port or syslog:///dev/log.")

    api_host: str = Field("127.0.0.1", description="Address the REST API binds.")
    api_port: int = Field(8000, description="REST API port.")
    public_base_url: str | None = Field(
        None,
        description="The API's address as clients reach it (scheme://host[:port][/prefix]), used in RetrieveURL, "
        "BulkDataURI and result links; unset: taken from each request's Host header.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated browser origins (scheme://host[:port]) allowed to call the API, e.g. a "
        "viewer such as OHIF served elsewhere; empty sends no CORS headers.",
    )
    api_body_timeout_seconds: float = Field(
        60.0, description="Longest pause while a request body arrives; a stalled upload is answered 408."
    )
    api_keepalive_seconds: float = Field(5.0, description="How long an idle HTTP keep-alive connection stays open.")

    auth_required: bool | None = Field(
        None,
        description="Require authentication on the REST API; unset: required unless API_HOST is loopback "
        "and no method is configured.",
    )
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated static API keys, each name:sha256hex:scopes (scopes space-separated).",
    )
    api_keys_file: Path | None = Field(
        None, description="JSON/YAML list of API keys ({name, sha256, scopes}), read when the API starts."
    )
    jwt_issuer: str | None = Field(None, description="Accepted `iss` of bearer JWTs.")
    jwt_audience: str | None = Field(None, description="Accepted `aud` of bearer JWTs (this API's identifier).")
    jwks_file: Path | None = Field(None, description="JWKS file with the issuer's public keys, read at start.")
    jwks_url: str | None = Field(None, description="JWKS URL of the issuer (https, or http on loopback); cached.")
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "ES256"], description="Comma-separated accepted JWS algorithms."
    )
    jwt_leeway_seconds: float = Field(30.0, description="Clock skew allowed when checking exp/nbf/iat.")

    dicomweb_max_upload_bytes: int = Field(
        2 * 1024**3, ge=1, description="Largest STOW-RS request body (bytes); a larger one is refused with 413."
    )
    dicomweb_max_instances: int = Field(
        10_000, ge=1, description="Most instances (parts) in one STOW-RS request; more are refused with 413."
    )

    series_quiet_seconds: float = Field(5.0, description="A series is complete after this long without a new instance.")
    watcher_interval_seconds: float = Field(1.0, description="How often the watcher looks for complete series.")
    routing_rules: Path | None = Field(None, description="JSON/YAML routing rules; default models/routing.yaml.")
    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="Folder of model packages (one sub-folder per model).")

    pacs: Annotated[list[Destination], NoDecode] = Field(
        default_factory=list, description="Comma-separated result destinations, each AE@host:port."
    )
    sources: Annotated[list[Source], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated PACS to pull studies from, each NAME=AE@host:port (C-MOVE to this node) "
        "or NAME=AE@host:port/get (C-GET).",
    )
    export_max_attempts: int = Field(
        20,
        description="C-STORE attempts per result object and destination (20 with the default backoff: about an hour "
        "of PACS downtime before an export fails and waits for a re-drive).",
    )
    export_backoff_seconds: float = Field(2.0, description="First retry delay; doubles per attempt.")
    export_backoff_max_seconds: float = Field(300.0, description="Cap on the export retry delay.")

    retain_inputs_days: float = Field(
        0.0,
        ge=0,
        description="Days received series are kept after their last instance; 0 or empty keeps them forever. "
        "Only series whose jobs are settled and whose results were delivered are removed (docs/reliability.md).",
    )
    retain_results_days: float = Field(
        0.0,
        ge=0,
        description="Days a job's SEG/SR files and preview are kept after the job finished; 0 or empty keeps them "
        "forever. The job row, findings, measurements and export record stay.",
    )
    cleanup_interval_seconds: float = Field(3600.0, description="How often the watcher runs the retention cleanup.")

    job_max_attempts: int = Field(3, description="Attempts of a job before it is marked failed.")
    job_lease_seconds: float = Field(
        900.0,
        description="SQL lease of a running job, renewed every third of it while the job runs: the job of a worker "
        "that died is re-queued once its lease expired. It bounds that wait, not how long a job may run.",
    )
    reconcile_interval_seconds: float = Field(
        15.0, description="How often queued jobs without a live message are re-sent."
    )
    requeue_after_seconds: float = Field(60.0, description="A job queued this long without starting is re-sent.")
    job_time_limit_seconds: float = Field(
        3600.0, gt=0, description="A job still running after this long is stopped (its worker process killed)."
    )
    broker_visibility_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="Redis broker: a message a worker took but never acknowledged goes back to the queue after this "
        "long; default JOB_LEASE_SECONDS + 60. Shorter is safe (the SQL lease keeps a redelivered job from running "
        "twice) but redelivers the messages of longer jobs needlessly.",
    )

    onnx_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="ONNX Runtime providers in order; 'auto' takes TensorRT/CUDA when present, else CPU.",
    )
    onnx_threads: int = Field(0, description="Intra-op threads per ONNX session (0 = ONNX Runtime's default).")
    worker_concurrency: int = Field(1, description="Worker processes started by `infergate worker` / `up`.")
    max_volume_voxels: int = Field(
        2000 * 1024 * 1024,
        ge=1,
        description="Largest volume a worker builds (slices x rows x columns, 4 bytes each once decoded); a "
        "larger series fails its job before any pixel is decoded. The default fits 2000 slices of 1024 x 1024.",
    )
    node_url: str | None = Field(
        None,
        description="Workers on other machines: the node API's base URL (scheme://host[:port][/prefix]). Set, the "
        "worker fetches its input over WADO-RS and hands its SEG/SR back over HTTP instead of sharing DATA_DIR.",
    )
    node_api_key: SecretStr | None = Field(
        None, description="The API key (X-API-Key) a worker sends to NODE_URL; its scopes should be `worker`."
    )
    node_timeout_seconds: float = Field(
        60.0, gt=0, description="Longest wait for the node's answer (connecting, or each read of a transfer)."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of every process.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects with job_id and a study hash (infergate/logs.py)."
    )
    log_salt: SecretStr | None = Field(
        None,
        description="Secret mixed into the study hash of JSON log lines; default a random salt kept in "
        "DATA_DIR/log-salt. Set the same value on every machine whose logs should correlate.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Folder where every process writes its Prometheus metrics (multiprocess mode); default "
        "DATA_DIR/metrics. Local disk only: the files are memory-mapped.",
    )
    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of a worker's own Prometheus exporter (all interfaces, no authentication); 0: off. For "
        "workers on other machines, whose metrics the API's /metrics does not see.",
    )

    @field_validator(
        "allowed_calling_aes", "onnx_providers", "jwt_algorithms", "cors_origins", "scp_allowed_networks", mode="before"
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("retain_inputs_days", "retain_results_days", mode="before")
    @classmethod
    def _keep_forever(cls, value: object) -> object:
        """An empty variable means what it says in the README: keep forever (0)."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return 0.0
        return value

    @field_validator("scp_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f'Setting "scp_allowed_networks" takes addresses or CIDR networks; not "{item}".'
                ) from None
        return value

    @field_validator("audit_log")
    @classmethod
    def _audit_log(cls, value: str | None) -> str | None:
        if value and value.startswith("syslog:") and not (urlsplit(value).hostname or urlsplit(value).path):
            raise ValueError('Setting "audit_log" should be a file, syslog://host:port or syslog:///path/to/socket.')
        return value or None

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        """DICOM TLS is mutual (BCP 195, PS3.15 B.9): a certificate needs its key, and a CA for the senders."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None) or (self.tls_ca_file and not self.tls_cert_file):
            raise ValueError(
                "DICOM TLS needs INFERGATE_TLS_CERT_FILE, INFERGATE_TLS_KEY_FILE and INFERGATE_TLS_CA_FILE together."
            )
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ValueError(
                "DICOM TLS is configured without client certificates: set INFERGATE_TLS_CA_FILE to the CA that signs "
                "the senders' certificates. Without it any host could send studies, so the SCP refuses to start."
            )
        return self

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(item, "allowed_calling_aes") for item in value]

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        value = [origin.rstrip("/") for origin in value]
        for origin in value:
            url = urlsplit(origin)
            if url.scheme not in ("http", "https") or not url.hostname or url.path or url.query or url.fragment:
                raise ValueError(
                    f'Setting "cors_origins" takes origins such as https://viewer.example.org:3000; refused "{origin}" '
                    '(no path, no "*": each origin is named).'
                )
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = urlsplit(value.strip())
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ValueError('Setting "public_base_url" should look like https://host[:port][/prefix].')
        return value.strip().rstrip("/")

    @field_validator("node_url")
    @classmethod
    def _node_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = urlsplit(value.strip())
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment or url.username:
            raise ValueError('Setting "node_url" should look like https://host[:port][/prefix] (no credentials).')
        return value.strip().rstrip("/")

    @field_validator("pacs", mode="before")
    @classmethod
    def _pacs(cls, value: object) -> object:
        return _parse_items(value, Destination.parse)

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: object) -> object:
        return _parse_items(value, Source.parse)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value, "ae_title")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object) -> object:
        return _parse_items(value, ApiKey.parse)

    @field_validator("jwt_algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        unsafe = [name for name in value if name not in JWT_ALGORITHMS]
        if unsafe or not value:
            raise ValueError(
                f'Setting "jwt_algorithms" accepts only asymmetric algorithms ({", ".join(sorted(JWT_ALGORITHMS))}); '
                f"refused: {', '.join(unsafe) or 'an empty list'}."
            )
        return value

    @model_validator(mode="after")
    def _positive(self) -> Settings:
        for name in (
            "series_quiet_seconds",
            "watcher_interval_seconds",
            "job_lease_seconds",
            "export_backoff_seconds",
            "api_body_timeout_seconds",
            "api_keepalive_seconds",
            "cleanup_interval_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f'Setting "{name}" should be positive.')
        for name in ("export_max_attempts", "job_max_attempts", "worker_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f'Setting "{name}" should be at least 1.')
        return self

    @model_validator(mode="after")
    def _auth(self) -> Settings:
        """Refuse an API that would answer the network without authentication, or half-configured JWT."""
        names = ", ".join(key.name for key in self.api_keys)
        if len({key.name for key in self.api_keys}) != len(self.api_keys) or len(
            {key.sha256 for key in self.api_keys}
        ) != len(self.api_keys):
            raise ValueError(f'Setting "api_keys" repeats a name or a key digest ({names}).')
        if self.jwt_configured or self.jwks_file is not None or self.jwks_url is not None:
            if not (self.jwt_issuer and self.jwt_audience):
                raise ValueError('Bearer tokens need both "jwt_issuer" and "jwt_audience" to be set.')
            if (self.jwks_file is None) == (self.jwks_url is None):
                raise ValueError('Bearer tokens need exactly one of "jwks_file" and "jwks_url".')
        if self.jwks_url is not None:
            url = urlsplit(self.jwks_url)
            if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and is_loopback(url.hostname))):
                raise ValueError(
                    'Setting "jwks_url" should be an https:// URL (http:// only on loopback), '
                    "so that nobody on the path can substitute the signing keys."
                )
        if self.jwt_leeway_seconds < 0:
            raise ValueError('Setting "jwt_leeway_seconds" should not be negative.')
        if self.auth_required is False and not is_loopback(self.api_host):
            raise ValueError(
                f'Setting "auth_required" may be false only when the REST API binds loopback, not "{self.api_host}".'
            )
        if self.auth_enabled and not self.auth_configured:
            why = (
                f'The REST API binds "{self.api_host}", which is reachable from the network,'
                if not is_loopback(self.api_host)
                else 'Setting "auth_required" is true,'
            )
            raise ValueError(
                f"{why} but no authentication is configured. Set INFERGATE_API_KEYS or INFERGATE_API_KEYS_FILE, "
                "or INFERGATE_JWT_ISSUER, INFERGATE_JWT_AUDIENCE and INFERGATE_JWKS_FILE or INFERGATE_JWKS_URL "
                "(README, Authentication); or bind the API to 127.0.0.1."
            )
        return self

    # Derived values -----------------------------------------------------------------------------
    @cached_property
    def data_path(self) -> Path:
        """Absolute data folder, so that nothing depends on the working directory later."""
        return self.data_dir.expanduser().resolve()

    @property
    def jwt_configured(self) -> bool:
        """Whether bearer JWTs are accepted (the validator makes issuer, audience and JWKS go together)."""
        return bool(self.jwt_issuer or self.jwt_audience)

    @property
    def auth_configured(self) -> bool:
        """Whether any way to authenticate to the REST API is configured."""
        return bool(self.api_keys) or self.api_keys_file is not None or self.jwt_configured

    @property
    def auth_enabled(self) -> bool:
        """Whether the REST API checks credentials: as set, else unless it binds loopback with nothing configured."""
        if self.auth_required is not None:
            return self.auth_required
        return self.auth_configured or not is_loopback(self.api_host)

    @property
    def retain_inputs(self) -> timedelta | None:
        """How long received series are kept; None: forever."""
        return timedelta(days=self.retain_inputs_days) if self.retain_inputs_days > 0 else None

    @property
    def retain_results(self) -> timedelta | None:
        """How long result files are kept after their job finished; None: forever."""
        return timedelta(days=self.retain_results_days) if self.retain_results_days > 0 else None

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

    @cached_property
    def metrics_path(self) -> Path:
        """Absolute folder of the Prometheus multiprocess files (see :mod:`infergate.metrics`)."""
        if self.metrics_dir is None:
            return self.data_path / "metrics"
        return self.metrics_dir.expanduser().resolve()

    @property
    def routing_rules_path(self) -> Path:
        return self.routing_rules or (self.models_dir / "routing.yaml")


def get_settings() -> Settings:
    """Read the settings from the environment; call only at process entry points."""
    return Settings()
