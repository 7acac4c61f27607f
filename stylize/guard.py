"""What keeps a public server serving everyone: limits on one job, on one client and on the disk.

A public page has one worker (or a few) and strangers for users, some of them hostile. Every limit is read here,
once, from its environment variable into one frozen `LIMITS` (README, "Running it publicly", lists them); code
reads it when it needs a limit. Nothing here imports gradio: `stylize.jobs` lets a job in with `admit` (its size,
images, pixels and time on the server's `JobClock`) or a clip job with `admit_clip`, `stylize.ui` puts `Guard`
in front of the app's routes and runs `sweeping` for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers

from . import video
from .asgi import HeldResponse, body_of, drain, one_range_at_most, refuse, replay, with_header
from .images import ImageError, image_size
from .settings import Settings, SettingsError
from .timing import JobClock, about

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Every limit of a public server, read once from the environment (`from_env`; README, "Running it publicly",
    lists the variables). Code reads `LIMITS` when it needs a limit, so a test may replace it."""

    max_job_seconds: float = 300  # STYLIZE_MAX_JOB_SECONDS: one job's estimated time
    jobs_per_client: int = 2  # STYLIZE_JOBS_PER_CLIENT: waiting or running, at once
    max_job_pixels: int = 120_000_000  # STYLIZE_MAX_JOB_MEGAPIXELS: all of one job's images together
    client_storage: int = 500 * 2**20  # STYLIZE_CLIENT_STORAGE_MB: one client's uploads kept at once
    storage: int = 5000 * 2**20  # STYLIZE_STORAGE_MB: the app's folder, everyone together
    keep_seconds: int = 3 * 3600  # STYLIZE_KEEP_FILES_SECONDS: how long uploads and results are kept
    trusted_proxies: str = ""  # STYLIZE_TRUSTED_PROXIES (see visitor_address); "1" on a Space
    max_size: int | None = None  # STYLIZE_MAX_SIZE: px on the long side; None: by device (see max_size)
    concurrency: int = 1  # STYLIZE_CONCURRENCY: runs at once
    queue_size: int = 32  # STYLIZE_QUEUE_SIZE: jobs waiting, everyone together

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        def number(name: str, default: float) -> float:
            return float(env.get(name, default))

        return cls(
            max_job_seconds=number("STYLIZE_MAX_JOB_SECONDS", 300),
            jobs_per_client=int(env.get("STYLIZE_JOBS_PER_CLIENT", "2")),
            max_job_pixels=int(number("STYLIZE_MAX_JOB_MEGAPIXELS", 120) * 1_000_000),
            client_storage=int(number("STYLIZE_CLIENT_STORAGE_MB", 500) * 2**20),
            storage=int(number("STYLIZE_STORAGE_MB", 5000) * 2**20),
            keep_seconds=max(1, int(number("STYLIZE_KEEP_FILES_SECONDS", 3 * 3600))),
            trusted_proxies=env.get("STYLIZE_TRUSTED_PROXIES", "1" if env.get("SPACE_ID") else ""),
            max_size=int(env["STYLIZE_MAX_SIZE"]) if "STYLIZE_MAX_SIZE" in env else None,
            concurrency=int(env.get("STYLIZE_CONCURRENCY", "1")),
            queue_size=int(env.get("STYLIZE_QUEUE_SIZE", "32")),
        )

    @property
    def sweep_seconds(self) -> int:
        """How often the app's folder is swept (`sweeping`)."""
        return min(600, self.keep_seconds)


LIMITS = Limits.from_env()
MAX_EXTRA_IMAGES = 8  # extra style images in one job, and painted layers in one job
MAX_FILES_PER_UPLOAD = MAX_EXTRA_IMAGES  # the most the page sends at once: a gallery's worth
MAX_REQUEST_BYTES = 2**20  # any other request: a job's inputs are file names, numbers and short text
MIN_FILE_CHARGE = 64 * 2**10  # a stored file costs a folder and inodes too: it counts as at least this
DISK_SECONDS = 60  # how long the app folder's size, once measured, stands (plus the uploads since)


def max_size(gpu: bool) -> int:
    """The largest picture this server makes, in px on the long side: STYLIZE_MAX_SIZE, else 4096 on a GPU and
    2048 on a CPU (bigger pictures are made in tiles, which only a GPU makes in minutes; the job time limit
    still applies). Print sizes up to 8192 px stay open to the command line and to servers that allow them."""
    return LIMITS.max_size or (4096 if gpu else 2048)


