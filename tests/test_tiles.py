"""Tiled rendering: scales past memory optimized tile by tile as the one picture they are."""

import itertools
import time

import numpy as np
import pytest
import torch
from helpers import artwork, photo
from PIL import Image

from stylize import Settings, SettingsError, tiles, transfer
from stylize.engine import _style_targets
from stylize.images import to_tensor
from stylize.losses import BALANCES, CELL, piece_grid, tiled_gaussians
from stylize.objective import Objective
from stylize.plan import (
    PICTURE_BYTES_PER_PIXEL,
    TILE_BYTES,
    Scale,
    fit_in_memory,
    job_work,
    peak_bytes,
    plan,
    work_done,
)
from stylize.tiles import MARGIN, Adam, core_side, grid, shape, with_margin
from stylize.vgg import feature_extractor

CPU = torch.device("cpu")


@pytest.mark.parametrize("size", [(300, 200), (1000, 700), (4096, 3000)])
@pytest.mark.parametrize("sweep", [1, 2, 7])
def test_tiles_cores_cover_the_picture_once_on_whole_cells(size, sweep):
    cores = grid(size, 256, sweep)
    cover = np.zeros(size[::-1], int)
    for rows, columns in cores:
        cover[rows, columns] += 1
        assert all(s.start % CELL == 0 for s in (rows, columns))  # every layer's positions line up with the whole's
        seen = with_margin(rows, size[1]), with_margin(columns, size[0])
        assert (seen[0].stop - seen[0].start) * (seen[1].stop - seen[1].start) <= 256**2  # memory: margins too
    assert (cover == 1).all()


def test_a_side_that_fits_one_tile_is_not_cut():
    assert grid((200, 600), 256, 1)[0][1] == slice(0, 200)


@pytest.mark.parametrize("width", [1000, 3 * core_side(300), 8192])  # 672: three cores fit it exactly
def test_the_grid_moves_every_sweep(width):
    cuts = [{c.start for _, c in grid((width, 700), 300, sweep)} - {0} for sweep in range(1, 30)]
    assert all(cuts)
    assert all(not a & b for a, b in itertools.pairwise(cuts))  # no border in the same place two sweeps running


def test_a_side_is_cut_into_the_fewest_cores_that_cover_it():
    """Each core more is a margin more to compute: in 512 px tiles 1024 px is 3 cores and 768 px 2 at every sweep
    (cut every core_side px from a moving offset, 1024 x 768 px was 6 to 12 tiles)."""
    assert {len(tiles._cuts(1024, 512, sweep)) for sweep in range(1, 30)} == {3}
    assert {len(tiles._cuts(768, 512, sweep)) for sweep in range(1, 30)} == {2}


@pytest.mark.parametrize(("size", "strips"), [((1024, 539), True), ((539, 1024), True), ((2048, 1536), False)])
def test_tiles_are_squares_or_strips_whichever_computes_fewer_margins(size, strips):
    """Memory follows a tile's pixels, not its shape: 1024 x 539 px in 512 px tiles is three strips across the
    picture, which run 1.12 of its pixels (six squares ran 1.26); 2048 x 1536 px stays in squares."""
    width, height = shape(size, 512)
    assert width * height <= 512**2
    squares = [(rows, columns) for rows in tiles._cuts(size[1], 512, 1) for columns in tiles._cuts(size[0], 512, 1)]
    cores = grid(size, 512, 1)
    if strips:
        assert tiles.work(size, cores) < 0.95 * tiles.work(size, squares)
        assert all(min(size) in (rows.stop - rows.start, columns.stop - columns.start) for rows, columns in cores)
    else:
        assert cores == squares


@pytest.mark.parametrize(("size", "pieces"), [((1024, 768), 2), ((2048, 1536), 12), ((500, 300), 1)])
def test_statistics_are_taken_in_the_fewest_pieces_that_cover_the_picture_once(size, pieces):
    """A statistics pass's pieces (768 px ones, at a scale made in 512 px tiles): a side that fits in one is not cut
    (1024 x 768 px was four pieces, two of them strips 192 px high), the cores cover each position once, and
    no piece with its margins is larger than asked."""
    cut = piece_grid(size, 768)
    assert len(cut) == pieces
    covered = torch.zeros(size[1], size[0], dtype=torch.int)
    for rows, columns, seen_rows, seen_columns in cut:
        covered[rows, columns] += 1
        assert seen_rows.start <= rows.start and rows.stop <= seen_rows.stop
        assert seen_columns.start <= columns.start and columns.stop <= seen_columns.stop
        assert (seen_rows.stop - seen_rows.start) * (seen_columns.stop - seen_columns.start) <= 768**2
        assert rows.start % CELL == 0 and columns.start % CELL == 0
    assert (covered == 1).all()


