"""Request limits that need the raw ASGI stream: a timeout on slow or stalled request bodies.

A client that declares a body and then stops sending would otherwise hold a worker thread, a spool
file and a connection forever (slowloris). Every ``receive`` of body bytes must arrive within
``INFERGATE_API_BODY_TIMEOUT_SECONDS`` of the previous one; otherwise the request ends with 408 and
the handler's clean-up (e.g. the STOW-RS spool) runs as for any other error.
"""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTimeout:
    """ASGI middleware bounding the pause between two chunks of a request body."""

    def __init__(self, app: ASGIApp, timeout_seconds: float) -> None:
        self.app = app
        self.timeout = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        body_done = False

        async def timed_receive() -> Message:
            # Only the body is timed: once it is complete, a receive waits for the client to go away
            # (Starlette listens so while streaming a response), which may rightly take long.
            nonlocal body_done
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
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
