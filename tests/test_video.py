"""Clips: container checks on hostile files, frames, optical flow and its mask, the clip engine, the MP4 writer."""

from dataclasses import replace
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from helpers import artwork, pan, texture, write_clip
from PIL import Image

import stylize.engine
from stylize import Settings, transfer
from stylize.engine import transfer_clip
from stylize.flow import flicker, temporal_guide, warp
from stylize.images import to_tensor
from stylize.video import ClipError, ClipWriter, looks_like_clip, probe, read_frames

TINY = {"size": 64, "steps": 12}


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "pan.mp4", pan(5), audio=True)


def test_probe_reads_the_header(clip_path, tmp_path):
    clip = probe(clip_path)
    assert (clip.size, clip.frames, clip.rate, clip.codec, clip.audio) == ((80, 64), 5, Fraction(12), "h264", True)
    assert not probe(write_clip(tmp_path / "silent.mp4", pan(3))).audio
    assert looks_like_clip(clip_path)


def _huge_avi(path):
    """An AVI whose header declares 16000x16000 frames (its data is a few bytes)."""
    with av.open(str(path), "w", format="avi") as container:
        track = container.add_stream("rawvideo", rate=12)
        track.width, track.height, track.pix_fmt = 64, 64, "yuv420p"
        for k in range(3):
            packet = av.Packet(b"\x80" * 100)
            packet.stream, packet.pts, packet.dts, packet.time_base = track, k, k, Fraction(1, 12)
            container.mux(packet)
    data = bytearray(path.read_bytes())
    header = data.find(b"strf") + 8  # BITMAPINFOHEADER: size, then width and height
    data[header + 4 : header + 12] = (16000).to_bytes(4, "little") * 2
    path.write_bytes(data)


def _hostile(kind, path):
    if kind == "picture":
        Image.fromarray(texture(64, 64)).save(path, format="PNG")
    elif kind == "truncated":
        whole = write_clip(path.with_suffix(".whole.mp4"), pan(4)).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "streams":
        write_clip(path, pan(3), streams=6)
    elif kind == "huge":
        _huge_avi(path)
    elif kind == "single frame":
        write_clip(path, pan(1))
    elif kind == "endless":
        write_clip(path, pan(3), format="matroska", options={"live": "1"})  # no duration declared
    elif kind == "not a video":
        path.write_bytes(b"hello, world\n" * 100)
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "kind, message",
    [
        ("picture", "is a picture, not a video"),
        ("truncated", "truncated or corrupt"),
        ("streams", "has 6 streams; the limit is 4"),
        ("huge", "16000x16000 pixels; the limit is"),
        ("single frame", "single picture"),
        ("endless", "does not say how long it is"),
        ("not a video", "not a video this app can read"),
        ("empty", "is empty"),
    ],
)
def test_hostile_clips_are_refused_from_the_header(tmp_path, kind, message):
    path = tmp_path / "clip.mp4"  # every one named like a video
    _hostile(kind, path)
    with pytest.raises(ClipError, match=message):
        probe(path)


def test_limits_on_length_and_frames(clip_path, monkeypatch):
    import stylize.video

    monkeypatch.setattr(stylize.video, "MAX_CLIP_FRAMES", 4)
    with pytest.raises(ClipError, match="has 5 frames; the limit is 4"):
        probe(clip_path)
    monkeypatch.setattr(stylize.video, "MAX_CLIP_SECONDS", 0.25)
    with pytest.raises(ClipError, match="0.4 s long; the limit is 0.25 s"):
        probe(clip_path)


def test_cli_names_the_setting_that_raises_a_clip_limit(clip_path, tmp_path, monkeypatch, capsys):
    import stylize.video
    from stylize.cli import main

    monkeypatch.setattr(stylize.video, "MAX_CLIP_FRAMES", 4)
    artwork().save(tmp_path / "art.png")
    assert main([str(clip_path), str(tmp_path / "art.png"), "-o", str(tmp_path / "never.mp4")]) == 2
    error = capsys.readouterr().err
    assert "has 5 frames; the limit is 4" in error and "raise the limit: STYLIZE_MAX_CLIP_FRAMES=" in error, error
    assert not (tmp_path / "never.mp4").exists()