def test_only_what_does_not_fit_is_tiled(monkeypatch):
    settings = Settings(size=2048, steps=100)
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 3 * 2**30)
    scales = fit_in_memory(plan((4000, 3000), settings), settings, CPU, "bf16")
    assert scales[0].tile == 0 and scales[-1].tile >= 512  # small scales whole, the largest in tiles
    assert all(scale.tile == 0 or scale.tile < max(scale.size) for scale in scales)
    # However much is free, a scale whole past TILE_BYTES is tiled (a print's peak stays within a few GB) ...
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 64 * 2**30)
    scales = fit_in_memory(plan((4000, 3000), settings), settings, CPU, "bf16")
    assert [scale.tile == 0 for scale in scales] == [3200 * w * h <= TILE_BYTES for w, h in (s.size for s in scales)]
    assert scales[-1].tile and peak_bytes(scales[-1], "bf16") <= PICTURE_BYTES_PER_PIXEL * 2048 * 1536 + TILE_BYTES
    # ... unless tiles are forbidden, where what fits in free memory is made whole.
    never = Settings(size=2048, steps=100, tile_size=0)
    assert all(scale.tile == 0 for scale in fit_in_memory(plan((4000, 3000), never), never, CPU, "bf16"))


def test_the_memory_model_counts_the_picture_and_auto_tiles_keep_within_the_budget(monkeypatch):
    """The picture's state (picture, photo, region, moments, average) is picture-sized however it is made; auto
    tiles are sized by TILE_BYTES, not by all the memory that happens to be free."""
    whole, tiled = Scale((4096, 3072), 10, 0), Scale((4096, 3072), 10, 512)
    assert peak_bytes(tiled, "bf16") - 3200 * 512 * 512 == PICTURE_BYTES_PER_PIXEL * 4096 * 3072
    assert peak_bytes(whole, "bf16") > 3 * peak_bytes(tiled, "bf16")
    settings = Settings(size=4096, steps=20)
    for free in (8 * 2**30, 30 * 2**30):  # a 4096 px picture fits whole in neither
        monkeypatch.setattr("stylize.plan.free_memory", lambda device, free=free: free)
        largest = fit_in_memory(plan((4000, 3000), settings), settings, CPU, "bf16")[-1]
        assert largest.tile and peak_bytes(largest, "bf16") <= min(
            free, PICTURE_BYTES_PER_PIXEL * 4096 * 3072 + TILE_BYTES
        )


def test_tile_size_asks_for_tiles_or_forbids_them(monkeypatch):
    scales = plan((400, 300), Settings(size=400, steps=40, tile_size=256))
    assert [scale.tile for scale in scales] == [0, 0, 0, 256, 256]  # up to 256 px whole, then tiled
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 2**30)
    never = Settings(size=4096, tile_size=0)
    with pytest.raises(SettingsError, match="choose a smaller size or let it be made in tiles"):
        fit_in_memory(plan((4000, 3000), never), never, CPU, "bf16")
    with pytest.raises(SettingsError, match="tile_size must be -1, 0 or at least 256"):
        Settings(tile_size=100)


def test_a_tiled_steps_work_counts_the_margins_and_the_statistics_pass():
    settings = Settings(size=1024, steps=20)
    tiled = Settings(size=1024, steps=20, tile_size=256)
    scale = plan((1024, 768), tiled)[-1]
    assert scale.step_cost(1) > 1024 * 768 * (256 / (256 - 2 * MARGIN)) ** 2 * 0.9  # margins counted
    assert job_work((1024, 768), tiled) == work_done(plan((1024, 768), tiled))[-1] > job_work((1024, 768), settings)


