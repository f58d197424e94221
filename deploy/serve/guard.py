"""What every connection meets before any route: a deadline for its headers and its body, the
request-body limit whatever the framing, and no new work while the server drains.

``Guard`` is a pure ASGI layer (outside FastAPI), so a body is counted as it streams and refused
at the limit — never read whole — and a refused request's connection is closed rather than read
to its end. ``request_deadline_protocol`` is uvicorn's HTTP/1.1 protocol with a deadline for each
request's headers (uvicorn has none: a client that sends half a request line and waits would hold
its connection for ever).
"""

from __future__ import annotations

import asyncio
import json

RETRY_AFTER_S = 2


def header(scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key.lower() == name]


async def send_error(send, status: int, message: str, code: str, kind: str = "invalid_request_error",
                     headers: dict | None = None) -> None:
    """An OpenAI-shaped error; the connection closes after it (the rest of a refused body is never read)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    extra = [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wraps the ASGI app: ``is_draining()`` turns new POSTs under ``/v1/`` into 503s with Retry-After."""

    def __init__(self, app, max_body_bytes: int, is_draining, request_timeout_s: float = 30.0):
        self.app, self.max_body_bytes, self.is_draining = app, max_body_bytes, is_draining
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths, encodings = header(scope, b"content-length"), header(scope, b"transfer-encoding")
        limit = self.max_body_bytes
        if lengths and encodings:  # RFC 9112 §6.3: a request smuggling attempt, or a broken client
            return await send_error(send, 400, "the request has both Content-Length and Transfer-Encoding; send "
                                               "one of them", "ambiguous_framing")
        if lengths and (len(lengths) > 1 or not lengths[0].isdigit()):
            return await send_error(send, 400, f"Content-Length {b', '.join(lengths).decode(errors='replace')!r} is "
                                               f"not one non-negative integer", "bad_content_length")
        if lengths and int(lengths[0]) > limit:
            return await send_error(send, 413, f"the request body is {int(lengths[0])} bytes, above the limit of "
                                               f"{limit} (--max-body-mib); send less", "request_too_large")
        if self.is_draining() and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            return await send_error(send, 503, "the server is shutting down; retry on another instance",
                                    "shutting_down", "service_unavailable", {"Retry-After": RETRY_AFTER_S})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = bytearray()

        async def read_body() -> bool:
            """The whole body, counted as it arrives (at most the limit is ever held); False when
            the client went away."""
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                body.extend(message.get("body", b""))
                if len(body) > limit or not message.get("more_body", False):
                    return True

        try:
            if not await asyncio.wait_for(read_body(), self.request_timeout_s):
                return
        except asyncio.TimeoutError:
            return await send_error(send, 408, f"the request body did not arrive within {self.request_timeout_s:g} s "
                                               f"(--request-timeout-s)", "request_timeout")
        if len(body) > limit:
            return await send_error(send, 413, f"the request body is more than {limit} bytes, above the limit "
                                               f"(--max-body-mib); send less", "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def request_deadline_protocol(timeout_s: float):
    """uvicorn's h11 protocol, plus: each request's headers must arrive within ``timeout_s`` of the
    connection opening (or of the previous response ending), else the connection is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def data_received(self, data):
            super().data_received(data)
            if self._in_request() and self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def connection_lost(self, exc):
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self):
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self):
            self.deadline = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return DeadlineProtocol
