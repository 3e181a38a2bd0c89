"""History writes waiting for Postgres (observed windows and forecasts), bounded while it is away."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from shared.messages import Forecast
from shared.policy.forecast import WindowObservation

MAX_OUTBOX = 200_000  # pending rows kept while Postgres is away (about a day of 256 models)


@dataclass
class Outbox:
    """History writes waiting for Postgres: observed windows per model and forecasts."""

    observations: dict[str, list[WindowObservation]]
    forecasts: list[Forecast]
    dropped: int = 0

    @classmethod
    def empty(cls) -> Outbox:
        return cls(defaultdict(list), [])

    def __len__(self) -> int:
        return sum(len(v) for v in self.observations.values()) + len(self.forecasts)

    def bound(self) -> None:
        while len(self) > MAX_OUTBOX and self.forecasts:  # forecasts are the cheaper loss
            self.forecasts.pop(0)
            self.dropped += 1