def test_the_job_clock_counts_the_tiles_that_auto_tiles_add(monkeypatch):
    """A print's largest scales are tiled at run time past TILE_BYTES, however much is free; the work a job is
    priced by counts those tiles before any device is known."""
    settings = Settings(size=2048, steps=40)
    monkeypatch.setattr("stylize.plan.free_memory", lambda device: 64 * 2**30)
    run = fit_in_memory(plan((4000, 3000), settings), settings, CPU, "fp32")
    assert run[-1].tile  # the run tiles its largest scale ...
    assert job_work((4000, 3000), settings) == work_done(run)[-1] > work_done(plan((4000, 3000), settings))[-1]


def test_statistics_taken_in_pieces_are_those_of_the_whole():
    settings = Settings()
    vgg = feature_extractor(settings.layers, "untrained", "cpu")
    image = torch.from_numpy(np.asarray(artwork(400, 300, period=12), np.float32) / 255).permute(2, 0, 1)[None]
    whole = tiled_gaussians(vgg, image, list(settings.style_layers), tile=0)
    tiled = tiled_gaussians(vgg, image, list(settings.style_layers), tile=256)
    for name in settings.style_layers:
        assert torch.allclose(tiled[name].mean, whole[name].mean, rtol=0.02, atol=1e-3), name
        error = (tiled[name].cov - whole[name].cov).norm() / whole[name].cov.norm()
        assert error < 0.05, (name, error.item())


