"""The value types of settings: DICOM peers, API keys, pull sources, and the parsing of list variables.

Kept apart from :class:`infergate.config.Settings` so that each holds one thing; import them from
:mod:`infergate.config`, which re-exports them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash, no control chars
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")

#: What a caller of the REST API may do; ``admin`` implies the others, ``worker`` implies ``read``
#: (see service/api/auth.py).
Scope = Literal["read", "submit", "admin", "worker"]
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
#: Asymmetric JWS algorithms only: a JWKS holds public keys, and HS*/none would let a token choose its own key.
JWT_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})


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


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, ``127.0.0.0/8``, ``::1``).

    Any other name counts as reachable from the network, since a host name may resolve anywhere.
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiKey(BaseModel):
    """A static REST API key, held only as the SHA-256 hex digest of the key itself.

    Keeping the digest rather than the key means that settings, environment dumps and the keys file
    never disclose a usable credential.
    """

    model_config = ConfigDict(hide_input_in_errors=True)  # a raw key given by mistake stays out of errors

    name: str
    sha256: str
    scopes: frozenset[Scope]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _KEY_NAME.match(value):
            raise ValueError('API key "name" should be 1-64 letters, digits, ".", "_" or "-".')
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256_HEX.match(value):
            raise ValueError(
                f'API key "sha256" should be the 64-digit SHA-256 hex digest of the key (got {len(value)} characters), '
                "never the key itself."
            )
        return value.lower()

    @field_validator("scopes", mode="before")
    @classmethod
    def _scope_list(cls, value: object) -> object:
        return value.split() if isinstance(value, str) else value

    @field_validator("scopes")
    @classmethod
    def _some_scope(cls, value: frozenset[str]) -> frozenset[str]:
        if not value:
            raise ValueError('API key "scopes" should name at least one of read, submit, admin, worker.')
        return value

    @classmethod
    def parse(cls, text: str) -> ApiKey:
        """Parse ``name:sha256hex:scope1 scope2`` (the form ``INFERGATE_API_KEYS`` uses)."""
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise ValueError("An API key entry should have the form name:sha256hex:scopes (scopes space-separated).")
        return cls.model_validate({"name": parts[0], "sha256": parts[1], "scopes": parts[2]})


class Source(BaseModel):
    """A PACS the node can pull studies from (``POST /api/v1/jobs`` with ``source``)."""

    name: str
    peer: Destination
    method: Literal["move", "get"] = "move"

    @classmethod
    def parse(cls, text: str) -> Source:
        """Parse ``NAME=AE@host:port`` or ``NAME=AE@host:port/get``."""
        name, sep, rest = text.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
            raise ValueError(f'Source "{text}" should have the form NAME=AE@host:port[/get].')
        method: Literal["move", "get"] = "move"
        for suffix in ("/move", "/get"):
            if rest.endswith(suffix):
                rest, method = rest[: -len(suffix)], "get" if suffix == "/get" else "move"
        return cls(name=name, peer=Destination.parse(rest), method=method)


def _parse_items(value: object, parse: Callable[[str], object]) -> object:
    """A comma-separated string or a list, with the string items parsed (``AE@host:port`` and the like)."""
    value = _split_list(value)
    if isinstance(value, list):
        return [parse(item) if isinstance(item, str) else item for item in value]
    return value


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value
