"""The worker TTFT benchmark's bookkeeping: no measured request follows an aborted one, and each figure
comes with its 95% interval."""

import asyncio

import pytest

from loadtest.worker_ttft import first_token, summary
from services.gpu_worker.engines import Delta


class FakeWorker:
    """Streams three deltas; records whether each request was read to its end or abandoned."""

    def __init__(self):
        self.in_flight = 0
        self.ends: list[str] = []

    async def generate(self, request):
        self.in_flight += 1
        try:
            for i, text in enumerate(("a", "b", "c")):
                yield Delta(text, "length" if i == 2 else None, 3, i + 1)
            self.ends.append("finished")
        except GeneratorExit:
            self.ends.append("aborted")
            raise
        finally:
            self.in_flight -= 1


def test_the_first_token_is_timed_and_the_request_read_to_its_end():
    w = FakeWorker()
    at = asyncio.run(first_token(w, "m"))
    assert at > 0 and w.ends == ["finished"] and w.in_flight == 0  # the next run starts on an idle engine


def test_each_figure_has_a_mean_and_a_95_percent_interval():
    s = summary([0.010, 0.012, 0.011, 0.013, 0.009])
    assert s["n"] == 5 and s["mean_ms"] == pytest.approx(11.0)
    assert s["ci95_half_ms"] == pytest.approx(2.776 * 1.5811 / 5 ** 0.5, rel=1e-3)  # t(0.975, 4) x sd / sqrt(n)
    assert summary([0.5])["ci95_half_ms"] is None
