"""``warmserve top``'s screen builder: hand-made snapshots in, lines out (views, sorts, keys, sizes)."""

import re

import pytest

from shared.messages import CopyState, DemandSample, Forecast, ModelCopy, WorkerState
from tooling.cli.top_feed import parse_queued
from tooling.cli.top_screen import (
    FOOTER, SORTS, Snapshot, Ui, arrival_rate, memory_bar, model_rows, press, render,
)

MiB, GiB = 2**20, 2**30
NOW = 1_700_000_000.0


def worker(wid: str, weights: int, kv: int, in_flight: int = 0, copies=()) -> WorkerState:
    return WorkerState(worker_id=wid, node="n1", device="cpu", engine="sim", memory_budget_bytes=4 * GiB,
                       weight_bytes=weights, kv_bytes=kv, in_flight=in_flight, copies=list(copies))


def copy(model: str, state: CopyState, in_flight: int = 0) -> ModelCopy:
    return ModelCopy(model=model, state=state, weight_bytes=100 * MiB, in_flight=in_flight,
                     instance_id="abcdef0123456789" if state == CopyState.ACTIVE else None)


def sample(model: str, arrivals: int, ago_s: float, gateway: str = "gw-1") -> DemandSample:
    return DemandSample(gateway_id=gateway, model=model, start_s=NOW - ago_s, interval_s=1.0, arrivals=arrivals,
                        completions=arrivals, concurrency_avg=1.0, concurrency_peak=2)


def forecast(model: str, peak: float, upper: float) -> Forecast:
    return Forecast(model=model, window_start_s=NOW, window_s=300, predicted_avg=peak / 2, predicted_peak=peak,
                    predicted_peak_upper=upper, method="ets", made_at_s=NOW)


@pytest.fixture
def snap() -> Snapshot:
    return Snapshot(
        cluster="nats://10.0.0.1:4222", now=NOW, refreshed_at=NOW,
        workers={
            "worker-a": worker("worker-a", 1 * GiB, 256 * MiB, in_flight=1,
                               copies=[copy("llama", CopyState.ACTIVE, 1), copy("qwen", CopyState.PREWARMED)]),
            "worker-b": worker("worker-b", 3 * GiB, 512 * MiB, in_flight=7,
                               copies=[copy("qwen", CopyState.ACTIVE, 7)]),
        },
        heartbeat_age_s={"worker-a": 0.4, "worker-b": 2.5},
        demand=[sample("llama", 30, 10), sample("llama", 30, 20, gateway="gw-2"), sample("qwen", 6, 5),
                sample("qwen", 600, 300)],  # the last one is older than a minute: not in the rate
        forecasts={"llama": forecast("llama", 1.5, 2.25), "mistral": forecast("mistral", 9.0, 12.0)},
        queued={"llama": 3.0},
    )


def body(lines: list[str]) -> list[str]:
    """The data rows: between the column titles (after the header) and the footer."""
    return lines[2:-1]


def names_in(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in body(lines) if line.strip() and not line.startswith("  ")]


def test_workers_view_shows_memory_by_role_copies_and_heartbeat(snap):
    lines = render(snap, Ui(), 200, 30)
    assert lines[0].startswith("warmserve top | view: workers | sort: name | cluster nats://10.0.0.1:4222")
    assert lines[-1] == FOOTER
    [b] = [line for line in lines if line.startswith("worker-b")]
    assert re.search(r"3\.0 GiB\s+512 MiB\s+512 MiB\s+4\.0 GiB \[########=\.\]\s+7\s+2\.5s\s+active 1$", b), b
    [a] = [line for line in lines if line.startswith("worker-a")]
    assert a.endswith("active 1, prewarmed 1")
    copies = [line.split() for line in lines if line.startswith("  - ")]
    assert ["-", "llama", "active", "100", "MiB", "in-flight", "1", "instance", "abcdef0123456789"] in copies
    assert ["-", "qwen", "prewarmed", "100", "MiB"] in copies


def test_sorting_switches_the_order_of_workers(snap):
    ui = Ui()
    assert names_in(render(snap, ui, 200, 30)) == ["worker-a", "worker-b"]  # by name
    ui = press(ui, "s")
    assert ui.sort_name == "memory" and "sort: memory" in render(snap, ui, 200, 30)[0]
    assert names_in(render(snap, ui, 200, 30)) == ["worker-b", "worker-a"]  # most memory used first
    ui = press(press(press(ui, "s"), "s"), "s")  # in-flight, heartbeat, back to name
    assert ui.sort_name == "name" and names_in(render(snap, ui, 200, 30)) == ["worker-a", "worker-b"]