@pytest.mark.parametrize(("masked", "size"), [(False, (176, 128)), (True, (176, 128)), (True, (170, 121))])
def test_a_tiles_gradient_on_its_core_is_the_whole_pictures(masked, size):
    """Autograd of the whole picture's objective against the tiles' surrogates on their cores, with layers whose
    receptive field the margin covers (so the two are equal up to float32's round-off), and the losses gathered
    in pieces against the whole's; on a size no multiple of 16 too, whose partial last cell VGG19 pools."""
    settings = Settings(
        content_layer="relu2_2",
        style_layers=("relu1_1", "relu2_1", "relu3_1"),
        style_layer_weights=(1, 1, 1),
        style_strength=3,
    )
    vgg = feature_extractor(settings.layers, "untrained", "cpu")
    picture = to_tensor(photo(*size))
    x = (picture + 0.2 * torch.rand(picture.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    region = None
    if masked:
        region = torch.zeros(1, 1, size[1], size[0])
        region[..., 40:130] = 1
        region[..., 60:, :] *= 0.5
    gradients, losses = {}, {}
    for tile in (0, 96):
        objective = Objective(vgg, settings, BALANCES["untrained"], "fp32")
        objective.aim_style(
            _style_targets(vgg, [to_tensor(artwork())], [1.0], objective.layer_weights, Scale(size, 1, 0), settings)
        )
        objective.aim(picture, region, tile)
        gradients[tile] = torch.zeros_like(x)
        if tile:
            objective.gather(x)
        cores = Scale(size, 1, tile).grid(2)
        assert len(cores) > 4 if tile else len(cores) == 1
        for rows, columns in cores:
            gradients[tile][..., rows, columns] = objective.gradient(x, rows, columns)
        losses[tile] = objective.last_losses()
    # Over the whole gradient: at single pixels where it nearly cancels, the whole's own round-off (another number
    # of threads) reached 1.2e-3 of its largest value on an AVX-512 CPU; over the whole it is 2e-4, like the tiles'.
    error = (gradients[96] - gradients[0]).norm() / gradients[0].norm()
    assert error < 1e-3, error.item()
    assert losses[96] == pytest.approx(losses[0], rel=1e-5)


def test_one_adam_state_for_the_picture_stepped_a_tile_at_a_time():
    """Tile by tile with the whole's gradients is the whole step, visit after visit (nothing restarts), and the
    whole picture's step is torch's Adam's with the averaged iterate."""
    start = torch.rand(1, 3, 150, 200, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    gradients = [torch.randn(start.shape, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    whole, tiled = Adam(start, 0.02, 0.8), Adam(start, 0.02, 0.8)
    x = start.clone().requires_grad_(True)
    reference = torch.optim.Adam([x], lr=0.02)
    for step, gradient in enumerate(gradients, start=1):
        whole.step(slice(None), slice(None), gradient, step)
        for rows, columns in grid((200, 150), 16 + 2 * MARGIN, step):
            tiled.step(rows, columns, gradient[..., rows, columns], step)
        x.grad = gradient
        reference.step()
    assert torch.allclose(tiled.x, whole.x) and torch.allclose(tiled.average, whole.average)
    assert torch.allclose(whole.x, x.detach(), atol=1e-6)
    assert not torch.allclose(whole.average, whole.x)  # the average lags the iterate


@pytest.fixture(scope="module")
def tiled_and_whole():
    """The same transfer at a size where both fit: in 256 px tiles, whole, and whole again with another number of
    threads (which rounds differently, and Adam carries rounding far where the gradient is near zero). Adam
    throughout, as tiled scales are made."""
    content, style = photo(400, 300), artwork(256, 256, period=12)
    runs = {}
    for name, tile_size in (("tiled", 256), ("whole", 0)):
        settings = Settings(size=400, steps=24, tile_size=tile_size, optimizer="adam")
        runs[name] = list(transfer(content, style, settings))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        runs["rounded otherwise"] = list(transfer(content, style, Settings(size=400, steps=24, optimizer="adam")))
    finally:
        torch.set_num_threads(threads)
    return content, style, runs


def test_a_tiled_run_streams_tiles_then_one_whole_picture(tiled_and_whole):
    _, _, runs = tiled_and_whole
    records = runs["tiled"]
    assert records[-1].final and records[-1].image().size == (400, 300)
    tiled = [r for r in records if r.tiles]
    assert tiled and all(1 <= r.tile <= r.tiles for r in tiled)
    assert all(r.image().size == r.size for r in records)  # previews: the whole picture at its scale
    done, steps = [r.done for r in records], [r.step for r in records]
    assert done == sorted(done) and done[-1] == 1.0 and steps == sorted(steps)


def test_tiles_make_the_whole_pictures_picture(tiled_and_whole):
    """The same objective, optimized in tiles or whole, gives nearly the same picture: no seams, no other look."""
    _, _, runs = tiled_and_whole
    tiled, whole, other = (
        np.asarray(runs[name][-1].image(), np.float64) for name in ("tiled", "whole", "rounded otherwise")
    )
    assert runs["tiled"][-1].losses["total"] == pytest.approx(runs["whole"][-1].losses["total"], rel=0.05)
    # Tiles are no further from the whole picture than rounding alone takes it (untrained features, 24 steps:
    # 11 of 255 against 23 measured), and nowhere far: a seam, a line across the picture, is over 0.25% of its
    # pixels (the 99.9th percentile measured 40; the largest single pixel, 55 to 65, is chance: rounding's is 160).
    difference = np.abs(tiled - whole).mean(axis=2)
    assert difference.mean() < np.abs(other - whole).mean()
    assert np.quantile(difference, 0.999) < 64


def test_closing_a_tiled_run_stops_it_at_once():
    stream = transfer(photo(512, 384), artwork(), Settings(size=512, steps=400, tile_size=256))
    record = next(r for r in stream if r.tiles)
    assert record.tile >= 1
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 0.5
    with pytest.raises(StopIteration):
        next(stream)


def test_a_result_made_bigger_starts_from_it_and_makes_only_the_larger_scales():
    content, style = photo(400, 300), artwork()
    small = list(transfer(content, style, Settings(size=128, steps=20)))[-1].image()
    records = list(transfer(content, style, Settings(size=256, steps=20), bigger_from=small))
    scales = plan(content.size, Settings(size=256, steps=20), above=128)
    assert all(max(scale.size) > 128 for scale in scales)
    assert records[-1].total == sum(s.steps for s in scales) < 20 and records[-1].image().size == (256, 192)
    bigger = np.asarray(records[-1].image().resize(small.size, Image.Resampling.BOX), np.float64)
    from_scratch = list(transfer(content, style, Settings(size=256, steps=20)))[-1].image()
    # Closer to the picture it was made from than a new picture of the same size is.
    scratch = np.asarray(from_scratch.resize(small.size, Image.Resampling.BOX), np.float64)
    source = np.asarray(small, np.float64)
    assert np.abs(bigger - source).mean() < np.abs(scratch - source).mean()
    with pytest.raises(SettingsError, match="choose a size above 128 px"):
        transfer(content, style, Settings(size=128, steps=20), bigger_from=small)
