"""How long a run takes on this server: a step costs a fixed time plus a time per pixel it optimizes.

Both parts are measured from a run's own pictures (`StepTimer`); the job clock (`guard.JobClock`) keeps the
latest run's, and the next run's time left starts from it (`TimeLeft`). One number per pixel instead would price
a 512 px step from a 128 px one, whose time is mostly the fixed part: estimates 2 to 5 times off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PRIOR_STEPS = 10  # how many of a run's steps the server's speed from the runs before counts for


@dataclass(frozen=True)
class StepSpeed:
    fixed: float  # seconds a step costs whatever its size
    per_pixel: float  # seconds a step costs per pixel it optimizes

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
    size: tuple[int, int]
    elapsed: float


class RunFrame(RunPoint, Protocol):
    """A page's Frame: where a run stands, and what it has to do."""

    total: int  # steps
    scales: int
    done: float  # the share of its work done
    work: int  # pixel-steps (engine.job_work)


class StepTimer:
    """Seconds per step at each scale of a run, each measured from the scale's first picture on: the scale's set-up
    (and the run's start-up) come before it and are not a step's cost."""

    def __init__(self) -> None:
        self.first: RunPoint | None = None  # the current scale's first picture
        self.measured: dict[int, tuple[int, float, int]] = {}  # per scale: (pixels, seconds per step, steps timed)

    def add(self, point: RunPoint) -> None:
        if self.first is None or point.scale != self.first.scale:
            self.first = point
        elif point.step > self.first.step:
            steps = point.step - self.first.step
            seconds = (point.elapsed - self.first.elapsed) / steps
            self.measured[point.scale] = (point.size[0] * point.size[1], seconds, steps)

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
        steps_left, pixel_steps_left = frame.total - frame.step, (1 - frame.done) * frame.work
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
