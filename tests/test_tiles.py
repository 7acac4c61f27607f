"""Tiled rendering: scales past memory optimized tile by tile, against the whole style, without seams."""

import itertools
import time

import numpy as np
import pytest
import torch
from helpers import artwork, photo, style_distance
from PIL import Image

from stylize import Settings, SettingsError, transfer
from stylize.engine import fit_in_memory
from stylize.losses import tiled_gaussians
from stylize.plan import TILE_OVERLAP, Scale, _spans, plan
from stylize.vgg import feature_extractor

CPU = torch.device("cpu")


@pytest.mark.parametrize("length", [300, 511, 1000, 4096])
@pytest.mark.parametrize("shifted", [False, True])
def test_tiles_cover_the_picture_and_overlap_their_neighbours(length, shifted):
    spans = _spans(length, 256, shifted)
    assert spans[0].start == 0 and spans[-1].stop == length
    assert all(s.stop - s.start <= 256 for s in spans)
    assert all(a.stop - b.start == TILE_OVERLAP for a, b in itertools.pairwise(spans))


def test_a_side_that_fits_one_tile_is_not_cut():
    assert _spans(200, 256, False) == _spans(200, 256, True) == [slice(0, 200)]


def test_the_grid_moves_between_passes():
    scale = Scale((1000, 700), steps=8, tile=300)
    assert scale.passes == 2
    first, second = ({c.start for _, c in scale.grid(p)} - {0} for p in (0, 1))
    assert first and second and not first & second  # no cut in the same place


def test_only_what_does_not_fit_is_tiled(monkeypatch):
    settings = Settings(size=2048, steps=100)
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 3 * 2**30)
    scales = fit_in_memory(plan((4000, 3000), settings), settings, CPU, "bf16")
    assert scales[0].tile == 0 and scales[-1].tile >= 512  # small scales whole, the largest in tiles
    assert all(scale.tile == 0 or scale.tile < max(scale.size) for scale in scales)
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 64 * 2**30)
    assert all(scale.tile == 0 for scale in fit_in_memory(plan((4000, 3000), settings), settings, CPU, "bf16"))


def test_tile_size_asks_for_tiles_or_forbids_them(monkeypatch):
    scales = plan((400, 300), Settings(size=400, steps=40, tile_size=256))
    assert [scale.tile for scale in scales] == [0, 0, 0, 256, 256]  # up to 256 px whole, then tiled
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 2**30)
    never = Settings(size=4096, tile_size=0)
    with pytest.raises(SettingsError, match="choose a smaller size or let it be made in tiles"):
        fit_in_memory(plan((4000, 3000), never), never, CPU, "bf16")
    with pytest.raises(SettingsError, match="tile_size must be -1, 0 or at least 256"):
        Settings(tile_size=100)


def test_statistics_taken_in_tiles_are_those_of_the_whole():
    settings = Settings()
    vgg = feature_extractor(settings.layers, "untrained", "cpu")
    image = torch.from_numpy(np.asarray(artwork(400, 300, period=12), np.float32) / 255).permute(2, 0, 1)[None]
    whole = tiled_gaussians(vgg, image, list(settings.style_layers), tile=0)
    tiled = tiled_gaussians(vgg, image, list(settings.style_layers), tile=256)
    for name in settings.style_layers:
        assert torch.allclose(tiled[name].mean, whole[name].mean, rtol=0.02, atol=1e-3), name
        error = (tiled[name].cov - whole[name].cov).norm() / whole[name].cov.norm()
        assert error < 0.05, (name, error.item())


@pytest.fixture(scope="module")
def tiled_and_whole():
    """The same transfer twice at a size where both fit: in 256 px tiles and whole."""
    content, style = photo(512, 384), artwork(256, 256, period=12)
    runs = {}
    for name, tile_size in (("tiled", 256), ("whole", 0)):
        runs[name] = list(transfer(content, style, Settings(size=512, steps=40, tile_size=tile_size)))
    return content, style, runs


def test_a_tiled_run_streams_tiles_then_one_whole_picture(tiled_and_whole):
    _, _, runs = tiled_and_whole
    records = runs["tiled"]
    assert records[-1].final and records[-1].image().size == (512, 384)
    tiled = [r for r in records if r.tiles]
    assert tiled and all(1 <= r.tile <= r.tiles for r in tiled)
    assert all(r.image().size == r.size for r in records)  # previews: the whole picture at its scale
    done = [r.done for r in records]
    assert done == sorted(done) and done[-1] == 1.0


def test_tiles_leave_no_seams(tiled_and_whole):
    """Pixel differences across the tiles' borders are like those across any other line (bench/tiles.py measures
    the same on a big picture, to 10%; this small one has few borders to average over)."""
    _, _, runs = tiled_and_whole
    picture = np.asarray(runs["tiled"][-1].image(), np.float64)
    final = runs["tiled"][-2]
    assert final.tiles and final.size == (512, 384)  # the last scale was tiled
    scale = Scale(final.size, steps=1, tile=256)
    for axis, spans in ((1, [c for _, c in scale.grid(0)]), (0, [r for r, _ in scale.grid(0)])):
        step = np.abs(np.diff(picture, axis=axis)).mean(axis=(1 - axis, 2))  # across line i | i + 1
        borders = {s.start - 1 for s in spans if s.start} | {s.stop - 1 for s in spans if s.stop < len(step) + 1}
        others = [step[i] for i in range(len(step)) if i not in borders]
        assert np.mean([step[i] for i in borders]) < 1.25 * np.mean(others)


def test_tiles_paint_as_well_as_the_whole(tiled_and_whole):
    content, style, runs = tiled_and_whole
    tiled, whole = (runs[name][-1].image() for name in ("tiled", "whole"))
    assert style_distance(tiled, style) == pytest.approx(style_distance(whole, style), rel=0.25)

    def likeness(image: Image.Image) -> float:
        """How closely the picture's brightness follows the photo's: its structure kept."""
        grey = [
            np.asarray(im.convert("L").resize((32, 24), Image.Resampling.BOX), float).ravel() for im in (image, content)
        ]
        return np.corrcoef(*grey)[0, 1]

    assert likeness(tiled) == pytest.approx(likeness(whole), abs=0.15)


def test_closing_a_tiled_run_stops_it_at_once():
    stream = transfer(photo(512, 384), artwork(), Settings(size=512, steps=60, tile_size=256))
    record = next(r for r in stream if r.tiles)
    assert record.tile >= 1
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 0.5
    with pytest.raises(StopIteration):
        next(stream)