def test_frames_are_decoded_up_to_the_declared_count_only(clip_path):
    clip = probe(clip_path)
    assert [f.size for f in read_frames(clip)] == [(80, 64)] * 5
    assert len(list(read_frames(replace(clip, frames=2)))) == 2  # a container that declares fewer gives no more


def test_flow_and_mask_follow_a_pan_and_leave_out_the_new_border():
    shift = 3
    previous, current = (to_tensor(f) for f in pan(2, (96, 64), shift))
    flow, reliable = temporal_guide(previous, current)
    inside = reliable[0, 0, 4:-4, 4 : -shift - 4].bool()
    assert inside.float().mean() > 0.9  # the scene seen in both frames
    assert (reliable[0, 0, :, -shift:] == 0).all()  # the strip the pan brought in was not in the previous frame
    assert torch.allclose(flow[0, 4:-4, 4 : -shift - 4][inside], torch.tensor([float(shift), 0.0]), atol=0.5)
    moved = warp(previous, flow)
    assert ((moved - current).abs().mean(1) * reliable[0]).sum() / reliable.sum() < 0.02


def test_clip_stream_says_frame_k_of_n_and_ends_each_frame():
    frames = pan(3)
    records = list(transfer_clip(frames, artwork(), Settings(**TINY)))
    finals = [r for r in records if r.final]
    assert [r.frame for r in finals] == [1, 2, 3] and all(r.frames == 3 for r in records)
    assert finals[-1].done == pytest.approx(1.0) and finals[-1].image().size == (64, 51)
    assert finals[1].total < finals[0].total  # later frames take fewer steps
    assert "temporal" in finals[1].losses and "temporal" not in finals[0].losses
    stream = transfer_clip(frames, artwork(), Settings(**TINY))
    next(stream)
    stream.close()  # stops at once
    assert next(stream, None) is None


def test_clips_are_made_with_adam_whatever_the_optimizer_setting(monkeypatch):
    class Refused(stylize.engine._Lbfgs):
        def __init__(self, *args):
            raise AssertionError("a clip made an L-BFGS step")

    monkeypatch.setattr(stylize.engine, "_Lbfgs", Refused)
    finals = [r for r in transfer_clip(pan(2), artwork(), Settings(**TINY, optimizer="lbfgs")) if r.final]
    assert len(finals) == 2


def test_warm_start_and_temporal_loss_flicker_less_than_frames_made_alone():
    frames = pan(4, (80, 64), 3)
    settings = Settings(**TINY)
    consistent = [r.pixels for r in transfer_clip(frames, artwork(), settings) if r.final]
    # Each frame made as a picture on its own, with the first frame's whole budget: more steps than the clip's
    # later frames get, none of the warm start or the temporal loss.
    alone = [list(transfer(frame, artwork(), settings))[-1].pixels for frame in frames]
    inputs = [to_tensor(f.resize(consistent[0].shape[-1:-3:-1])) for f in frames]

    def mean_flicker(outputs):
        pairs = zip(inputs, inputs[1:], outputs, outputs[1:], strict=False)
        return np.mean([flicker(a, b, *temporal_guide(p, q)) for p, q, a, b in pairs])

    assert mean_flicker(consistent) < 0.5 * mean_flicker(alone)


def test_writer_makes_an_h264_mp4_with_even_sides_and_the_sound(clip_path, tmp_path):
    clip = probe(clip_path)
    with ClipWriter(tmp_path / "out.mp4", clip.rate, audio_from=clip) as writer:
        for frame in read_frames(clip):
            writer.add(frame.resize((63, 47)))
    out = probe(tmp_path / "out.mp4")
    assert (out.size, out.frames, out.codec, out.audio) == ((62, 46), 5, "h264", True)
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        assert container.streams.audio[0].codec_context.name == "aac"


def test_cli_recognises_a_clip_by_its_content_and_writes_an_mp4_with_its_sound(clip_path, tmp_path):
    from stylize.cli import main

    named_like_a_picture = tmp_path / "clip.png"
    named_like_a_picture.write_bytes(clip_path.read_bytes())
    artwork().save(tmp_path / "art.png")
    out = tmp_path / "out.mp4"
    assert (
        main([str(named_like_a_picture), str(tmp_path / "art.png"), "-o", str(out), "--size", "64", "--steps", "4"])
        == 0
    )
    made = probe(out)
    assert (made.frames, made.codec, made.audio, made.size) == (5, "h264", True, (64, 50))
