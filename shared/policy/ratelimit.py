"""A token bucket per API key: ``rate`` requests per second on average, bursts up to ``burst``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    last_s: float = 0.0

    def take(self, now_s: float) -> float:
        """0.0 if the request may go now, else the seconds until it may."""
        if self.tokens < 0:  # first use: a full bucket
            self.tokens, self.last_s = self.burst, now_s
        self.tokens = min(self.burst, self.tokens + (now_s - self.last_s) * self.rate)
        self.last_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else float("inf")
