"""Request limits that need the raw ASGI stream: body size, body encoding and stalled bodies.

FastAPI reads a JSON body whole into memory, and a client that declares a body and then stops
sending would hold a worker thread, a spool file and a connection forever (slowloris). So, before
any route runs:

* a body larger than its route allows is refused with 413, from ``Content-Length`` at once, or
  while it streams when it comes chunked (STOW-RS and a worker's results handed back may send up to
  ``INFERGATE_DICOMWEB_MAX_UPLOAD_BYTES``; every other route takes small JSON);
* a compressed body (``Content-Encoding`` other than identity) is refused with 415: inflating it
  would let a few kilobytes become gigabytes (a "zip bomb");
* every chunk of body must arrive within ``INFERGATE_API_BODY_TIMEOUT_SECONDS`` of the previous
  one; otherwise the request ends with 408 and the handler's clean-up (e.g. the STOW-RS spool)
  runs as for any other error.
"""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Largest body of any route but STOW-RS: job requests are a few hundred bytes of JSON.
MAX_JSON_BODY_BYTES = 1024 * 1024
#: Paths that take DICOM uploads (STOW-RS) and their larger limit.
UPLOAD_PREFIX = "/dicomweb/studies"
#: A remote worker's SEG/SR handed back (``PUT``, infergate.result_upload): a SEG may be large too.
RESULT_UPLOAD = re.compile(r"\A/api/v1/jobs/[^/]+/results/[^/]+/[^/]+\Z")


class RequestLimits:
    """ASGI middleware applying the limits above to every HTTP request."""

    def __init__(self, app: ASGIApp, *, body_timeout_seconds: float, max_upload_bytes: int) -> None:
        self.app = app
        self.timeout = body_timeout_seconds
        self.max_upload = max_upload_bytes

    def limit_for(self, scope: Scope) -> int:
        """The most body bytes the route of ``scope`` accepts."""
        path: str = scope.get("path", "")
        if scope.get("method") == "POST" and path.startswith(UPLOAD_PREFIX):
            return self.max_upload
        if scope.get("method") == "PUT" and RESULT_UPLOAD.match(path):
            return self.max_upload
        return MAX_JSON_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        limit = self.limit_for(scope)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await _refuse(send, 415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed.")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, 413, f"The request body exceeds {limit} bytes.")
            return

        body_done = False
        received = 0

        async def limited_receive() -> Message:
            # Only the body is timed: once it is complete, a receive waits for the client to go away
            # (Starlette listens so while streaming a response), which may rightly take long.
            nonlocal body_done, received
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"The request body stalled for more than {self.timeout:g} s; send it again.",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(
                        413, f"The request body exceeds {limit} bytes.", headers={"Connection": "close"}
                    )
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    """Answer ``status`` with the API's usual ``{"detail": ...}`` body and close the connection."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
