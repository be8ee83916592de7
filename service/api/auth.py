"""Who may call the REST API: static API keys and OAuth2 bearer JWTs, each carrying scopes.

Two credentials are accepted, one per request:

``X-API-Key: <key>``
    A static key. Settings hold only its SHA-256 digest (``INFERGATE_API_KEYS`` or the file in
    ``INFERGATE_API_KEYS_FILE``), so a leaked configuration is no usable credential. A header of its own,
    rather than ``Authorization``, keeps "which kind of credential is this" out of guesswork and is the
    OpenAPI ``apiKey`` scheme clients already know.
``Authorization: Bearer <JWT>``
    An OAuth2 access token (RFC 6750), verified against the issuer's JWKS (a file read at start, or a URL
    fetched and cached), with its ``iss``, ``aud`` and ``exp`` checked. Scopes come from the ``scope``
    claim (space-separated, RFC 9068) or ``scp`` (list or string, as Azure AD and Okta issue them).

Scopes are ``read`` (query jobs, results, models; DICOMweb search and retrieve), ``submit`` (send data
in: STOW-RS, creating jobs), ``admin`` (operator actions such as retrying or cancelling any job) and
``worker`` (a worker on another machine: ``read``, to fetch its input over WADO-RS, plus handing a
running job's SEG/SR back, and nothing else); ``admin`` implies the other three. ``submit`` does not
imply ``read``: a modality or PACS that only sends studies should not be able to read patient data back.

Every router of the API except ``/health`` is included with :func:`require_method_scope`, so a route
needs ``read`` for GET/HEAD and ``submit`` for any other method without declaring anything; a route that
needs more adds ``dependencies=[require_scope("admin")]`` (both must pass, and ``admin`` satisfies both).

Failures answer 401 with a ``WWW-Authenticate`` challenge (missing, malformed, expired or otherwise
invalid credentials) or 403 (valid credentials lacking the scope). The ``{"detail": ...}`` body names
the reason only: never the token, the key, its claims, or anything about a patient.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import jwt
import yaml
from fastapi import Depends, HTTPException, Request, params
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from infergate.config import ApiKey, Scope, Settings
from service.api.schemas import ErrorOut

log = logging.getLogger(__name__)

SCOPES: tuple[Scope, ...] = ("read", "submit", "admin", "worker")
#: Scopes each granted scope confers.
_IMPLIES: dict[str, frozenset[Scope]] = {
    "read": frozenset({"read"}),
    "submit": frozenset({"submit"}),
    "admin": frozenset(SCOPES),
    # a remote worker reads its input series (WADO-RS) and the job rows; it never sends studies in
    "worker": frozenset({"worker", "read"}),
}
#: Methods that only read; every other method needs ``submit``.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
API_KEY_HEADER = "X-API-Key"
REALM = "infergate"
#: How long a JWKS fetched from a URL is trusted before it is fetched again (seconds).
JWKS_CACHE_SECONDS = 300.0
#: An unreachable JWKS URL should fail a request quickly, not hold a worker thread for PyJWT's 30 s.
JWKS_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Principal:
    """The caller of a request, once authenticated.

    Attributes
    ----------
    subject : str
        The API key's name, the token's ``sub`` (or ``client_id``/``azp`` for client-credential tokens
        without one), or ``"anonymous"`` when authentication is off.
    scopes : frozenset of str
        The scopes granted, with what ``admin`` implies already expanded.
    method : {"api_key", "jwt", "anonymous"}
        How the caller authenticated; ``anonymous`` only when the API binds loopback without auth.
    """

    subject: str
    scopes: frozenset[Scope]
    method: Literal["api_key", "jwt", "anonymous"]

    def has(self, scope: Scope) -> bool:
        """Whether the caller may do what ``scope`` allows."""
        return scope in self.scopes


ANONYMOUS = Principal(subject="anonymous", scopes=frozenset(SCOPES), method="anonymous")


class AuthFailure(Exception):
    """A refused credential; ``detail`` is safe to send back, ``error`` is the RFC 6750 error code."""

    def __init__(self, detail: str, error: str | None = "invalid_token") -> None:
        super().__init__(detail)
        self.detail = detail
        self.error = error


class AuthUnavailable(Exception):
    """The credential cannot be checked right now (the JWKS URL does not answer)."""


def _expand(scopes: Iterable[str]) -> frozenset[Scope]:
    """The known scopes among ``scopes`` with what they imply; unknown names are ignored."""
    out: set[Scope] = set()
    for scope in scopes:
        out |= _IMPLIES.get(scope, frozenset())
    return frozenset(out)


def load_api_keys_file(path: Path) -> list[ApiKey]:
    """Read a keys file: a JSON or YAML list of ``{name, sha256, scopes}`` objects.

    Parameters
    ----------
    path : pathlib.Path
        The file named by ``INFERGATE_API_KEYS_FILE``; an empty file holds no keys.

    Returns
    -------
    list of ApiKey
        The keys, in file order.

    Raises
    ------
    ValueError
        If the file cannot be read or an entry is malformed; the message names the file and the entry
        number but repeats no values, since a misplaced raw key must not reach the logs.
    """
    try:
        document = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f'API keys file "{path}" cannot be read: {type(exc).__name__}.') from None
    if document is None:
        return []
    if not isinstance(document, list):
        raise ValueError(f'API keys file "{path}" should hold a list of {{name, sha256, scopes}} entries.')
    keys = []
    for number, entry in enumerate(document, start=1):
        try:
            keys.append(ApiKey.model_validate(entry))
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f'API keys file "{path}", entry {number}: {reasons}') from None
    return keys


def _load_jwks_file(path: Path) -> list[jwt.PyJWK]:
    """The signing keys of a JWKS file (keys marked ``"use": "enc"`` are left out)."""
    try:
        jwk_set = jwt.PyJWKSet.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError, jwt.PyJWTError) as exc:
        raise ValueError(f'JWKS file "{path}" is not a usable JSON Web Key Set: {exc}') from None
    keys = [key for key in jwk_set.keys if key.public_key_use in ("sig", None)]
    if not keys:
        raise ValueError(f'JWKS file "{path}" holds no signing keys.')
    return keys


class _JwtVerifier:
    """Checks bearer JWTs against one issuer, audience and JWKS (file or URL)."""

    def __init__(self, settings: Settings) -> None:
        if settings.jwt_issuer is None or settings.jwt_audience is None:  # Settings enforces both; for mypy
            raise ValueError('Bearer tokens need both "jwt_issuer" and "jwt_audience" to be set.')
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._algorithms = list(settings.jwt_algorithms)
        self._leeway = settings.jwt_leeway_seconds
        self._keys = _load_jwks_file(settings.jwks_file) if settings.jwks_file is not None else []
        self._client = (
            jwt.PyJWKClient(settings.jwks_url, lifespan=JWKS_CACHE_SECONDS, timeout=JWKS_TIMEOUT_SECONDS)
            if settings.jwks_url is not None
            else None
        )

    def _signing_key(self, token: str) -> jwt.PyJWK:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthFailure("The bearer token is not a well-formed JWT.") from None
        if self._client is not None:
            if not isinstance(kid, str):
                raise AuthFailure("The bearer token names no signing key (kid).")
            try:
                return self._client.get_signing_key(kid)
            except jwt.PyJWKClientConnectionError as exc:
                raise AuthUnavailable(str(exc)) from None
            except jwt.PyJWKClientError:
                raise AuthFailure("The bearer token is signed with a key the issuer does not publish.") from None
        matching = [key for key in self._keys if key.key_id == kid] if kid is not None else []
        if kid is None and len(self._keys) == 1:
            matching = self._keys  # a single-key set need not name it
        if not matching:
            raise AuthFailure("The bearer token is signed with a key the issuer does not publish.")
        return matching[0]

    def verify(self, token: str) -> Principal:
        """Check the token's signature, issuer, audience and lifetime, and read its scopes.

        Raises
        ------
        AuthFailure
            For any token that is not valid now; the detail says which check failed.
        AuthUnavailable
            When the JWKS URL cannot be fetched, so no token can be checked.
        """
        key = self._signing_key(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailure("The bearer token has expired.") from None
        except jwt.InvalidAudienceError:
            raise AuthFailure("The bearer token is not issued for this API (audience).") from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("The bearer token is not from the accepted issuer.") from None
        except jwt.InvalidSignatureError:
            raise AuthFailure("The bearer token's signature is not valid.") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailure("The bearer token is not valid yet.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthFailure(f'The bearer token lacks the "{exc.claim}" claim.') from None
        except jwt.InvalidAlgorithmError:
            raise AuthFailure("The bearer token's signing algorithm is not accepted.") from None
        except jwt.PyJWTError:
            raise AuthFailure("The bearer token is not valid.") from None
        granted = claims.get("scope", claims.get("scp"))
        if isinstance(granted, str):
            names = granted.split()
        elif isinstance(granted, list):
            names = [name for name in granted if isinstance(name, str)]
        else:  # absent or of an unexpected type: authenticated, but allowed nothing
            names = []
        subject = next((str(claims[c]) for c in ("sub", "client_id", "azp") if claims.get(c)), "unknown")
        return Principal(subject=subject, scopes=_expand(names), method="jwt")


class Authenticator:
    """Everything needed to authenticate a request, built once per app from :class:`Settings`.

    Built in ``create_app``, so that a bad keys or JWKS file stops the API at start rather than failing
    each request. A JWKS URL is fetched only when the first token arrives, so the API starts while the
    identity provider is down.

    Parameters
    ----------
    settings : infergate.config.Settings
        ``auth_enabled``, ``api_keys``, ``api_keys_file`` and the ``jwt_*``/``jwks_*`` settings.

    Raises
    ------
    ValueError
        If the keys or JWKS file is unusable, a key appears twice, or authentication is required and
        no credential could ever pass (an empty keys file and no JWT).
    """

    def __init__(self, settings: Settings) -> None:
        self.required = settings.auth_enabled
        keys = list(settings.api_keys)
        if settings.api_keys_file is not None:
            keys += load_api_keys_file(settings.api_keys_file)
        self._keys: dict[str, ApiKey] = {}
        for key in keys:
            if key.sha256 in self._keys or any(k.name == key.name for k in self._keys.values()):
                raise ValueError(f'API key "{key.name}" is configured twice (same name or same key).')
            self._keys[key.sha256] = key
        self._jwt = _JwtVerifier(settings) if settings.jwt_configured else None
        if self.required and not self._keys and self._jwt is None:
            raise ValueError(
                f'API keys file "{settings.api_keys_file}" lists no keys and no other authentication is '
                "configured, so no request could pass; add a key (README, Authentication)."
            )
        methods = [m for m, on in (("API keys", bool(self._keys)), ("bearer JWTs", self._jwt is not None)) if on]
        if self.required:
            log.info("REST API authentication: %s", " and ".join(methods))
        else:
            log.info("REST API authentication is off: the API binds %s (loopback)", settings.api_host)

    def challenge(self, error: str | None = None, scope: Scope | None = None) -> str:
        """The ``WWW-Authenticate`` value for a 401/403: one challenge per configured method (RFC 9110 11.6.1)."""
        challenges = []
        if self._jwt is not None or not self._keys:
            params_ = [f'realm="{REALM}"']
            if error:
                params_.append(f'error="{error}"')
            if scope:
                params_.append(f'scope="{scope}"')
            challenges.append("Bearer " + ", ".join(params_))
        if self._keys:
            challenges.append(f'ApiKey realm="{REALM}", header="{API_KEY_HEADER}"')
        return ", ".join(challenges)

    def _check_key(self, presented: str) -> Principal:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for stored, key in self._keys.items():  # compare with every key, in constant time each
            if hmac.compare_digest(stored, digest):
                found = key
        if found is None:
            raise AuthFailure("The API key is not valid.")
        return Principal(subject=found.name, scopes=_expand(found.scopes), method="api_key")

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller behind a request's credentials.

        Parameters
        ----------
        authorization : str or None
            The ``Authorization`` header as sent; only ``Bearer <JWT>`` is accepted.
        api_key : str or None
            The value of ``X-API-Key``.

        Returns
        -------
        Principal
            :data:`ANONYMOUS` when authentication is off.

        Raises
        ------
        AuthFailure
            No credential, more than one, an unsupported scheme, or an invalid credential. The detail
            never repeats what was sent: a token pasted without its scheme would otherwise come back.
        AuthUnavailable
            The JWKS URL cannot be fetched.
        """
        if not self.required:
            return ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme and api_key is not None:
            raise AuthFailure("Send one credential: either a bearer token or an API key, not both.", "invalid_request")
        if api_key is not None:
            if not self._keys:
                raise AuthFailure("API keys are not accepted here; send a bearer token.", "invalid_request")
            return self._check_key(api_key)
        if scheme:
            if scheme.lower() != "bearer":
                raise AuthFailure("Only the Bearer authorization scheme is supported.", "invalid_request")
            if self._jwt is None:
                raise AuthFailure(f"Bearer tokens are not accepted here; send the {API_KEY_HEADER} header.")
            if not token.strip():
                raise AuthFailure("The bearer token is empty.", "invalid_request")
            return self._jwt.verify(token.strip())
        raise AuthFailure("Authentication is required.", None)