def test_models_view_has_every_models_rate_forecast_and_queue(snap):
    ui = press(Ui(), "m")
    lines = render(snap, ui, 200, 30)
    assert "view: models" in lines[0]
    rows = {line.split()[0]: line.split() for line in body(lines) if line}
    # model, instances, prewarmed, in flight, queued, rate/s (last minute), forecast peak, upper, method
    assert rows["llama"] == ["llama", "1", "0", "1", "3", "1.00", "1.50", "2.25", "ets"]
    assert rows["qwen"] == ["qwen", "1", "1", "7", "0", "0.10", "-", "-", "-"]
    assert rows["mistral"] == ["mistral", "0", "0", "0", "0", "0.00", "9.00", "12.00", "ets"]
    assert names_in(lines) == ["llama", "mistral", "qwen"]
    assert names_in(render(snap, press(ui, "s"), 200, 30)) == ["llama", "qwen", "mistral"]  # by rate
    in_flight = press(press(ui, "s"), "s")
    assert in_flight.sort_name == "in-flight" and names_in(render(snap, in_flight, 200, 30))[0] == "qwen"
    forecast_sort = press(press(in_flight, "s"), "s")
    assert forecast_sort.sort_name == "forecast" and names_in(render(snap, forecast_sort, 200, 30))[0] == "mistral"


def test_unknown_queue_is_a_dash_not_zero(snap):
    rows = model_rows(Snapshot(cluster="x", now=NOW, demand=snap.demand, queued=None))
    assert {r.model: r.queued for r in rows} == {"llama": None, "qwen": None}
    line = next(li for li in render(Snapshot(cluster="x", now=NOW, demand=snap.demand), press(Ui(), "m"), 200, 10)
                if li.startswith("llama"))
    assert line.split()[4] == "-"


def test_keys_switch_views_and_keep_each_views_sort():
    ui = press(Ui(), "s")  # workers by memory
    ui = press(ui, "\t")
    assert ui.view == "models" and ui.sort_name == "name"
    ui = press(press(ui, "s"), "w")
    assert ui.view == "workers" and ui.sort_name == "memory"
    assert press(ui, "m").sort_name == "rate"
    assert press(ui, "x") == ui and not ui.quit
    assert press(ui, "q").quit
    assert [press(Ui(view=v), "s").sort_name for v in SORTS] == [SORTS[v][1] for v in SORTS]


def test_errors_are_on_screen_and_empty_clusters_say_so():
    snap = Snapshot(cluster="nats://h:4222", now=NOW, errors=("NATS unreachable: refused; retrying every 2 s",))
    lines = render(snap, Ui(), 100, 10)
    assert "refreshed never" in lines[0]
    assert lines[1] == "! NATS unreachable: refused; retrying every 2 s"
    assert any("no workers" in line for line in lines)
    assert any("no models" in line for line in render(snap, press(Ui(), "m"), 100, 10))


def test_lines_are_cut_to_the_width_and_the_footer_stays_last(snap):
    lines = render(snap, Ui(), 40, 12)
    assert len(lines) == 12 and all(len(line) <= 40 for line in lines)
    assert lines[-1] == FOOTER[:40]
    assert lines[0] == "warmserve top | view: workers | sort: na"


def test_rows_that_do_not_fit_are_counted(snap):
    lines = render(snap, Ui(), 200, 6)  # header, titles, 3 rows, footer; the workers view has 5 rows
    assert len(lines) == 6
    assert lines[4] == "... 3 more lines (enlarge the terminal)"
    assert lines[2].startswith("worker-a")


@pytest.mark.parametrize("width", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("height", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("view", ["workers", "models"])
def test_tiny_terminals_never_crash_or_overflow(snap, width, height, view):
    lines = render(snap, Ui(view=view), width, height)
    assert len(lines) == (height if width > 0 else 0)
    assert all(len(line) <= width for line in lines)
    if height == 1 and width > 0:
        assert lines[0] == render(snap, Ui(view=view), 200, 5)[0][:width]  # the header, cut


def test_memory_bar_never_exceeds_its_cells():
    full = worker("w", 3 * GiB, 3 * GiB)  # over budget: weights fill the bar, no room for KV
    assert memory_bar(full) == "[" + "#" * 8 + "=" * 2 + "]"
    assert memory_bar(worker("w", 0, 0)) == "[..........]"


def test_arrival_rate_counts_the_last_minute_only():
    samples = [sample("m", 12, 0.5), sample("m", 6, 59.5), sample("m", 100, 61.5), sample("other", 50, 1)]
    assert arrival_rate(samples, "m", NOW) == pytest.approx(18 / 60)


def test_the_gateway_queue_gauge_is_read_per_model():
    text = ("# TYPE warmserve:num_requests_waiting gauge\n"
            'warmserve:num_requests_waiting{model="a"} 2.0\n'
            'warmserve:num_requests_waiting{model="b"} 4.0\n'
            "# TYPE warmserve:num_requests_running gauge\n"
            'warmserve:num_requests_running{model="a"} 5.0\n'
            "# TYPE other gauge\n"
            'other{model="a"} 99.0\n')
    assert parse_queued(text) == {"a": 2.0, "b": 4.0}  # in-flight and other gauges are not queues
