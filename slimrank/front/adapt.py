"""The adaptive front's rate controller (pure): each interval, from what the front and the
server did with the calls, the rate the front admits next.

A static rate is right for one machine speed only: set to what the server holds in a slow
hour, it refuses calls a faster hour could answer. The controller follows the server instead:

- **the server refused calls the front let through** (at least ``server_refusal_floor`` of
  the forwarded calls, and at least 5: the few calls of a burst the server sheds at a load
  it holds are not overload): the server cannot take this rate now. The rate drops to what
  the server answered in that interval, times ``margin``, and at least by ``decrease``;
- **the front refused calls and the server refused none**: the front may be holding back
  calls the server could answer. The rate rises by ``increase`` (at least 1 call/s);
- otherwise it stays.

The rate stays within ``[min_rate, max_rate]`` and is a whole number of calls a second (what
nginx reads). Refusals by the server come back after its wait bound (about 5 ms), the
front's within a millisecond, so the controller keeps most refusals in the front while the
rate tracks what the server answers.
"""

from __future__ import annotations

import dataclasses
import math

from slimrank.config import Config, require


@dataclasses.dataclass(frozen=True)
class AdaptConfig(Config):
    """Bounds and steps of :func:`next_rate` (see the module docstring)."""

    min_rate: float
    max_rate: float
    interval_s: float = 1.0
    increase: float = 1.1
    decrease: float = 0.9
    margin: float = 0.95
    server_refusal_floor: float = 0.02

    def __post_init__(self) -> None:
        require(self.min_rate >= 1, self, "min_rate", self.min_rate, "must be >= 1 call/s")
        require(
            self.max_rate >= self.min_rate,
            self,
            "max_rate",
            self.max_rate,
            f"must be >= min_rate={self.min_rate:g}",
        )
        require(0.05 <= self.interval_s <= 60, self, "interval_s", self.interval_s, "in [0.05, 60]")
        require(1 < self.increase <= 2, self, "increase", self.increase, "must be in (1, 2]")
        require(0 < self.decrease < 1, self, "decrease", self.decrease, "must be in (0, 1)")
        require(0 < self.margin <= 1, self, "margin", self.margin, "must be in (0, 1]")
        require(
            0 <= self.server_refusal_floor < 1,
            self,
            "server_refusal_floor",
            self.server_refusal_floor,
            "must be in [0, 1)",
        )


@dataclasses.dataclass(frozen=True)
class Interval:
    """What happened to the Recommender calls through the front in one interval."""

    forwarded: int  # passed the front and answered by the server (any status but refusal)
    server_refused: int  # passed the front and refused by the server (RESOURCE_EXHAUSTED)
    front_refused: int  # refused by the front's rate limit


def next_rate(rate: float, seen: Interval, config: AdaptConfig) -> int:
    """Return the rate (whole calls a second) to admit after an interval like ``seen``."""
    passed = seen.forwarded + seen.server_refused
    if seen.server_refused >= max(5, config.server_refusal_floor * passed):
        answered_rate = seen.forwarded / config.interval_s
        new = min(rate * config.decrease, answered_rate * config.margin)
    elif seen.front_refused > 0 and seen.server_refused == 0:
        new = max(rate + 1, rate * config.increase)
    else:
        new = rate
    return int(min(config.max_rate, max(config.min_rate, math.floor(new))))
