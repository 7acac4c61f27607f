"""The Video tab's job, /stylize_clip, driven through gradio_client against a server launched in-process as app.py
launches it: frames stream, the MP4 has every frame, Stop keeps a shorter clip, hostile clips get a message."""

import av
import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from helpers import (
    TEST_PRESETS,
    artwork,
    assert_clean,
    encoded,
    hold_clip_runs,
    live_app,
    pan,
    wait_until,
    write_clip,
)

import stylize.engine
import stylize.jobs
import stylize.ui
from stylize.plan import later_frame_scales, plan
from stylize.settings import Settings, SettingsError
from stylize.timing import JobClock, StepSpeed

FRAMES = 4


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with a clock whose speed is given, not timed at start-up: these tests are about clips, not the clock
    (test_ui's), and timing a loaded machine can take minutes."""
    clock = JobClock(StepSpeed(fixed=0.01, per_pixel=1e-6))
    with pytest.MonkeyPatch.context() as patch:
        for module in (stylize.jobs, stylize.ui):
            patch.setattr(module, "job_clock", lambda: clock)
        with live_app(TEST_PRESETS, tmp_path_factory.mktemp("examples")) as demo:
            yield demo


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """A 4-frame pan with sound, 80x64."""
    return str(write_clip(tmp_path_factory.mktemp("clips") / "pan.mp4", pan(FRAMES), audio=True))


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clips") / "art.png"
    artwork().save(path)
    return str(path)


def run_clip(client, clip: str, art: str, **inputs):
    return client.submit(
        clip=handle_file(clip), style=handle_file(art), preset="draft", **inputs, api_name="/stylize_clip"
    )


def frames_and_sound(mp4: str) -> tuple[int, float, bool]:
    """The MP4's decoded frame count, its video's length in seconds and whether it has sound."""
    with av.open(mp4) as container:
        count = sum(1 for _ in container.decode(video=0))
        stream = container.streams.video[0]
        return count, float(stream.duration * stream.time_base), bool(container.streams.audio)


@pytest.mark.e2e
def test_a_clip_streams_its_frames_then_the_mp4_with_every_frame(client, clip, art, monkeypatch):
    monkeypatch.setattr(stylize.engine, "PREVIEW_SECONDS", 0)  # a preview every step, however fast the machine
    job = run_clip(client, clip, art)
    frame, status, video, mp4 = job.result(timeout=300)
    streamed = [outputs[1] for outputs in job.outputs()[:-1]]
    numbers = {line.split(" (")[0] for line in streamed if line.startswith("Frame ")}
    assert numbers == {f"Frame {k} of {FRAMES}" for k in range(1, FRAMES + 1)}, streamed  # every frame, in turn
    assert all("step" in line and "elapsed" in line for line in streamed if line.startswith("Frame "))
    assert status.startswith("Done in") and f"{FRAMES} frames" in status
    assert video.endswith(".mp4") and mp4.endswith(".mp4")  # the video the page plays, the file it downloads
    count, seconds, sound = frames_and_sound(mp4)
    assert count == FRAMES and seconds == pytest.approx(FRAMES / 12, abs=0.01) and sound


@pytest.mark.e2e
def test_stop_keeps_the_frames_made_so_far_as_a_shorter_clip(app, client, clip, art, monkeypatch):
    made_two, released = hold_clip_runs(monkeypatch, after=2)
    job = run_clip(client, clip, art)
    assert made_two.wait(120)
    wait_until(lambda: any(o[1].startswith("Frame 2") for o in job.outputs()), what="frame 2 streamed")
    press_clip_stop(app, client.session_hash)
    released.set()
    _, status, _, mp4 = job.result(timeout=120)
    assert status.startswith(f"Stopped at frame 3 of {FRAMES}") and "2 frames made so far" in status, status
    count, seconds, sound = frames_and_sound(mp4)
    assert count == 2 and seconds == pytest.approx(2 / 12, abs=0.01) and sound  # the sound cut to its length


def press_clip_stop(app, session: str) -> None:
    """The Video tab's Stop, as the page presses it for the session `session`."""
    config = httpx.get(f"{app.local_url}config", timeout=30).json()
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "clip-stop")
    stop = next(d["id"] for d in config["dependencies"] if [button, "click"] in d["targets"])
    response = httpx.post(
        f"{app.local_url}gradio_api/run/predict",
        json={"data": [], "fn_index": stop, "session_hash": session, "event_data": None, "trigger_id": button},
        timeout=30,
    )
    response.raise_for_status()


def _picture(path):
    path.write_bytes(encoded(artwork(64, 64), "PNG"))


def _truncated(path, good):
    data = open(good, "rb").read()
    path.write_bytes(data[: len(data) // 3])


HOSTILE = {
    "a picture named .mp4": (lambda path, good: _picture(path), "is a picture, not a video"),
    "text named .mp4": (lambda path, good: path.write_text("hello " * 100), "not a video this app can read"),
    "a truncated clip": (_truncated, "truncated or corrupt"),
    "many streams": (lambda path, good: write_clip(path, pan(3), streams=6), "has 6 streams; the limit is 4"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_clip_gets_a_message_and_the_server_still_serves(client, clip, art, tmp_path, kind):
    make, message = HOSTILE[kind]
    path = tmp_path / "clip.mp4"
    make(path, clip)
    with pytest.raises(AppError) as error:
        run_clip(client, str(path), art).result(timeout=120)
    assert message in str(error.value)
    assert_clean(str(error.value))
    _, status, _, mp4 = run_clip(client, clip, art).result(timeout=300)  # the next clip is made
    assert status.startswith("Done") and frames_and_sound(mp4)[0] == FRAMES


@pytest.mark.e2e
def test_the_clip_api_describes_its_parameters(client):
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/stylize_clip"]
    parameters = {p["parameter_name"]: p for p in endpoint["parameters"]}
    assert list(parameters)[:4] == ["clip", "style", "preset", "size"]
    assert parameters["size"]["parameter_default"] is None
    assert "previous one" in parameters["temporal_weight"]["python_type"]["description"]


def test_a_clips_estimate_counts_every_frame_and_a_long_one_is_refused():
    settings = Settings(size=64, steps=20)
    speed = StepSpeed(fixed=0.01, per_pixel=1e-6)
    clock = JobClock(speed)
    first = sum(speed.seconds(s.steps, s.work) for s in plan((80, 64), settings))
    later = sum(speed.seconds(s.steps, s.work) for s in later_frame_scales(plan((80, 64), settings), settings))
    assert clock.estimate((80, 64), settings, frames=10) == pytest.approx(first + 9 * later)
    clock.least_work = 0  # every job counts, however small
    clock.check((80, 64), settings, "Fast draft", first + 9 * later + 0.01, frames=10)  # fits
    with pytest.raises(SettingsError, match="A 10-frame clip at 64 px .* shorter clip"):
        clock.check((80, 64), settings, "Fast draft", first + 8 * later, frames=10)
