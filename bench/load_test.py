"""Load test: several concurrent clients against a live app on loopback; prints jobs, errors and memory.

Starts the app (stylize.ui.build_demo, as app.py does) in a child process bound to 127.0.0.1, with
every quality preset shrunk to --size px and --steps steps so that a job takes seconds, then runs
--clients gradio_client clients at once, each sending --jobs jobs back to back through /stylize.
Each client sends its own photo (its own colour); before the load, each photo's result is made
once, alone, as a reference, and a result nearer another client's reference than its own counts
as a wrong image. Everything is bounded: the job count, and --timeout seconds
for the whole run. Prints jobs completed, errors by message, and the server process's resident
memory (VmRSS from /proc) after the reference jobs and after all the jobs, plus its peak (VmHWM).

    python bench/load_test.py                       # 4 clients x 5 jobs
    python bench/load_test.py --clients 8 --jobs 3 --concurrency 2 --queue-size 4
"""

from __future__ import annotations

import argparse
import colorsys
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--jobs", type=int, default=5, help="jobs per client, back to back (default 5)")
    p.add_argument("--size", type=int, default=64, help="output long side in px (default 64)")
    p.add_argument("--steps", type=int, default=8, help="optimization steps per job (default 8)")
    p.add_argument("--concurrency", type=int, default=1, help="STYLIZE_CONCURRENCY for the server (default 1)")
    p.add_argument("--queue-size", type=int, default=32, help="STYLIZE_QUEUE_SIZE for the server (default 32)")
    p.add_argument("--timeout", type=float, default=300, help="seconds for the whole run (default 300)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child: run the server
    return p


def rss_bytes(pid: int | str = "self", field_name: str = "VmRSS") -> int:
    """Resident memory of a process (or its peak, with field_name="VmHWM"), from /proc/PID/status."""
    return proc_status(pid, field_name) * 1024


def proc_status(pid: int | str, field_name: str) -> int:
    """One number from /proc/PID/status (memory in kB, Threads as a count)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no {field_name}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def colour_of(index: int, count: int) -> tuple[int, int, int]:
    """Evenly spaced, saturated hues: one per client, as far apart as the count allows."""
    r, g, b = colorsys.hsv_to_rgb(index / count, 0.85, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def make_photo(path: Path, colour: tuple[int, int, int]) -> None:
    """A 96x72 'photo' of one dominant colour, with a lighter disc so it has structure."""
    y, x = np.mgrid[0:72, 0:96]
    pixels = np.empty((72, 96, 3), np.float64)
    pixels[:] = colour
    pixels[(x - 55) ** 2 + (y - 32) ** 2 < 18**2] *= 1.1
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def make_artwork(path: Path) -> None:
    """Grey diagonal stripes: a style with texture but no hue to pull every result toward one colour."""
    y, x = np.mgrid[0:96, 0:96]
    Image.fromarray(np.where(((x + y) // 6) % 2 == 0, 200, 60).astype(np.uint8)).convert("RGB").save(path)


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float64)


# --- the server, in a child process ---------------------------------------------------------------


def serve(size: int, steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from stylize.settings import PRESETS

    for presets in PRESETS.values():
        for name in presets:
            presets[name] = {"size": size, "steps": steps}
    from stylize.ui import build_demo, launch_options

    demo = build_demo()
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_options())
    print(f"URL {demo.local_url}", flush=True)
    demo.block_thread()


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        "GRADIO_TEMP_DIR": str(folder / "cache"),
        "GRADIO_SSR_MODE": "false",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "STYLIZE_CONCURRENCY": str(args.concurrency),
        "STYLIZE_QUEUE_SIZE": str(args.queue_size),
        "GRADIO_EXAMPLES_CACHE": str(folder / "examples"),
    }
    env.setdefault("STYLIZE_WEIGHTS", "untrained")  # no download during a load test
    log = folder / "server.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--size", str(args.size), "--steps", str(args.steps)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    deadline = time.monotonic() + min(120, args.timeout)
    while time.monotonic() < deadline and child.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("URL "):
                return child, line.split()[1]
        time.sleep(0.2)  # polling a log file for the server's start-up line
    child.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")


# --- the clients ---------------------------------------------------------------------------------


@dataclass
class Tally:
    completed: int = 0
    wrong_image: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)  # the server's VmRSS after each completed job
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(
    url: str,
    server_pid: int,
    index: int,
    photos: list[Path],
    art: Path,
    references: list[np.ndarray],
    jobs: int,
    deadline: float,
    tally: Tally,
    start: threading.Barrier,
) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    start.wait(timeout=max(1.0, deadline - time.monotonic()))
    for _ in range(jobs):
        left = deadline - time.monotonic()
        if left <= 0:
            with tally.lock:
                tally.errors["not started: out of time"] += 1
            continue
        began = time.monotonic()
        job = client.submit(
            content=handle_file(str(photos[index])), style=handle_file(str(art)), preset="draft", api_name="/stylize"
        )
        try:
            picture, status, *_ = job.result(timeout=left)
        except Exception as error:  # every failure is counted by its message, none stops the run
            job.cancel()
            message = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
            with tally.lock:
                tally.errors[message] += 1
            continue
        result = pixels(picture)
        nearest = int(np.argmin([np.abs(result - reference).mean() for reference in references]))
        with tally.lock:
            tally.completed += 1
            tally.latencies.append(time.monotonic() - began)
            tally.wrong_image += nearest != index
            tally.memory.append(rss_bytes(server_pid))


def run(args: argparse.Namespace) -> dict:
    from gradio_client import Client, handle_file

    started = time.monotonic()
    deadline = started + args.timeout
    with tempfile.TemporaryDirectory(prefix="stylize-load-") as tmp:
        folder = Path(tmp)
        photos = [folder / f"photo{i}.png" for i in range(args.clients)]
        for i, path in enumerate(photos):
            make_photo(path, colour_of(i, args.clients))
        art = folder / "art.png"
        make_artwork(art)

        server, url = start_server(args, folder)
        try:
            references = []  # each photo's result made alone; the first run also warms the server up
            for photo in photos:
                picture, status, *_ = Client(url, verbose=False).predict(
                    content=handle_file(str(photo)), style=handle_file(str(art)), preset="draft", api_name="/stylize"
                )
                assert "Done" in status, status
                references.append(pixels(picture))
            before, disk_before = rss_bytes(server.pid), folder_bytes(folder / "cache")
            threads_before = proc_status(server.pid, "Threads")

            tally = Tally()
            start = threading.Barrier(args.clients)
            threads = [
                threading.Thread(
                    target=client_loop,
                    daemon=True,
                    args=(url, server.pid, i, photos, art, references, args.jobs, deadline, tally, start),
                )
                for i in range(args.clients)
            ]
            load_started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
            wall = time.monotonic() - load_started
            hung = sum(thread.is_alive() for thread in threads)

            after, peak = rss_bytes(server.pid), rss_bytes(server.pid, "VmHWM")
            threads_after = proc_status(server.pid, "Threads")
            disk_after = folder_bytes(folder / "cache")
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    latencies = sorted(tally.latencies) or [float("nan")]
    result = {
        "clients": args.clients,
        "jobs": args.clients * args.jobs,
        "completed": tally.completed,
        "errors": sum(tally.errors.values()),
        "error_messages": dict(tally.errors),
        "wrong_image": tally.wrong_image,
        "hung_clients": hung,
        "server_alive": alive,
        "wall_s": wall,
        "latency_median_s": latencies[len(latencies) // 2],
        "latency_max_s": latencies[-1],
        "rss_before": before,
        "rss_after": after,
        "rss_peak": peak,
        "cache_before": disk_before,
        "cache_after": disk_after,
        "rss_by_job": tally.memory,
        "threads_before": threads_before,
        "threads_after": threads_after,
    }
    print(
        f"load test: {args.clients} clients x {args.jobs} jobs, {args.size} px, {args.steps} steps, "
        f"concurrency {args.concurrency}, queue size {args.queue_size}, loopback {url}"
    )
    print(
        f"jobs completed: {tally.completed}/{result['jobs']}  errors: {result['errors']}  "
        f"wrong image: {tally.wrong_image}  hung clients: {hung}  server alive: {alive}"
    )
    for message, count in tally.errors.most_common():
        print(f"  {count} x {message}")
    print(
        f"time: {wall:.1f} s for the load, job latency median {result['latency_median_s']:.1f} s, "
        f"max {result['latency_max_s']:.1f} s"
    )
    print(
        f"server memory (VmRSS): before {before / MB:.0f} MB (after the reference jobs), after {after / MB:.0f} MB "
        f"({(after - before) / MB:+.1f} MB); peak (VmHWM) {peak / MB:.0f} MB; "
        f"threads {threads_before} -> {threads_after}"
    )
    if len(tally.memory) >= 4:  # growth that levels off is allocator pools filling; a leak keeps climbing
        quarters = [tally.memory[round(len(tally.memory) * q) - 1] for q in (0.25, 0.5, 0.75, 1.0)]
        print(
            "server memory after 1/4, 1/2, 3/4, all of the jobs: "
            + ", ".join(f"{m / MB:.0f}" for m in quarters)
            + " MB"
        )
    print(f"server file cache: before {disk_before / MB:.1f} MB, after {disk_after / MB:.1f} MB")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.serve:
        serve(args.size, args.steps)
        return 0
    if min(args.clients, args.jobs, args.steps) < 1 or args.timeout <= 0:
        parser().error("--clients, --jobs and --steps must be at least 1, --timeout above 0")
    result = run(args)
    ok = result["completed"] == result["jobs"] and not result["wrong_image"] and result["server_alive"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
