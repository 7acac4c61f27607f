"""Each artistic control has a real, measurable effect."""

import numpy as np
import pytest
import torch
from helpers import artwork, photo, style_distance
from PIL import Image

from stylize import Settings, transfer
from stylize.images import rgb_to_ycbcr, to_tensor
from stylize.losses import tv_loss


def final_image(content, style, mask=None, init_image=None, **settings) -> Image.Image:
    s = Settings(**{"size": 96, "steps": 30, **settings})
    return list(transfer(content, style, s, mask=mask, init_image=init_image))[-1].image()


def chroma(image: Image.Image) -> np.ndarray:
    return rgb_to_ycbcr(to_tensor(image))[0, 1:].numpy()


def mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b.resize(a.size), float)).mean())


def test_luminance_mode_keeps_the_photos_chroma(content_image, style_image):
    styled = final_image(content_image, style_image)
    kept = final_image(content_image, style_image, preserve_colors="luminance")
    photo_chroma = chroma(content_image)
    assert np.abs(chroma(kept) - photo_chroma).mean() < 0.01
    assert np.abs(chroma(styled) - photo_chroma).mean() > 3 * np.abs(chroma(kept) - photo_chroma).mean()
    # ... while its brightness did change.
    assert mean_abs(kept.convert("L"), content_image.convert("L")) > 3


def test_histogram_mode_recolours_the_style_to_the_photos_palette(content_image, style_image):
    photo_mean = np.asarray(content_image, float).reshape(-1, 3).mean(0)
    styled = final_image(content_image, style_image)
    matched = final_image(content_image, style_image, preserve_colors="histogram")
    gap = {
        name: np.abs(np.asarray(im, float).reshape(-1, 3).mean(0) - photo_mean).sum()
        for name, im in [("styled", styled), ("matched", matched)]
    }
    assert gap["matched"] < 0.5 * gap["styled"]


def test_several_styles_blend_in_the_statistics(content_image):
    red_blue, green = (
        artwork(),
        Image.fromarray(
            np.kron(np.indices((12, 12)).sum(0) % 2, np.ones((8, 8)))[..., None].repeat(3, -1).astype(np.uint8)
            * np.array([30, 220, 60], np.uint8)
        ),
    )
    alone = final_image(content_image, red_blue)
    weighted_alone = final_image(content_image, [red_blue, green], style_weights=(1.0, 0.0))
    assert np.array_equal(np.asarray(alone), np.asarray(weighted_alone))
    mostly_first = final_image(content_image, [red_blue, green], style_weights=(0.9, 0.1))
    mostly_second = final_image(content_image, [red_blue, green], style_weights=(0.1, 0.9))
    assert style_distance(mostly_first, red_blue) < style_distance(mostly_second, red_blue)
    assert style_distance(mostly_second, green) < style_distance(mostly_first, green)


def dominant_frequency(image: Image.Image) -> float:
    a = np.asarray(image.convert("L"), float)
    power = np.abs(np.fft.fft2(a - a.mean())) ** 2
    radius = np.hypot(np.fft.fftfreq(a.shape[0])[:, None], np.fft.fftfreq(a.shape[1])[None])
    return float((power * radius).sum() / power.sum())


def test_style_scale_sets_the_size_of_the_texture():
    texture = {
        scale: final_image(
            photo(128, 128),
            artwork(128, 128, period=16),
            size=128,
            steps=60,
            style_scale=scale,
            init="noise",
            content_strength=0,
        )
        for scale in (0.5, 2.0)
    }
    assert dominant_frequency(texture[0.5]) > 1.5 * dominant_frequency(texture[2.0])


def test_a_mask_confines_the_style_to_its_white_part(content_image, style_image):
    mask = Image.new("L", content_image.size, 0)
    mask.paste(255, (0, 0, content_image.width // 2, content_image.height))
    result = final_image(content_image, style_image, mask=mask)
    half = content_image.width // 2
    styled_half = [im.crop((0, 0, half - 8, im.height)) for im in (result, content_image)]
    kept_half = [im.crop((half + 8, 0, im.width, im.height)) for im in (result, content_image)]
    assert mean_abs(*kept_half) < 2
    assert mean_abs(*styled_half) > 15
    # The style is measured on the white half only: it came closer to the style there.
    assert style_distance(styled_half[0], style_image) < 0.7 * style_distance(styled_half[1], style_image)


def test_init_from_noise_or_a_previous_result(content_image, style_image):
    from_content = final_image(content_image, style_image, steps=2)
    from_noise = final_image(content_image, style_image, steps=2, init="noise")
    previous = final_image(content_image, style_image, steps=40)
    continued = final_image(content_image, style_image, steps=2, init_image=previous)
    assert mean_abs(from_content, content_image) < mean_abs(from_noise, content_image)
    assert mean_abs(continued, previous) < mean_abs(continued, content_image)


def content_error(image: Image.Image, content: Image.Image) -> float:
    return mean_abs(image.convert("L"), content.convert("L"))


@pytest.mark.parametrize(
    ("knob", "low", "high", "measure"),
    [
        ("content_strength", 0.2, 5.0, lambda im, c, s: content_error(im, c)),
        ("style_strength", 0.2, 5.0, lambda im, c, s: style_distance(im, s)),
        ("smoothing", 0.0, 10.0, lambda im, c, s: tv_loss(to_tensor(im)).item()),
    ],
)
def test_strength_controls_move_the_result_the_expected_way(knob, low, high, measure, content_image, style_image):
    """More content strength: closer to the photo. More style: closer to the style. More smoothing: smoother."""
    weak = final_image(content_image, style_image, **{knob: low})
    strong = final_image(content_image, style_image, **{knob: high})
    assert measure(strong, content_image, style_image) < measure(weak, content_image, style_image)


@pytest.mark.parametrize(
    "extreme",
    [
        {"content_strength": 0},
        {"content_strength": 10},
        {"style_strength": 0},
        {"style_strength": 10},
        {"smoothing": 0},
        {"smoothing": 10},
        {"style_scale": 0.25},
        {"style_scale": 2},
    ],
)
def test_every_value_in_range_gives_a_sensible_picture(extreme, content_image, style_image):
    image = np.asarray(final_image(content_image, style_image, **extreme), float)
    assert np.isfinite(image).all() and image.std() > 5  # not blank, not a flat colour
    assert torch.isfinite(torch.tensor(image)).all()
