import gc
import time

import numpy as np
import pytest
import torch
from helpers import artwork, photo, style_distance
from PIL import Image

import stylize.engine
from stylize import Settings, SettingsError, transfer
from stylize.device import pick_device, pick_precision
from stylize.images import to_tensor
from stylize.losses import StyleTarget, gaussian, gram, style_loss
from stylize.plan import SCHEDULE, scale_sizes, split_steps
from stylize.vgg import feature_extractor

SMALL = {"size": 96, "steps": 30}


def run(content, style, **settings):
    """The final Progress of a transfer, checking the stream's shape on the way."""
    records = list(transfer(content, style, Settings(**{**SMALL, **settings})))
    assert records[-1].final and not any(r.final for r in records[:-1])
    return records[-1]


def test_loss_goes_down_with_more_steps(content_image, style_image):
    one = run(content_image, style_image, steps=1)
    many = run(content_image, style_image, steps=40)
    assert many.losses["style"] < 0.5 * one.losses["style"]
    assert many.losses["total"] < one.losses["total"]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_result_moves_towards_the_style_and_keeps_the_content(content_image, style_image, optimizer):
    result = run(content_image, style_image, optimizer=optimizer, steps=40).image()
    assert result.size == (96, 72)
    assert style_distance(result, style_image) < 0.5 * style_distance(content_image, style_image)
    # Structure: the result's brightness still follows the photo's (the disc, the gradient).
    grey = [
        np.asarray(im.convert("L").resize((24, 18), Image.Resampling.BOX), float).ravel()
        for im in (result, content_image)
    ]
    assert np.corrcoef(*grey)[0, 1] > 0.5


def test_lbfgs_makes_only_the_last_scale(content_image, style_image, monkeypatch):
    made = []

    class Counted(stylize.engine._Lbfgs):
        def __init__(self, objective, start, average_decay):
            made.append(tuple(start.shape))
            super().__init__(objective, start, average_decay)

    monkeypatch.setattr(stylize.engine, "_Lbfgs", Counted)
    final = run(content_image, style_image, optimizer="lbfgs", size=256)
    assert final.scale == 3 and made == [(1, 3, 192, 256)]  # Adam laid out the smaller scales


def test_same_inputs_settings_and_seed_give_the_same_pixels(content_image, style_image):
    first = run(content_image, style_image, init="noise", seed=3).image()
    again = run(content_image, style_image, init="noise", seed=3).image()
    other_seed = run(content_image, style_image, init="noise", seed=4).image()
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other_seed))


def test_stream_yields_previews_then_one_final_image_at_the_requested_size():
    content = photo(300, 100)
    records = list(transfer(content, artwork(50, 120), Settings(size=240, steps=60)))
    final = records[-1]
    assert final.final and final.step == final.total == 60
    assert final.image().size == (240, 80)
    assert len(records) >= 3, "a run of several seconds streams several previews"
    steps = [r.step for r in records]
    assert steps == sorted(steps)
    scales = [r.size[0] for r in records]
    assert scales == sorted(scales) and scales[0] < 240
    done = [r.done for r in records]
    assert done == sorted(done) and 0 < done[0] and done[-1] == 1.0
    # Later steps cost more (bigger scales), so the work done runs behind the step count early on.
    assert all(r.done <= r.step / r.total + 1e-9 for r in records)


