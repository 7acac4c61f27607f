"""What keeps a public server serving everyone: limits on one job, on one client and on the disk.

A public page has one worker (or a few) and strangers for users, some of them hostile. Every limit is set
here, once, from its environment variable; README ("Running it publicly") lists them. Nothing here imports
gradio: `stylize.ui` times the server with `JobClock`, puts `Guard` in front of the app's routes and runs
`sweeping` for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .plan import job_work, plan
from .settings import Settings, SettingsError
from .timing import StepSpeed, StepTimer

LOG = logging.getLogger(__name__)
MAX_JOB_SECONDS = float(os.environ.get("STYLIZE_MAX_JOB_SECONDS", "300"))
JOBS_PER_CLIENT = int(os.environ.get("STYLIZE_JOBS_PER_CLIENT", "2"))  # waiting or running, at once
MAX_JOB_PIXELS = int(float(os.environ.get("STYLIZE_MAX_JOB_MEGAPIXELS", "120")) * 1_000_000)  # all its images
CLIENT_STORAGE = int(float(os.environ.get("STYLIZE_CLIENT_STORAGE_MB", "500")) * 2**20)  # uploads kept at once
STORAGE = int(float(os.environ.get("STYLIZE_STORAGE_MB", "5000")) * 2**20)  # the app's folder, everyone together
KEEP_SECONDS = max(1, int(float(os.environ.get("STYLIZE_KEEP_FILES_SECONDS", 3 * 3600))))
MAX_EXTRA_IMAGES = 8  # extra style images in one job, and painted layers in one job
MAX_FILES_PER_UPLOAD = MAX_EXTRA_IMAGES  # the most the page sends at once: a gallery's worth
MAX_REQUEST_BYTES = 2**20  # any other request: a job's inputs are file names, numbers and short text
MIN_FILE_CHARGE = 64 * 2**10  # a stored file costs a folder and inodes too: it counts as at least this
DISK_SECONDS = 60  # how long the app folder's size, once measured, stands (plus the uploads since)
SWEEP_SECONDS = min(600, KEEP_SECONDS)
# The transfer the server times: a draft's size, so that its time is mostly the per-pixel work that the work model
# counts (a smaller one is mostly per-step costs it leaves out); a few seconds on a 2-core CPU.
SAMPLE = {"size": 256, "steps": 24}
SAMPLE_PHOTO = (256, 192)  # a photo's usual shape
GPU_SPEED = StepSpeed(fixed=0.0, per_pixel=2e-7)  # a GPU's until its first job measures it: a T4's, fp16 at 512 px


# --- the cost of one job -------------------------------------------------------------------------------------

class JobClock:
    """This server's speed (`timing.StepSpeed`): what a job will cost before it starts.

    Measured in the background at start-up (`time_in_background`; jobs that come meanwhile wait for it), then
    taken again from every job as it runs, once it has done as much work as the sample: the speed of a busy
    machine changes. Jobs no bigger than the sample are never refused: a server always makes its lightest job.
    """

    def __init__(self, speed: StepSpeed | None = None):
        self.speed = speed
        self.timed = threading.Event()  # set once there is a speed to go by, or measuring it failed
        if speed is not None:
            self.timed.set()
        self.least_work = job_work(SAMPLE_PHOTO, Settings(**SAMPLE))

    def time_in_background(self, measure: Callable[[], StepSpeed]) -> None:
        LOG.info("Timing this server in the background: a %d px transfer of %d steps (seconds; a job that comes "
                 "meanwhile waits for it).", SAMPLE["size"], SAMPLE["steps"])
        threading.Thread(target=self._time, args=(measure,), name="job clock", daemon=True).start()

    def _time(self, measure: Callable[[], StepSpeed]) -> None:
        try:
            started = time.perf_counter()
            self.speed = measure()
            LOG.info("Timed this server in %.1f s: a step costs %.3f s plus %.3f s per 100,000 pixels.",
                     time.perf_counter() - started, self.speed.fixed, self.speed.per_pixel * 1e5)
        except Exception:  # the first job measures it instead; the log says why
            LOG.exception("Timing this server failed; jobs are admitted until one has measured it.")
        finally:
            self.timed.set()

    def record(self, timer: StepTimer, work_done: float) -> None:
        """A running job's speed, from its `timer`, once it has done `work_done` >= the sample's work."""
        speed = timer.speed()
        if speed is not None and work_done >= self.least_work:
            self.speed = speed

    def estimate(self, content_size: tuple[int, int], settings: Settings) -> float | None:
        """A job's seconds (its steps; reading images and loading weights left out); None before a speed is known."""
        if self.speed is None:
            return None
        return sum(self.speed.seconds(scale.steps, scale.steps * scale.step_cost)
                   for scale in plan(content_size, settings))

    def check(self, content_size: tuple[int, int], settings: Settings, preset: str) -> None:
        """Refuse a job that would hold the worker longer than MAX_JOB_SECONDS, naming the largest size that fits."""
        estimate = self._over_limit(content_size, settings)
        if estimate is None:
            return
        sizes = range((settings.size - 1) // 32 * 32, 63, -32)  # the size slider's steps, below this one
        fits = next((size for size in sizes if self._fits(content_size, replace(settings, size=size))), None)
        advice = f"Choose {fits} px or less." if fits else "Choose a lighter preset."
        raise SettingsError(f"A {settings.size} px picture with the {preset} preset would take about "
                            f"{_about(estimate)} on this server; the limit is {_about(MAX_JOB_SECONDS)}. {advice}")

    def _over_limit(self, content_size: tuple[int, int], settings: Settings) -> float | None:
        """A job's estimated seconds where they pass MAX_JOB_SECONDS; None where it may run."""
        if MAX_JOB_SECONDS == math.inf:  # no limit: nothing to wait for
            return None
        self.timed.wait()
        estimate = self.estimate(content_size, settings)
        if estimate is None or job_work(content_size, settings) <= self.least_work:
            return None
        return estimate if estimate > MAX_JOB_SECONDS else None

    def _fits(self, content_size: tuple[int, int], settings: Settings) -> bool:
        try:
            return self._over_limit(content_size, settings) is None
        except SettingsError:  # too small for this photo's shape
            return False


def max_size(gpu: bool) -> int:
    """The largest picture this server makes, in px on the long side: STYLIZE_MAX_SIZE, else 4096 on a GPU and
    2048 on a CPU (bigger pictures are made in tiles, which only a GPU makes in minutes; the job time limit
    still applies). Print sizes up to 8192 px stay open to the command line and to servers that allow them."""
    return int(os.environ.get("STYLIZE_MAX_SIZE", 4096 if gpu else 2048))


def check_size(size: int, gpu: bool) -> None:
    largest = max_size(gpu)
    if size > largest:
        raise SettingsError(f"This server makes pictures up to {largest} px; {size} px is more. Choose a "
                            f"smaller size, or make print sizes with the command line (stylize --size {size}) or "
                            "on a server that allows them (STYLIZE_MAX_SIZE).")


def _about(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# --- who a request comes from --------------------------------------------------------------------------------

# The proxies in front of this server whose X-Forwarded-For entries are trusted, as uvicorn's forwarded-allow-ips:
# a hop count N (the visitor is the address the Nth proxy from here appended: a Space's proxy appends one, and
# gradio's own Node server passes the header on unchanged), or the proxies' addresses and networks, separated by
# commas. By default none, except on a Hugging Face Space (SPACE_ID set): anyone can write the header.
TRUSTED_PROXIES = os.environ.get("STYLIZE_TRUSTED_PROXIES", "1" if os.environ.get("SPACE_ID") else "")
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
    if TRUSTED_PROXIES.strip().isdigit():
        hops = int(TRUSTED_PROXIES)
        return chain[hops] if len(chain) > hops else peer
    proxies = [ipaddress.ip_network(entry.strip(), strict=False) for entry in TRUSTED_PROXIES.split(",")
               if entry.strip()]
    return next((address for address in chain if not _is_one_of(address, proxies)), chain[-1])


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
      uploaded within KEEP_SECONDS (the time files are kept) may not pass CLIENT_STORAGE, and the app's folder,
      measured on disk (so a restart forgets nothing), may not pass STORAGE.
    - Any other request may carry at most MAX_REQUEST_BYTES.
    - A client may have at most JOBS_PER_CLIENT jobs waiting or running: `clients_in_line(app)` names the client of
      each job in the queue, and joins still on their way in are counted here, so a burst cannot slip past.
    """

    def __init__(self, app: Callable, *, folder: str, clients_in_line: Callable[[Any], list[str]]):
        self.app = app
        self.folder = Path(folder).resolve()
        self.clients_in_line = clients_in_line
        self.joining: Counter[str] = Counter()  # joins on their way into the queue, by client
        self.uploads: deque[tuple[float, str, int]] = deque()  # (time, client, bytes) within KEEP_SECONDS
        self.stored: Counter[str] = Counter()  # the bytes of those uploads, by client
        self.disk = (-math.inf, 0)  # (when, bytes): the folder's size on disk when last measured
        self.disk_since = 0  # bytes uploaded since

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            return await self.app(_one_range_at_most(scope), receive, send)
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"].endswith("/upload"):
            return await self._upload(scope, receive, send)
        body = await _body(receive, MAX_REQUEST_BYTES)
        if body is None:
            return await _refuse(scope, receive, send, 413, "The request is too large.")
        try:
            data = json.loads(body)
        except RecursionError:  # the routes would read it the same way, and fail so with a 500
            return await _refuse(scope, receive, send, 400, "The request's JSON is nested too deeply.")
        except ValueError:  # not JSON: for the route to answer
            data = None
        if scope["path"].endswith("/queue/join") or "/call/" in scope["path"]:
            return await self._join(scope, _replay(body, receive), send, _session(data))
        await self.app(scope, _replay(body, receive), send)

    async def _join(self, scope: dict, receive: Callable, send: Callable, session: str | None) -> None:
        client = client_of(_peer(scope), Headers(scope=scope), session)
        waiting = self.clients_in_line(scope["app"]).count(client) + self.joining[client]
        if waiting >= JOBS_PER_CLIENT:
            return await _refuse(scope, receive, send, 429, f"You have {waiting} pictures waiting or being "
                                 f"made, the most one visitor may have; wait for one to finish.")
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
            await _drain(receive)
            return await _refuse(scope, receive, send, 411, "Send uploads with a Content-Length.")
        if await self._disk_used() + int(length) > STORAGE:
            await _drain(receive)
            return await _refuse(scope, receive, send, 507, "The server's space for uploads is full; try again in "
                                 "a while.")
        self._forget_old_uploads()
        stored = self.stored[client]
        if stored + int(length) > CLIENT_STORAGE:
            await _drain(receive)
            return await _refuse(scope, receive, send, 429, f"You have uploaded {stored / 2**20:.1f} MB in the last "
                                 f"{_about(KEEP_SECONDS)}, the most one visitor may store; try again later.")
        response = _HeldResponse()
        try:
            await self.app(scope, receive, response.send)
        except TypeError:  # gradio's upload route fails so on a form field where a file should be
            if response.messages:
                raise
            return await _refuse(scope, receive, send, 400, "Send each file as a file part named 'files'.")
        files = response.files()
        if len(files) > MAX_FILES_PER_UPLOAD:
            self._delete(files)
            return await _refuse(scope, receive, send, 413, f"Upload at most {MAX_FILES_PER_UPLOAD} files at once.")
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
        """Uploads older than KEEP_SECONDS are deleted from disk by now: they no longer count."""
        while self.uploads and self.uploads[0][0] < time.monotonic() - KEEP_SECONDS:
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


_ONE_RANGE = re.compile(rb"bytes=\d*-\d*")


def _one_range_at_most(scope: dict) -> dict:
    """The request without a Range header that asks for anything but one range of bytes: gradio's file route
    reads one range only and fails (500) on several. A server may ignore Range: those get the whole file."""
    headers = [(key, value) for key, value in scope["headers"]
               if key.lower() != b"range" or _ONE_RANGE.fullmatch(value.strip())]
    return scope if len(headers) == len(scope["headers"]) else {**scope, "headers": headers}


async def _body(receive: Callable, limit: int) -> bytes | None:
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
            await _drain(receive)
            break
    return b"".join(chunks) if size <= limit else None


async def _drain(receive: Callable, limit: int = 64 * 2**20) -> None:
    """Read and drop what is left of a refused request's body, up to `limit` bytes: a proxy in front (gradio's
    own Node server) answers 502 instead of the refusal when the server answers before it has sent the body."""
    read, more = 0, True
    while more and read <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        read += len(message.get("body", b""))
        more = message.get("more_body", False)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that hands the app a body already read, then the connection's own messages (a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed


async def _refuse(scope: dict, receive: Callable, send: Callable, status: int, message: str) -> None:
    """The page shows `detail` of a refused request; the status says the same to a script."""
    await JSONResponse({"detail": message, "error": message}, status_code=status)(scope, receive, send)


class _HeldResponse:
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
    SWEEP_SECONDS. Gradio's own cleanup (`delete_cache`) deletes the files this process made and forgets them;
    the sweep comes later (KEEP_SECONDS + SWEEP_SECONDS) for what it never knew, and removes empty folders."""
    root = Path(folder)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(sweep, root, KEEP_SECONDS, 0)

        async def every_while() -> None:
            while True:
                await asyncio.sleep(SWEEP_SECONDS)
                await asyncio.to_thread(sweep, root, KEEP_SECONDS + SWEEP_SECONDS, SWEEP_SECONDS)

        task = asyncio.create_task(every_while())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return lifespan
