"""Request body size limit as a pure ASGI middleware.

Checked before any route code runs: a declared ``Content-Length`` over the limit is refused
without reading the body, and a chunked body is counted as it streams in, so an oversized
request can neither exhaust memory nor reach the database.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _payload(self) -> bytes:
        detail = [
            {
                "loc": ["body"],
                "msg": f"request body exceeds the limit of {self.max_bytes} bytes",
                "type": "body_too_large",
            }
        ]
        return json.dumps({"detail": detail}).encode()

    async def _reject(self, send: Send) -> None:
        body = self._payload()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await self._reject(send)
                    return
            except ValueError:
                await self._reject(send)
                return
        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            # Past the limit the 413 is sent right here and the app sees a client disconnect, so
            # whatever the framework does with the aborted body read, nothing reaches the route.
            nonlocal received, rejected, started
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    if not started:
                        started = True
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if rejected:
                return  # the 413 has been sent; drop the app's own error response
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