_SCOPE_RULE = (
    "GET needs the `read` scope, other methods `submit`; handing a job's results back needs `worker` "
    "(which implies `read`); `admin` implies all."
)
_bearer_scheme = HTTPBearer(
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="OAuth2 access token (JWT) from the configured issuer, scopes in `scope` or `scp`. " + _SCOPE_RULE,
    auto_error=False,
)
_api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="apiKeyAuth",
    description="Static API key; the node stores only its SHA-256 digest. " + _SCOPE_RULE,
    auto_error=False,
)


def get_principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
    api_key: Annotated[str | None, Depends(_api_key_scheme)],
) -> Principal:
    """Authenticate the request (no scope check); FastAPI caches it per request.

    ``bearer`` is there to put the scheme in the OpenAPI document; the raw ``Authorization`` header is
    read instead, since ``HTTPBearer`` reports any other scheme as no header at all. A plain ``def``:
    checking a token may fetch the JWKS URL, which blocks.

    Raises
    ------
    fastapi.HTTPException
        401 with ``WWW-Authenticate`` when the credentials are missing or invalid; 503 when the JWKS
        URL cannot be fetched, since the fault is not the caller's.
    """
    authenticator: Authenticator = request.app.state.authenticator
    try:
        principal = authenticator.authenticate(request.headers.get("Authorization"), api_key)
    except AuthFailure as exc:
        log.info("REST API request refused (401): %s", exc.detail)
        raise HTTPException(401, exc.detail, headers={"WWW-Authenticate": authenticator.challenge(exc.error)}) from None
    except AuthUnavailable as exc:
        log.warning("cannot check a bearer token: %s", exc)
        raise HTTPException(503, "Bearer tokens cannot be checked now: the issuer's keys are unreachable.") from None
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _forbid(request: Request, principal: Principal, scope: Scope) -> None:
    if principal.has(scope):
        return
    log.info("REST API request refused (403): %s lacks the %s scope", principal.method, scope)
    authenticator: Authenticator = request.app.state.authenticator
    headers = (
        {"WWW-Authenticate": authenticator.challenge("insufficient_scope", scope)}
        if principal.method == "jwt"
        else None
    )
    raise HTTPException(403, f'This operation needs the "{scope}" scope.', headers=headers)