def test_closing_the_generator_stops_the_work(content_image, style_image):
    s = Settings(size=128, steps=2000)
    vgg = feature_extractor(s.layers, "untrained", "cpu", pick_precision("auto", pick_device("cpu")))  # the engine's
    calls = []
    hook = vgg.register_forward_hook(lambda *_: calls.append(1))
    try:
        stream = transfer(content_image, style_image, s)
        next(stream)
        started = time.perf_counter()
        stream.close()
        assert time.perf_counter() - started < 0.5
        before = len(calls)
        gc.collect()
        assert stream.gi_frame is None  # its tensors are released with the frame
        time.sleep(0.3)  # nothing may still be running in the background
        assert len(calls) == before
    finally:
        hook.remove()


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("init", ["content", "noise"])
def test_constant_colour_images_give_finite_losses(optimizer, init):
    black = Image.new("RGB", (64, 64), (0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    for content, style in [(black, white), (white, black), (black, black)]:
        final = run(content, style, size=64, steps=15, optimizer=optimizer, init=init)
        assert all(np.isfinite(v) and v < 1e6 for v in final.losses.values()), final.losses
        assert np.isfinite(np.asarray(final.image(), float)).all()


def test_the_style_loss_means_the_same_at_every_resolution():
    content, style = photo(256, 192), artwork(256, 256)
    s = Settings()
    vgg = feature_extractor(s.layers, "untrained", "cpu")

    def style_error(size: int) -> float:
        with torch.no_grad():
            fc = vgg(to_tensor(content, (size, size * 3 // 4)))
            fs = vgg(to_tensor(style, (size, size)))
            return sum(style_loss(fc[n], StyleTarget.of(gaussian(fs[n]))).item() for n in s.style_layers)

    assert style_error(256) == pytest.approx(style_error(128), rel=0.5)


def test_gram_gradient_is_the_true_gradient():
    features = torch.randn(4, 35, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(gram, (features,))


@pytest.mark.parametrize("positions", [(3, 2), (5, 7)], ids=["fewer positions than channels", "more positions"])
@pytest.mark.parametrize("masked", [False, True])
def test_style_loss_gradient_is_the_true_gradient(positions, masked):
    generator = torch.Generator().manual_seed(1)
    style = torch.randn(1, 8, 6, 6, dtype=torch.float64, generator=generator)
    target = StyleTarget.of(gaussian(style))
    features = torch.randn(1, 8, *positions, dtype=torch.float64, generator=generator, requires_grad=True)
    mask = torch.rand(1, 1, *positions, dtype=torch.float64, generator=generator) if masked else None
    assert torch.autograd.gradcheck(lambda f: style_loss(f, target, mask), (features,))


def test_scales_grow_by_about_sqrt2_from_128_to_the_requested_size():
    sizes = scale_sizes((1024, 768), 512)
    assert sizes[0] == (128, 96) and sizes[-1] == (512, 384)
    ratios = [b[0] / a[0] for a, b in zip(sizes, sizes[1:], strict=False)]
    assert all(1.2 < r <= 1.45 for r in ratios)
    assert scale_sizes((1024, 768), 100) == [(100, 75)]


def test_each_scale_gets_fewer_steps_than_the_one_before_but_the_last_gets_its_boost():
    counts = split_steps(250, 5)
    assert sum(counts) == 250
    assert all(a > b for a, b in zip(counts[:-1], counts[1:-1], strict=False))
    assert counts[-1] == pytest.approx(counts[-2] * SCHEDULE.step_decay * SCHEDULE.final_boost, abs=2)
    for total in range(1, 200):  # however few the steps, every scale gets one
        for scales in range(1, min(total, 13) + 1):
            counts = split_steps(total, scales)
            assert sum(counts) == total and min(counts) >= 1, (total, scales, counts)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"size": 10}, "size must be between 64 and 8192"),
        ({"size": 100000}, "size"),
        ({"steps": -5}, "steps"),
        ({"steps": 2.5}, "whole number"),
        ({"style_strength": float("nan")}, "finite"),
        ({"style_strength": -1}, "style_strength"),
        ({"content_strength": float("inf")}, "content_strength"),
        ({"optimizer": "sgd"}, "lbfgs, adam"),
        ({"preserve_colors": "sepia"}, "preserve_colors"),
        ({"content_layer": "relu9_9"}, "not a VGG19 layer"),
        ({"style_layer_weights": (1.0,)}, "one weight per"),
        ({"size": "big"}, "size must be a number"),
    ],
)
def test_bad_settings_are_refused_with_a_message_that_says_what_is_allowed(bad, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**bad)


def test_settings_accept_whole_floats_and_round_trip_through_json():
    s = Settings(size=256.0, steps=20, style_weights=[1, 2])
    assert s.size == 256 and isinstance(s.size, int) and s.style_weights == (1.0, 2.0)
    assert Settings.from_json(s.to_json()) == s


def test_output_too_small_for_a_long_thin_image_is_refused():
    with pytest.raises(SettingsError, match="too small"):
        list(transfer(photo(400, 50), artwork(), Settings(size=64, steps=2)))


def test_a_size_that_would_not_fit_in_memory_is_refused_before_starting(monkeypatch, content_image, style_image):
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 100 * 2**20)
    with pytest.raises(SettingsError, match="needs about .* GB of memory .* choose a smaller size"):
        transfer(content_image, style_image, Settings(size=2048))


def test_running_out_of_memory_mid_run_becomes_a_message(monkeypatch, content_image, style_image):
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    stream = transfer(content_image, style_image, Settings(size=64, steps=5))
    monkeypatch.setattr("stylize.objective.tv_loss", no_memory)
    with pytest.raises(SettingsError, match="Ran out of CPU memory at .* choose a smaller size"):
        list(stream)


def test_a_jobs_work_is_known_before_it_starts(monkeypatch, content_image, style_image):
    """job_work (what a server's time estimate uses) is the pixel count summed over the steps the run takes."""
    from stylize.plan import job_work

    monkeypatch.setattr("stylize.engine.PREVIEW_SECONDS", 0)  # a record for every step
    settings = Settings(size=150, steps=12)
    records = list(transfer(content_image, style_image, settings))
    assert [r.step for r in records] == list(range(1, 13))
    assert job_work(content_image.size, settings) == sum(r.size[0] * r.size[1] for r in records)


def test_a_result_records_the_weights_kind_not_a_server_path(monkeypatch, content_image, style_image):
    from stylize.images import result_metadata

    settings = Settings(size=64, steps=2)
    final = list(transfer(content_image, style_image, settings))[-1]
    monkeypatch.setenv("STYLIZE_WEIGHTS", "/srv/private/models/vgg19-dcbb9e9d.pth")  # as a server sets it
    metadata = result_metadata(settings, final)
    assert "/srv/private" not in "".join(metadata.values())
    assert metadata["stylize:weights"] == "untrained"
