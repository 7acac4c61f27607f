"""Deploying: ZeroGPU's `spaces` package and its rules, a server with several GPUs, the MCP tool, and the
README's instructions (its Python example runs; its preset sizes are the app's)."""

import contextlib
import inspect
import io
import os
import pickle
import re
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from helpers import artwork, live_app, photo, wait_until
from PIL import Image

import stylize.device
import stylize.engine
import stylize.jobs
import stylize.ui
from stylize import Settings, SettingsError
from stylize.jobs import GpuShare
from stylize.settings import PRESET_NAMES, PRESETS, knob

pytestmark = pytest.mark.e2e  # live servers: left out with -m "not e2e"
ROOT = Path(__file__).resolve().parent.parent
SMALL = {"draft": {"size": 64, "steps": 4}, "standard": {"size": 64, "steps": 8}, "fine": {"size": 64, "steps": 5000}}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("pictures")
    photo(128, 96).save(folder / "photo.jpg")
    artwork().save(folder / "painting.jpg")
    return str(folder / "photo.jpg"), str(folder / "painting.jpg")


# --- ZeroGPU ------------------------------------------------------------------------------------


def test_the_real_spaces_package_decorates_the_run():
    """With `spaces` installed (as on every Space), its GPU decorator is the one in use; outside ZeroGPU it
    leaves the run a plain generator, so the app's other tests (build, stream, stop) run through it."""
    spaces = pytest.importorskip("spaces")
    assert stylize.jobs.GPU is spaces.GPU
    assert inspect.isgeneratorfunction(stylize.jobs._run)


BUILD_WITH_FAKE_CUDA = """
import runpy, torch

def refuse(*args, **kwargs):
    raise SystemExit("CUDA was initialised while building the app")

torch.cuda.is_available = lambda: True  # as on ZeroGPU, where `spaces` says so to the main process
torch.cuda.device_count = lambda: 1
torch.cuda._lazy_init = refuse  # what any CUDA tensor, memory query or device context calls first
torch.cuda.init = refuse
runpy.run_path("app.py")  # builds the app as a Space does, without launching it

import stylize.ui
print("built for", stylize.ui.device_kind())
"""