def check_size(size: int, gpu: bool) -> None:
    largest = max_size(gpu)
    if size > largest:
        raise SettingsError(
            f"This server makes pictures up to {largest} px; {size} px is more. Choose a "
            f"smaller size, or make print sizes with the command line (stylize --size {size}) or "
            "on a server that allows them (STYLIZE_MAX_SIZE)."
        )


def admit(
    settings: Settings,
    files: Sequence[tuple[str, str]],
    extra_styles: int,
    layers: int,
    *,
    gpu: bool,
    clock: JobClock,
    preset: str,
    result: str | None = None,
) -> tuple[int, int]:
    """Refuse a job this server should not run, before any pixel is decoded; else the photo's (width, height).

    `files` are the job's (path, what) in order, the photo first, then the style artwork, `extra_styles` extra
    style images and `layers` painted layers. Checked in turn: the picture's size (`check_size`), the images'
    count, each file's presence and header, their pixels together, and the job's time on `clock`, with the
    quality preset named `preset` in its message. `result`, a picture the job makes bigger, is checked as the
    other files are, and its time is that of the scales above its size."""
    check_size(settings.size, gpu)
    if extra_styles > MAX_EXTRA_IMAGES:
        raise ImageError(f"Use at most {MAX_EXTRA_IMAGES} more style images; {extra_styles} were given.")
    if layers > MAX_EXTRA_IMAGES:
        raise ImageError(f"The painted region may have at most {MAX_EXTRA_IMAGES} layers; {layers} were given.")
    files = [*files, (result, "result to make bigger")] if result else files
    sizes = [image_size(_uploaded(path, what), what) for path, what in files]
    pixels = sum(width * height for width, height in sizes)
    limit = LIMITS.max_job_pixels
    if pixels > limit:
        raise ImageError(
            f"These images have {pixels / 1e6:.0f} megapixels together; one picture may use at most "
            f"{limit / 1e6:.0f}. Use fewer or smaller images."
        )
    clock.check(sizes[0], settings, preset, LIMITS.max_job_seconds, max(sizes[-1]) if result else 0)
    return sizes[0]


def admit_clip(settings: Settings, clip: str, style: str, *, gpu: bool, clock: JobClock, preset: str) -> video.Clip:
    """Refuse a clip job this server should not run, before any frame or pixel is decoded; else the clip as its
    container declares it. Checked in turn: the frames' size (`check_size`), the clip's container (video.probe:
    its bytes, length, frames, pixels a frame, streams and codec, against the limits there, which the command
    line applies too), the style artwork's header, and the job's time on `clock`, every frame counted."""
    check_size(settings.size, gpu)
    declared = video.probe(_uploaded(clip, "clip"), "clip")
    image_size(_uploaded(style, "style artwork"), "style artwork")
    clock.check(declared.size, settings, preset, LIMITS.max_job_seconds, frames=declared.frames)
    return declared


def _uploaded(path: str, what: str) -> str:
    """An uploaded file's path, once it is known to be still there: a page left open past the cleanup sends a path
    that is gone, and its user is told to upload again rather than that a file with a random name does not exist."""
    if not Path(path).is_file():
        raise ImageError(f"The {what} is no longer on the server (uploads are deleted after a while). Upload it again.")
    return path


# --- who a request comes from --------------------------------------------------------------------------------

# The proxies in front of this server whose X-Forwarded-For entries are trusted, as uvicorn's forwarded-allow-ips:
# a hop count N (the visitor is the address the Nth proxy from here appended: a Space's proxy appends one, and
# gradio's own Node server passes the header on unchanged), or the proxies' addresses and networks, separated by
# commas. By default none, except on a Hugging Face Space (SPACE_ID set): anyone can write the header.
UNIDENTIFIED = "visitors without an address"  # those a local proxy relays, which share one upload allowance


def client_of(peer: str | None, headers: Mapping[str, str], session: str | None) -> str:
    """Who sent a request, as far as can be trusted: the visitor's address (`visitor_address`); where that is a
    proxy on this machine or network that is not trusted (gradio's own Node server relays every visitor from
    127.0.0.1), the browser session, or, for a request without one (an upload), all such visitors together."""
    address = visitor_address(peer, headers.get("x-forwarded-for", ""))
    if address is not None and (address != peer or not _is_private(address)):
        return address
    return f"session {session}" if session else UNIDENTIFIED


def visitor_address(peer: str | None, forwarded: str) -> str | None:
    """The address a request comes from, taking from X-Forwarded-For only what trusted proxies appended: with a
    hop count N, the Nth address from the right, or the peer where there are fewer (the request bypassed the
    proxies); with proxy addresses, the first address that is not one, from the peer leftwards."""
    chain = [peer, *reversed([entry.strip() for entry in forwarded.split(",") if entry.strip()])]
    trusted = LIMITS.trusted_proxies
    if trusted.strip().isdigit():
        hops = int(trusted)
        return chain[hops] if len(chain) > hops else peer
    proxies = [ipaddress.ip_network(entry.strip(), strict=False) for entry in trusted.split(",") if entry.strip()]
    return next((address for address in chain if not _is_one_of(address, proxies)), chain[-1])


