"""The node's HTTP API as a worker on another machine sees it: WADO-RS in, results back.

A worker that shares only the broker, the database and the node's HTTP address
(``INFERGATE_NODE_URL``) cannot open the node's data folder. It retrieves instances with WADO-RS
(PS3.18 10.4, as stored: ``transfer-syntax=*``, so its input is byte for byte what the node holds)
and hands each SEG/SR back with ``PUT /api/v1/jobs/{job_id}/results/{kind}/{sop_instance_uid}``
(:mod:`infergate.result_upload`), authenticated with the API key of ``INFERGATE_NODE_API_KEY``.

Responses are streamed into a file the caller gives, never held whole in memory. Every failure
(refused connection, timeout, a 4xx or 5xx answer) raises :class:`NodeUnavailable`, a
:class:`~infergate.errors.TransientError`, so the job is tried again with backoff rather than failed
at once. Messages name the node's address and the transaction, never a UID or anything about a
patient, since they go to the job's error and to the log.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPException, HTTPResponse
from typing import IO
from urllib.parse import quote, urlencode

from infergate.config import Settings
from infergate.errors import TransientError

log = logging.getLogger(__name__)

__all__ = ["API_KEY_HEADER", "DICOM_AS_STORED", "NodeClient", "NodeUnavailable"]

#: The header the node's API reads keys from (service/api/auth.py; the worker does not import the service).
API_KEY_HEADER = "X-API-Key"
#: WADO-RS Accept for instances as stored (PS3.18 8.7.3.5.2): no transcoding on the node.
DICOM_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_COPY_CHUNK = 1024 * 1024
_DETAIL_BYTES = 4096


class NodeUnavailable(TransientError):
    """The node's API did not answer, or refused a transfer; the operation may be retried."""


def _detail(exc: urllib.error.HTTPError) -> str:
    """The ``{"detail": …}`` of an error answer (the node's details name no patient data), shortened."""
    try:
        raw = exc.read(_DETAIL_BYTES)
    except OSError:
        return exc.reason if isinstance(exc.reason, str) else "no detail"
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else str(exc.reason)
    return text[:300]


class NodeClient:
    """A small DICOMweb and results client of one node, on the standard library's HTTP client.

    Parameters
    ----------
    base_url : str
        The node API's base URL, without a trailing slash (``Settings.node_url``).
    api_key : str or None
        Sent as ``X-API-Key``; None where the node's API checks no credentials (loopback only).
    timeout : float
        Seconds to wait for a connection, and for each read while a body streams.
    """

    def __init__(self, base_url: str, *, api_key: str | None, timeout: float) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError('Argument "base_url" should start with http:// or https://.')
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        # No environment proxies: the node is an internal peer, and a proxy would see the API key.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeClient | None:
        """The client of ``INFERGATE_NODE_URL``, or None for a worker that shares the node's data folder."""
        if settings.node_url is None:
            return None
        key = settings.node_api_key.get_secret_value() if settings.node_api_key is not None else None
        return cls(settings.node_url, api_key=key, timeout=settings.node_timeout_seconds)

    @contextmanager
    def _open(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[HTTPResponse]:
        """An answered request whose status is 2xx; anything else raises :class:`NodeUnavailable`."""
        url = self.base_url + path + (f"?{urlencode(query)}" if query else "")
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        if self._api_key is not None:
            request.add_header(API_KEY_HEADER, self._api_key)
        try:
            response = self._opener.open(request, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                detail = _detail(exc)
            raise NodeUnavailable(f"the node at {self.base_url} answered {exc.code} to {what}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, unresolvable, timed out, TLS failure
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise NodeUnavailable(f"the node at {self.base_url} is unreachable for {what} ({reason})") from None
        with response:
            yield response

    def _download(self, path: str, what: str, into: IO[bytes]) -> str:
        """Stream a WADO-RS answer into ``into``; returns its Content-Type."""
        with self._open("GET", path, what, headers={"Accept": DICOM_AS_STORED}) as response:
            content_type = response.headers.get("Content-Type", "")
            while True:
                try:
                    chunk = response.read(_COPY_CHUNK)
                except (OSError, HTTPException) as exc:  # timed out, reset, or the body ended early
                    raise NodeUnavailable(
                        f"the transfer from the node at {self.base_url} broke off ({what}: {type(exc).__name__})"
                    ) from None
                if not chunk:
                    return content_type
                into.write(chunk)  # a local disk error is not the node's: it propagates as it is

    def retrieve_series(self, study_uid: str, series_uid: str, into: IO[bytes]) -> str:
        """WADO-RS Retrieve Series (PS3.18 10.4.1), as stored, streamed into ``into``; returns the Content-Type."""
        path = f"/dicomweb/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}"
        return self._download(path, "WADO-RS retrieve series", into)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str, into: IO[bytes]) -> str:
        """WADO-RS Retrieve Instance, as stored, streamed into ``into``; returns the Content-Type."""
        path = (
            f"/dicomweb/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}"
            f"/instances/{quote(sop_instance_uid, safe='')}"
        )
        return self._download(path, "WADO-RS retrieve instance", into)

    def store_result(
        self, job_id: int, kind: str, sop_instance_uid: str, data: bytes, *, model_version: str, attempt: int
    ) -> None:
        """Hand a SEG/SR back to the node, which keeps it where the job's result row will point.

        Parameters
        ----------
        job_id : int
            The job that made it; the node checks that it is running under ``attempt``.
        kind, sop_instance_uid : str
            ``"SEG"`` or ``"SR"``, and the object's SOP Instance UID.
        data : bytes
            The Part 10 file as written locally.
        model_version : str
            The version of the model that ran, from which the result's UIDs derive.
        attempt : int
            The attempt this worker runs.
        """
        path = f"/api/v1/jobs/{int(job_id)}/results/{quote(kind, safe='')}/{quote(sop_instance_uid, safe='')}"
        query = {"model_version": model_version, "attempt": str(int(attempt))}
        headers = {"Content-Type": "application/dicom"}
        with self._open("PUT", path, "handing a result back", query=query, body=data, headers=headers) as response:
            response.read()