def test_building_the_app_initialises_no_cuda():
    """ZeroGPU's rule: nothing CUDA at start-up (the main process has no GPU; runs borrow one)."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_WITH_FAKE_CUDA],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "built for gpu" in result.stdout  # it took CUDA to be there, without touching it


def test_what_a_run_sends_back_pickles():
    """ZeroGPU runs the GPU function in a process of its own and pickles what it yields."""
    run = stylize.jobs._run(photo(), [artwork()], Settings(size=64, steps=6), None, None, {})
    frames = [pickle.loads(pickle.dumps(frame)) for frame in run]
    assert len(frames) >= 2 and frames[-1].final and not any(frame.final for frame in frames[:-1])
    assert frames[-1].picture.size == (64, 48) and "stylize:settings" in frames[-1].metadata


# --- several GPUs -------------------------------------------------------------------------------


def test_runs_at_once_each_get_their_own_gpu(tmp_path, monkeypatch, pictures):
    """STYLIZE_CONCURRENCY=2 on a machine that says it has two GPUs: the two runs that go at once go to different
    ones, and runs one after the other take them in turn. (The runs themselves go on this machine's CPU.)"""
    with live_app(SMALL, tmp_path, concurrency=2) as app:
        # Only the share is told of two GPUs: faking torch.cuda itself would send the optimizer there too.
        monkeypatch.setattr(stylize.jobs, "gpu_names", lambda: ["cuda:0", "cuda:1"])
        monkeypatch.setattr(stylize.jobs, "GPUS", GpuShare())
        asked, started, gate = [], threading.Condition(), threading.Event()
        real = stylize.engine.transfer

        def on_the_cpu(content, styles, settings, **kwargs):
            with started:
                asked.append(settings.device)
                started.notify_all()
            assert gate.wait(timeout=120)
            return real(content, styles, replace(settings, device="cpu"), **kwargs)

        monkeypatch.setattr(stylize.jobs, "transfer", on_the_cpu)
        clients = [Client(app.local_url, verbose=False) for _ in range(2)]
        inputs = {
            "content": handle_file(pictures[0]),
            "style": handle_file(pictures[1]),
            "preset": "draft",
            "api_name": "/stylize",
        }
        jobs = [client.submit(**inputs) for client in clients]
        with started:
            assert started.wait_for(lambda: len(asked) == 2, timeout=60)  # both at once
        gate.set()
        assert all("Done" in job.result(timeout=120)[1] for job in jobs)
        assert sorted(asked) == ["cuda:0", "cuda:1"]
        for client in clients:  # one after the other
            assert "Done" in client.predict(**inputs)[1]
        assert asked[2:] == ["cuda:0", "cuda:1"]


def test_a_gpu_is_named_by_its_number(monkeypatch):
    assert Settings(device="cuda:1").device == "cuda:1"
    with pytest.raises(SettingsError, match="device must be one of auto, cpu, cuda, mps or cuda:N; got 'gpu1'"):
        Settings(device="gpu1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert stylize.device.gpu_names() == ["cuda:0", "cuda:1"]
    assert stylize.device.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SettingsError, match="'cuda:2' is not available"):
        stylize.device.pick_device("cuda:2")


def test_one_gpu_or_none_leaves_the_choice_to_the_engine(monkeypatch):
    monkeypatch.setattr(stylize.jobs, "gpu_names", lambda: ["cuda:0"])
    share = GpuShare()
    with share.device() as first, share.device() as second:
        assert first == second == "auto"


# --- MCP ----------------------------------------------------------------------------------------


def test_the_mcp_tool_is_stylize_described_with_the_apps_help_texts(tmp_path):
    pytest.importorskip("mcp", reason='needs gradio\'s MCP extra: pip install "gradio[mcp]"')
    with live_app(SMALL, tmp_path, GRADIO_MCP_SERVER="true") as app:
        tools = httpx.get(f"{app.local_url}gradio_api/mcp/schema", timeout=60).json()
    assert [tool["name"] for tool in tools] == ["stylize", "make_bigger", "stylize_clip"]  # nothing else is a tool
    schema, bigger = tools[0]["inputSchema"], tools[1]["inputSchema"]
    assert tools[0]["description"].startswith("Repaint a photo in the style of an artwork.")
    assert tools[1]["description"].startswith("Make a result bigger: that very picture is the start")
    assert schema["required"] == ["content", "style"] and bigger["required"] == ["result", "content", "style"]
    for name in ("style_strength", "content_strength", "style_scale", "seed", "smoothing"):
        assert schema["properties"][name]["description"] == knob(name)["help"], name
        assert bigger["properties"][name]["description"] == knob(name)["help"], name
    assert "preset's size" in schema["properties"]["size"]["description"]
    assert "twice the result's" in bigger["properties"]["size"]["description"]


def test_an_assistant_calls_the_mcp_tool_with_pictures_and_gets_the_picture(tmp_path, pictures):
    """The README's way for an assistant on any machine: the pictures as data: URLs (a URL on 127.0.0.1 is refused
    by gradio's server-side request forgery check, and a bare path is not taken). Every job used to come back as
    "pop index out of range"; a refusal comes back with its own message, the guard's too (it named the server's
    internal queue URL), and a caller's jobs count against that caller (gradio's MCP server joins the queue for
    every caller itself, in one session)."""
    pytest.importorskip("mcp", reason='needs gradio\'s MCP extra: pip install "gradio[mcp]"')
    import asyncio
    import base64

    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    def data_url(path: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()

    async def call(url: str, visitor: str, **arguments: object) -> object:
        headers = {"x-forwarded-for": visitor}  # as a proxy here that tells visitors apart would say
        async with streamablehttp_client(url, headers) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            return await session.call_tool("stylize", arguments)

    pair = {"content": data_url(pictures[0]), "style": data_url(pictures[1])}
    limits = {"STYLIZE_TRUSTED_PROXIES": "127.0.0.1", "STYLIZE_JOBS_PER_CLIENT": "1"}
    with pytest.warns() as warned, live_app(SMALL, tmp_path, GRADIO_MCP_SERVER="true", **limits) as app:
        url = f"{app.local_url}gradio_api/mcp/"
        page = Client(app.local_url, verbose=False, headers={"X-Forwarded-For": "151.101.1.1"})
        running = page.submit(
            content=handle_file(pictures[0]), style=handle_file(pictures[1]), preset="fine", api_name="/stylize"
        )
        wait_until(lambda: "151.101.1.1" in stylize.ui._clients_in_line(app.app), what="the page's job in line")
        over_limit = asyncio.run(call(url, "151.101.1.1", **pair, preset="draft"))
        running.cancel()
        done = asyncio.run(call(url, "151.101.2.2", **pair, preset="draft"))
        refused = asyncio.run(call(url, "151.101.2.2", **pair, seed=-1))
    assert not [w for w in warned if "gr.State" in str(w.message)]  # no State in the tool: nothing to warn of
    assert over_limit.isError and over_limit.content[0].text == (
        "You have 1 picture waiting or being made, the most one visitor may have; wait for one to finish."
    )
    assert not done.isError, done.content
    images = [item for item in done.content if item.type == "image"]
    assert images and Image.open(io.BytesIO(base64.b64decode(images[0].data))).size == (64, 48)
    assert any("Done in" in item.text for item in done.content if item.type == "text")
    assert refused.isError and "seed must be between 0 and" in refused.content[0].text


# --- the README ---------------------------------------------------------------------------------


def test_python_app_py_says_what_it_does_at_start_up_and_times_the_server_in_the_background(tmp_path):
    """It used to show torch's download line, then nothing for the length of an unannounced timing run."""
    env = {
        **os.environ,
        "STYLIZE_WEIGHTS": "untrained",
        "GRADIO_SERVER_PORT": "7871",
        "GRADIO_SSR_MODE": "false",
        "PYTHONUNBUFFERED": "1",
        "GRADIO_TEMP_DIR": str(tmp_path),
    }
    server = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        for line in server.stdout:
            lines.append(line)
            if "Running on local URL" in line:
                break
    finally:
        server.terminate()
        server.wait(timeout=30)
    said = "".join(lines)
    steps = [
        "Loading the VGG19 weights",
        "Degraded mode",
        "Timing this server in the background",
        "Running on local URL",
    ]
    assert all(step in said for step in steps), said
    assert sorted(steps, key=said.index) == steps, said  # in this order: the page is up while the timing runs


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_python_example_works(tmp_path, pictures):
    code = re.search(r"```python\n(.*?)```", readme_section("Use it from Python / over HTTP"), re.DOTALL).group(1)
    with live_app(SMALL, tmp_path) as app:
        code = code.replace("http://127.0.0.1:7860/", app.local_url)
        code = code.replace('"photo.jpg"', repr(pictures[0])).replace('"painting.jpg"', repr(pictures[1]))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, {})
    *statuses, png = printed.getvalue().splitlines()
    assert any("step" in status for status in statuses) and "Done" in statuses[-1]
    with open(png, "rb") as result:
        assert result.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_readmes_preset_sizes_are_the_apps():
    rows = {
        row.split("|")[1].strip().split(" ")[0]: row
        for row in readme_section("Deploy on Hugging Face Spaces").splitlines()
        if row.startswith("| ") and " px |" in row
    }
    for hardware, kind in (("CPU", "cpu"), ("GPU", "gpu"), ("ZeroGPU", "gpu")):
        sizes = " / ".join(str(PRESETS[kind][name]["size"]) for name in PRESET_NAMES)
        assert f"| {sizes} px |" in rows[hardware], hardware