def require_scope(scope: Scope) -> params.Depends:
    """A dependency that lets the request through only with ``scope`` (or ``admin``).

    Returns a ``Depends`` rather than an ``Annotated`` type because mypy accepts no call in an
    annotation: use it in ``dependencies=[require_scope("admin")]``, and the aliases
    :data:`ReadPrincipal`, :data:`SubmitPrincipal` and :data:`AdminPrincipal` as parameter types.

    Raises
    ------
    ValueError
        If ``scope`` is not one of :data:`SCOPES`.
    """
    if scope not in SCOPES:
        raise ValueError(f'Argument "scope" should be one of {", ".join(SCOPES)}.')

    def check_scope(request: Request, principal: PrincipalDep) -> Principal:
        _forbid(request, principal, scope)
        return principal

    check_scope.__name__ = f"require_{scope}"
    return Depends(check_scope)


def require_method_scope(request: Request, principal: PrincipalDep) -> Principal:
    """``read`` for GET/HEAD/OPTIONS, ``submit`` for any other method: the default of every protected router.

    Deciding by method keeps routers free of auth code and protects a new router as soon as it is
    included; routes needing ``admin`` add :func:`require_scope` on top.
    """
    _forbid(request, principal, "read" if request.method in SAFE_METHODS else "submit")
    return principal


ReadPrincipal = Annotated[Principal, require_scope("read")]
SubmitPrincipal = Annotated[Principal, require_scope("submit")]
AdminPrincipal = Annotated[Principal, require_scope("admin")]

#: ``include_router`` keyword arguments of a protected router: the method scope, and the 401/403 answers
#: documented in the OpenAPI document.
PROTECTED: Mapping[str, Any] = {
    "dependencies": [Depends(require_method_scope)],
    "responses": {
        401: {"model": ErrorOut, "description": "Missing, malformed, expired or otherwise invalid credentials."},
        403: {"model": ErrorOut, "description": "The credentials lack the scope this operation needs."},
    },
}
#: ``include_router`` keyword arguments of a router only workers (and ``admin``) may call, whatever the
#: method: handing results back is not ``submit`` (which would let any sender forge a job's output).
WORKERS_ONLY: Mapping[str, Any] = {"dependencies": [require_scope("worker")], "responses": PROTECTED["responses"]}
