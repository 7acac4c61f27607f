"""How long a run takes on this server: a step costs a fixed time plus a time per pixel VGG19 runs through.

Both parts are measured from a run's own pictures (`StepTimer`); the job clock (`JobClock`) keeps the
latest run's, and the next run's time left starts from it (`TimeLeft`). One number per pixel instead would price
a 512 px step from a 128 px one, whose time is mostly the fixed part: estimates 2 to 5 times off.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from .plan import job_scales, job_work, later_frame_scales
from .settings import Settings, SettingsError

LOG = logging.getLogger(__name__)

PRIOR_STEPS = 10  # how many of a run's steps the server's speed from the runs before counts for


@dataclass(frozen=True)
class StepSpeed:
    fixed: float  # seconds a step costs whatever its size
    per_pixel: float  # seconds a step costs per pixel VGG19 runs through (plan.Scale.step_cost)

    def seconds(self, steps: float, pixel_steps: float) -> float:
        return self.fixed * steps + self.per_pixel * pixel_steps

    @classmethod
    def fit(cls, measured: list[tuple[int, float]]) -> StepSpeed:
        """The line through the last two (pixels, seconds per step) measurements. With one, or two that no such
        line fits (a busy machine's noise), all of the last one's time counts per pixel."""
        pixels, seconds = measured[-1]
        if len(measured) >= 2:
            before_pixels, before_seconds = measured[-2]
            per_pixel = (seconds - before_seconds) / (pixels - before_pixels)
            fixed = seconds - per_pixel * pixels
            if per_pixel >= 0 and fixed >= 0:
                return cls(fixed, per_pixel)
        return cls(0.0, seconds / pixels)


class RunPoint(Protocol):
    """Where a run stands: an engine Progress or a page's Frame."""

    scale: int
    step: int
    tile: int  # at a scale made in tiles, the tile last optimized of `tiles`; else both 0
    tiles: int
    elapsed: float
    done: float  # the share of its work done
    work: int  # its whole work (plan.work_done): a step costs the pixels VGG19 runs through, tiles' margins too


class RunFrame(RunPoint, Protocol):
    """A page's Frame: where a run stands, and what it has to do."""

    total: int  # steps
    steps_left: int  # of the whole job: a clip's later frames' too
    scales: int


class StepTimer:
    """Seconds per step at each scale of a run, against the work a step costs there, each measured from the
    scale's first picture on: the scale's set-up (and the run's start-up) come before it and are not a step's cost.
    At a tiled scale only the pictures that end a sweep count: within one, its step is not done."""

    def __init__(self) -> None:
        self.first: RunPoint | None = None  # the current scale's first picture
        self.measured: dict[int, tuple[float, float, int]] = {}  # per scale: (work a step, seconds a step, steps)

    def add(self, point: RunPoint) -> None:
        if point.tile != point.tiles:
            return
        # A new scale, or a clip's next frame (its steps count from 1 again at the same scale), starts over.
        if self.first is None or point.scale != self.first.scale or point.step <= self.first.step:
            self.first = point
        else:
            steps = point.step - self.first.step
            seconds = (point.elapsed - self.first.elapsed) / steps
            self.measured[point.scale] = ((point.done - self.first.done) * point.work / steps, seconds, steps)

    def speed(self) -> StepSpeed | None:
        """This run's speed, from its last two scales measured; None before one is."""
        return (
            StepSpeed.fit([(pixels, seconds) for pixels, seconds, _ in self.measured.values()][-2:])
            if self.measured
            else None
        )


class TimeLeft:
    """Seconds a run has left. Until its last scale is measured, the steps to come are priced at `prior`, the
    server's speed from the runs before (its fixed and per-pixel parts cannot be told apart from the small first
    scales alone), scaled by how this run's latest scale compares with it (the machine may be busier now). From
    then on, or without a prior, the run's own speed prices them. Averaging the run's time so far instead,
    start-up and set-ups included, gives estimates that jump."""

    def __init__(self, prior: StepSpeed | None = None) -> None:
        self.prior = prior
        self.timer = StepTimer()

    def update(self, frame: RunFrame) -> float | None:
        """The estimate after `frame`; None while there is no speed to go by."""
        self.timer.add(frame)
        steps_left, pixel_steps_left = frame.steps_left, (1 - frame.done) * frame.work
        own = self.timer.speed()
        if self.prior is None or frame.scales in self.timer.measured:
            return None if own is None else own.seconds(steps_left, pixel_steps_left)
        return self._pace() * self.prior.seconds(steps_left, pixel_steps_left)

    def _pace(self) -> float:
        """This run's steps so far against the prior's price for them, with PRIOR_STEPS steps at the prior's own
        pace: one step of a busy machine says little."""
        assert self.prior is not None
        measured = self.timer.measured.values()
        paces = sum(steps * seconds / self.prior.seconds(1, pixels) for pixels, seconds, steps in measured)
        return (PRIOR_STEPS + paces) / (PRIOR_STEPS + sum(steps for *_, steps in measured))


# The transfer the server times: a draft's size, so that its time is mostly the per-pixel work that the work model
# counts (a smaller one is mostly per-step costs it leaves out); a few seconds on a 2-core CPU.
SAMPLE = {"size": 256, "steps": 24}
SAMPLE_PHOTO = (256, 192)  # a photo's usual shape
GPU_SPEED = StepSpeed(fixed=0.0, per_pixel=2e-7)  # a GPU's until its first job measures it: a T4's, fp16 at 512 px


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
        LOG.info(
            "Timing this server in the background: a %d px transfer of %d steps (seconds; a job that comes "
            "meanwhile waits for it).",
            SAMPLE["size"],
            SAMPLE["steps"],
        )
        threading.Thread(target=self._time, args=(measure,), name="job clock", daemon=True).start()

    def _time(self, measure: Callable[[], StepSpeed]) -> None:
        try:
            started = time.perf_counter()
            self.speed = measure()
            LOG.info(
                "Timed this server in %.1f s: a step costs %.3f s plus %.3f s per 100,000 pixels.",
                time.perf_counter() - started,
                self.speed.fixed,
                self.speed.per_pixel * 1e5,
            )
        except Exception:  # the first job measures it instead; the log says why
            LOG.exception("Timing this server failed; jobs are admitted until one has measured it.")
        finally:
            self.timed.set()

    def record(self, timer: StepTimer, work_done: float) -> None:
        """A running job's speed, from its `timer`, once it has done `work_done` >= the sample's work."""
        speed = timer.speed()
        if speed is not None and work_done >= self.least_work:
            self.speed = speed

    def estimate(
        self, content_size: tuple[int, int], settings: Settings, above: int = 0, frames: int = 1
    ) -> float | None:
        """A job's seconds (its steps, tiles counted as job_work counts them; reading images and loading weights
        left out); None before a speed is known. `above`: the long side of a result the job makes bigger
        (plan.plan); `frames`: a clip's, each after the first costing a later frame's work
        (plan.later_frame_scales)."""
        if self.speed is None:
            return None
        first = job_scales(content_size, settings, above)
        later = later_frame_scales(first, settings) if frames > 1 else []
        seconds = [sum(self.speed.seconds(scale.steps, scale.work) for scale in scales) for scales in (first, later)]
        return seconds[0] + (frames - 1) * seconds[1]

    def check(
        self,
        content_size: tuple[int, int],
        settings: Settings,
        preset: str,
        limit: float,
        above: int = 0,
        frames: int = 1,
    ) -> None:
        """Refuse a job that would hold the worker longer than `limit` seconds, naming the largest size that fits
        (`above` and `frames` as for `estimate`)."""
        estimate = self._over_limit(content_size, settings, limit, above, frames)
        if estimate is None:
            return
        sizes = range((settings.size - 1) // 32 * 32, 63, -32)  # the size slider's steps, below this one
        fits = next(
            (size for size in sizes if self._fits(content_size, replace(settings, size=size), limit, above, frames)),
            None,
        )
        lighter = "Choose a lighter preset or a shorter clip." if frames > 1 else "Choose a lighter preset."
        advice = f"Choose {fits} px or less." if fits else lighter
        job = f"A {frames}-frame clip at {settings.size} px" if frames > 1 else f"A {settings.size} px picture"
        raise SettingsError(
            f"{job} with the {preset} preset would take about {about(estimate)} on this server; the limit is "
            f"{about(limit)}. {advice}"
        )

    def _over_limit(
        self, content_size: tuple[int, int], settings: Settings, limit: float, above: int = 0, frames: int = 1
    ) -> float | None:
        """A job's estimated seconds where they pass `limit`; None where it may run."""
        if limit == math.inf:  # no limit: nothing to wait for
            return None
        self.timed.wait()
        estimate = self.estimate(content_size, settings, above, frames)
        if estimate is None or job_work(content_size, settings, above, frames) <= self.least_work:
            return None
        return estimate if estimate > limit else None

    def _fits(self, content_size: tuple[int, int], settings: Settings, limit: float, above: int, frames: int) -> bool:
        try:
            return self._over_limit(content_size, settings, limit, above, frames) is None
        except SettingsError:  # too small for this photo's shape
            return False


def about(seconds: float) -> str:
    """A time as a person reads it: seconds under 90 s, else minutes to a tenth. Rounded up, so that an estimate
    over a limit never reads as the limit itself (327 s against 5 min read "about 5 min")."""
    return f"{math.ceil(seconds / 6) / 10:g} min" if seconds >= 90 else f"{math.ceil(seconds)} s"