# gradio's MCP server makes each tool call as a request of its own to the queue, from this machine, copying the
# caller's headers, in one session shared by every caller. So the guard names the caller of each MCP request in
# a header signed with this process's key, and the queue's join counts the job against that caller; the same
# header from anyone else is ignored.
CALLER_HEADER = "x-stylize-caller"
_CALLER_KEY = secrets.token_bytes(32)


def vouch(client: str) -> str:
    """`client` as CALLER_HEADER carries it: its name, and the name's signature."""
    name = base64.urlsafe_b64encode(client.encode()).decode()
    return f"{name}.{_signature(name)}"


def vouched(value: str) -> str | None:
    """The client a CALLER_HEADER value names, if this process signed it."""
    name, _, signature = value.partition(".")
    if not hmac.compare_digest(signature.encode(), _signature(name).encode()):
        return None
    return base64.urlsafe_b64decode(name).decode()


def _signature(name: str) -> str:
    return hmac.new(_CALLER_KEY, name.encode(), hashlib.sha256).hexdigest()


def _is_one_of(address: str | None, networks: list) -> bool:
    try:
        return any(ipaddress.ip_address(address or "") in network for network in networks)
    except ValueError:  # no address, or junk in a header: not a proxy of ours
        return False


def _is_private(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_private  # loopback included
    except ValueError:
        return False


# --- the routes ----------------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware in front of the app's routes: bounds what one request carries and what one client holds.

    - An upload needs a Content-Length and may carry at most MAX_FILES_PER_UPLOAD files; what one client has
      uploaded within keep_seconds (the time files are kept) may not pass client_storage and the app's folder,
      measured on disk (so a restart forgets nothing), may not pass storage (all in LIMITS).
    - Any other request may carry at most MAX_REQUEST_BYTES.
    - A client may have at most jobs_per_client jobs waiting or running: `clients_in_line(app)` names the client of
      each job in the queue, and joins still on their way in are counted here, so a burst cannot slip past.
    """

    def __init__(self, app: Callable, *, folder: str, clients_in_line: Callable[[Any], list[str]]):
        self.app = app
        self.folder = Path(folder).resolve()
        self.clients_in_line = clients_in_line
        self.joining: Counter[str] = Counter()  # joins on their way into the queue, by client
        self.uploads: deque[tuple[float, str, int]] = deque()  # (time, client, bytes) within keep_seconds
        self.stored: Counter[str] = Counter()  # the bytes of those uploads, by client
        self.disk = (-math.inf, 0)  # (when, bytes): the folder's size on disk when last measured
        self.disk_since = 0  # bytes uploaded since

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            return await self.app(one_range_at_most(scope), receive, send)
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"].endswith("/upload"):
            return await self._upload(scope, receive, send)
        body = await body_of(receive, MAX_REQUEST_BYTES)
        if body is None:
            return await refuse(scope, receive, send, 413, "The request is too large.")
        try:
            data = json.loads(body)
        except RecursionError:  # the routes would read it the same way, and fail so with a 500
            return await refuse(scope, receive, send, 400, "The request's JSON is nested too deeply.")
        except ValueError:  # not JSON: for the route to answer
            data = None
        if scope["path"].endswith("/queue/join") or "/call/" in scope["path"]:
            return await self._join(scope, replay(body, receive), send, _session(data))
        if "/mcp/" in f"{scope['path']}/":  # an MCP tool call: its job will count against this caller
            scope = with_header(scope, CALLER_HEADER, vouch(client_of(_peer(scope), Headers(scope=scope), None)))
        await self.app(scope, replay(body, receive), send)

    async def _join(self, scope: dict, receive: Callable, send: Callable, session: str | None) -> None:
        headers = Headers(scope=scope)
        client = vouched(headers.get(CALLER_HEADER, "")) or client_of(_peer(scope), headers, session)
        waiting = self.clients_in_line(scope["app"]).count(client) + self.joining[client]
        if waiting >= LIMITS.jobs_per_client:
            return await refuse(
                scope,
                receive,
                send,
                429,
                f"You have {waiting} {'picture' if waiting == 1 else 'pictures'} waiting or being made, the most "
                "one visitor may have; wait for one to finish.",
            )
        self.joining[client] += 1  # no await since the count: two joins at once cannot both pass
        try:
            await self.app(scope, receive, send)
        finally:
            self.joining[client] -= 1
            if not self.joining[client]:
                del self.joining[client]

    async def _upload(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = Headers(scope=scope)
        client = client_of(_peer(scope), headers, None)
        length = headers.get("content-length", "")
        if not length.isdigit():
            await drain(receive)
            return await refuse(scope, receive, send, 411, "Send uploads with a Content-Length.")
        if await self._disk_used() + int(length) > LIMITS.storage:
            await drain(receive)
            return await refuse(
                scope, receive, send, 507, "The server's space for uploads is full; try again in a while."
            )
        self._forget_old_uploads()
        stored = self.stored[client]
        if stored + int(length) > LIMITS.client_storage:
            await drain(receive)
            return await refuse(
                scope,
                receive,
                send,
                429,
                f"You have uploaded {stored / 2**20:.1f} MB in the last "
                f"{about(LIMITS.keep_seconds)}, the most one visitor may store; try again later.",
            )
        response = HeldResponse()
        try:
            await self.app(scope, receive, response.send)
        except TypeError:  # gradio's upload route fails so on a form field where a file should be
            if response.messages:
                raise
            return await refuse(scope, receive, send, 400, "Send each file as a file part named 'files'.")
        files = response.files()
        if len(files) > MAX_FILES_PER_UPLOAD:
            self._delete(files)
            return await refuse(scope, receive, send, 413, f"Upload at most {MAX_FILES_PER_UPLOAD} files at once.")
        if files:
            charge = max(int(length), len(files) * MIN_FILE_CHARGE)
            self.uploads.append((time.monotonic(), client, charge))
            self.stored[client] += charge
            self.disk_since += charge
        await response.replay(send)

    async def _disk_used(self) -> int:
        """Bytes in the app's folder: measured on disk at most every DISK_SECONDS, plus the uploads since."""
        if self.disk[0] < time.monotonic() - DISK_SECONDS:
            self.disk = (time.monotonic(), await asyncio.to_thread(_bytes_under, self.folder))
            self.disk_since = 0
        return self.disk[1] + self.disk_since

    def _forget_old_uploads(self) -> None:
        """Uploads older than keep_seconds are deleted from disk by now: they no longer count."""
        while self.uploads and self.uploads[0][0] < time.monotonic() - LIMITS.keep_seconds:
            _, client, size = self.uploads.popleft()
            self.stored[client] -= size
            if not self.stored[client]:
                del self.stored[client]

    def _delete(self, files: list[str]) -> None:
        for name in files:
            path = Path(name).resolve()
            if path.is_relative_to(self.folder) and path.parent != self.folder:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # gradio keeps each upload in a folder of its own


def _bytes_under(folder: Path) -> int:
    total = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # deleted meanwhile
                total += (Path(directory) / name).lstat().st_size
    return total


def _peer(scope: dict) -> str | None:
    return scope["client"][0] if scope.get("client") else None


def _session(data: Any) -> str | None:
    session = data.get("session_hash") if isinstance(data, dict) else None
    return session if isinstance(session, str) else None


# --- the disk ------------------------------------------------------------------------------------------------


def sweep(folder: Path, file_age: float, folder_age: float) -> None:
    """Delete files under `folder` last changed more than `file_age` seconds ago, then the folders left empty:
    those this sweep emptied and those standing empty for `folder_age` (gradio makes a folder for each file)."""
    now = time.time()
    emptied: set[Path] = set()
    for root, _, files in os.walk(folder, topdown=False):
        directory = Path(root)
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                if (directory / name).lstat().st_mtime < now - file_age:
                    (directory / name).unlink()
                    emptied.add(directory)
        with contextlib.suppress(OSError):  # not empty (or gone): left as it is
            if directory != folder and (directory in emptied or directory.lstat().st_mtime < now - folder_age):
                directory.rmdir()
                emptied.add(directory.parent)


def sweeping(folder: str) -> Callable[[Any], contextlib.AbstractAsyncContextManager]:
    """A lifespan for the app: sweeps `folder` at start-up, which cleans up after an earlier process, then every
    LIMITS.sweep_seconds. Gradio's own cleanup (`delete_cache`) deletes the files this process made and forgets them;
    the sweep comes later (keep_seconds + sweep_seconds) for what it never knew, and removes empty folders."""
    root = Path(folder)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(sweep, root, LIMITS.keep_seconds, 0)

        async def every_while() -> None:
            while True:
                limits = LIMITS
                await asyncio.sleep(limits.sweep_seconds)
                await asyncio.to_thread(sweep, root, limits.keep_seconds + limits.sweep_seconds, limits.sweep_seconds)

        task = asyncio.create_task(every_while())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan
