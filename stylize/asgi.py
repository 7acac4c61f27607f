"""ASGI plumbing for the guard's middleware (stylize.guard.Guard): a request's body read, drained or handed on,
a refusal, a response held back, a Range header gradio cannot serve left out. No limits are set here."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from starlette.responses import JSONResponse


async def body_of(receive: Callable, limit: int) -> bytes | None:
    """The whole request body, or None when it passes `limit` bytes (the rest is then drained, unkept)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False):
            break
        if size > limit:
            await drain(receive)
            break
    return b"".join(chunks) if size <= limit else None


async def drain(receive: Callable, limit: int = 64 * 2**20) -> None:
    """Read and drop what is left of a refused request's body, up to `limit` bytes: a proxy in front (gradio's
    own Node server) answers 502 instead of the refusal when the server answers before it has sent the body."""
    read, more = 0, True
    while more and read <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        read += len(message.get("body", b""))
        more = message.get("more_body", False)


def replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that hands the app a body already read, then the connection's own messages (a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def refuse(scope: dict, receive: Callable, send: Callable, status: int, message: str) -> None:
    """The page shows `detail` of a refused request; the status says the same to a script."""
    await JSONResponse({"detail": message, "error": message}, status_code=status)(scope, receive, send)


class HeldResponse:
    """A response kept back until the upload's files are counted."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def send(self, message: dict) -> None:
        self.messages.append(message)

    def files(self) -> list[str]:
        if not self.messages or self.messages[0].get("status") != 200:
            return []
        try:
            files = json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))
        except ValueError:
            return []
        return files if isinstance(files, list) else []

    async def replay(self, send: Callable) -> None:
        for message in self.messages:
            await send(message)


_ONE_RANGE = re.compile(rb"bytes=\d*-\d*")


def one_range_at_most(scope: dict) -> dict:
    """The request without a Range header that asks for anything but one range of bytes: gradio's file route
    reads one range only and fails (500) on several. A server may ignore Range: those get the whole file."""
    headers = [
        (key, value)
        for key, value in scope["headers"]
        if key.lower() != b"range" or _ONE_RANGE.fullmatch(value.strip())
    ]
    return scope if len(headers) == len(scope["headers"]) else {**scope, "headers": headers}


def with_header(scope: dict, name: str, value: str) -> dict:
    """The request with header `name` (lower case) set to `value`, whatever the sender put there."""
    headers = [(key, old) for key, old in scope["headers"] if key.lower() != name.encode()]
    return {**scope, "headers": [*headers, (name.encode(), value.encode())]}
