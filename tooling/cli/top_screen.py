"""What ``warmserve top`` draws: a cluster snapshot, the view and sort the user chose, and a terminal size in;
the screen's lines out. Pure (no curses, no NATS, no clock), so every layout, sort and key is unit-tested.

The ``Snapshot`` is what the reader (``top_feed``) last saw; ``Ui`` is what the user pressed; ``render``
always returns at most ``height`` lines of at most ``width`` characters, ASCII only, whatever the size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from shared.messages import CopyState, DemandSample, Forecast, WorkerState

RATE_WINDOW_S = 60.0  # the arrival rate is the last minute's
VIEWS = ("workers", "models")
SORTS = {"workers": ("name", "memory", "in-flight", "heartbeat"),
         "models": ("name", "rate", "in-flight", "queued", "forecast")}
FOOTER = "q quit  w workers  m models  Tab switch view  s sort"
BAR_CELLS = 10  # memory bar: '#' weights, '=' KV cache, '.' free


@dataclass(frozen=True)
class Snapshot:
    """Everything one screen shows, as the reader last saw it. ``queued`` is None when the gateway's /metrics
    could not be read (shown as ``-``, not as 0)."""

    cluster: str  # the NATS URL without credentials
    now: float
    workers: dict[str, WorkerState] = field(default_factory=dict)
    heartbeat_age_s: dict[str, float] = field(default_factory=dict)  # on the reader's clock (KvMirror.seen_at)
    demand: list[DemandSample] = field(default_factory=list)  # the last minute's samples, every gateway's
    forecasts: dict[str, Forecast] = field(default_factory=dict)  # model -> its latest forecast
    queued: dict[str, float] | None = None  # model -> requests waiting for an instance (gateway /metrics)
    errors: tuple[str, ...] = ()  # NATS unreachable, gateway unreachable: one line each, on screen
    refreshed_at: float | None = None  # when the reader last had NATS data (None: never)


@dataclass(frozen=True)
class Ui:
    """The user's choices: the view, each view's sort column (an index into ``SORTS[view]``), and quitting."""

    view: str = "workers"
    sort: tuple[int, int] = (0, 0)  # per view, in VIEWS order
    quit: bool = False

    @property
    def sort_name(self) -> str:
        return SORTS[self.view][self.sort[VIEWS.index(self.view)]]


def press(ui: Ui, key: str) -> Ui:
    """The Ui after a key (``"\\t"`` for Tab); unknown keys change nothing."""
    if key in ("q", "Q"):
        return replace(ui, quit=True)
    if key in ("w", "W"):
        return replace(ui, view="workers")
    if key in ("m", "M"):
        return replace(ui, view="models")
    if key == "\t":
        return replace(ui, view=VIEWS[(VIEWS.index(ui.view) + 1) % len(VIEWS)])
    if key in ("s", "S"):
        i = VIEWS.index(ui.view)
        sort = list(ui.sort)
        sort[i] = (sort[i] + 1) % len(SORTS[ui.view])
        return replace(ui, sort=(sort[0], sort[1]))
    return ui


# ---------------------------------------------------------------- figures


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_bar(w: WorkerState, cells: int = BAR_CELLS) -> str:
    """``[##==......]``: weights, KV cache and free as shares of the budget (rounded, never over ``cells``)."""
    budget = max(w.memory_budget_bytes, 1)
    weights = min(cells, round(cells * w.weight_bytes / budget))
    kv = min(cells - weights, round(cells * w.kv_bytes / budget))
    return "[" + "#" * weights + "=" * kv + "." * (cells - weights - kv) + "]"


def copies_by_state(w: WorkerState) -> str:
    """``active 1, prewarmed 2``: the worker's copies counted by state, in lifecycle order."""
    order = [CopyState.ACTIVE, CopyState.PREWARMED, CopyState.LOADING, CopyState.DRAINING, CopyState.ABSENT]
    counts = {s: sum(c.state == s for c in w.copies) for s in order}
    return ", ".join(f"{s.value} {n}" for s, n in counts.items() if n) or "none"


@dataclass(frozen=True)
class ModelRow:
    model: str
    instances: int  # active copies
    prewarmed: int
    in_flight: int  # requests the workers are serving for it
    queued: float | None  # waiting at the gateway (None: unknown)
    rate_rps: float  # arrivals per second over the last minute
    forecast: Forecast | None


def arrival_rate(samples: list[DemandSample], model: str, now: float, window_s: float = RATE_WINDOW_S) -> float:
    """Arrivals per second of ``model`` over the last ``window_s``: samples whose interval ended in it
    (samples are about a second long, so the edge costs at most one sample)."""
    arrivals = sum(s.arrivals for s in samples if s.model == model and now - window_s < s.start_s + s.interval_s)
    return arrivals / window_s


def model_rows(snap: Snapshot) -> list[ModelRow]:
    """One row per model that any source mentions (a copy, demand, a forecast, the gateway's queue)."""
    models = ({c.model for w in snap.workers.values() for c in w.copies} | {s.model for s in snap.demand}
              | set(snap.forecasts) | set(snap.queued or {}))
    rows = []
    for model in models:
        copies = [c for w in snap.workers.values() for c in w.copies if c.model == model]
        rows.append(ModelRow(
            model=model, instances=sum(c.state == CopyState.ACTIVE for c in copies),
            prewarmed=sum(c.state == CopyState.PREWARMED for c in copies),
            in_flight=sum(c.in_flight for c in copies),
            queued=None if snap.queued is None else snap.queued.get(model, 0.0),
            rate_rps=arrival_rate(snap.demand, model, snap.now), forecast=snap.forecasts.get(model)))
    return rows


# ---------------------------------------------------------------- sorting


def _used(w: WorkerState) -> int:
    return w.weight_bytes + w.kv_bytes


WORKER_KEYS: dict[str, Callable[[WorkerState, Snapshot], object]] = {
    "name": lambda w, s: w.worker_id,
    "memory": lambda w, s: -_used(w),
    "in-flight": lambda w, s: -w.in_flight,
    "heartbeat": lambda w, s: -s.heartbeat_age_s.get(w.worker_id, 0.0),  # the stalest first
}
MODEL_KEYS: dict[str, Callable[[ModelRow], object]] = {
    "name": lambda r: r.model,
    "rate": lambda r: -r.rate_rps,
    "in-flight": lambda r: -r.in_flight,
    "queued": lambda r: -(r.queued or 0.0),
    "forecast": lambda r: -(r.forecast.predicted_peak_upper if r.forecast else -1.0),
}


def sorted_workers(snap: Snapshot, by: str) -> list[WorkerState]:
    """Workers by ``by`` (largest first, except names), ties by name so the order never flickers."""
    return sorted(snap.workers.values(), key=lambda w: (WORKER_KEYS[by](w, snap), w.worker_id))


def sorted_models(rows: list[ModelRow], by: str) -> list[ModelRow]:
    return sorted(rows, key=lambda r: (MODEL_KEYS[by](r), r.model))


# ---------------------------------------------------------------- lines

WORKER_HEAD = (f"{'WORKER':<14} {'DEVICE':<8} {'WEIGHTS':>9} {'KV':>9} {'FREE':>9} {'BUDGET':>9} "
               f"{'MEMORY':<{BAR_CELLS + 2}} {'IN-FL':>5} {'HB':>6}  COPIES")
MODEL_HEAD = (f"{'MODEL':<24} {'INST':>4} {'PREW':>4} {'IN-FL':>5} {'QUEUED':>6} {'RATE/s':>7} "
              f"{'FC PEAK':>7} {'UPPER':>7}  METHOD")


def worker_lines(snap: Snapshot, by: str) -> list[str]:
    """A line per worker, then a line per copy under it (its state, size, instance and requests)."""
    out = []
    for w in sorted_workers(snap, by):
        age = snap.heartbeat_age_s.get(w.worker_id)
        out.append(f"{w.worker_id:<14} {w.device:<8} {fmt_bytes(w.weight_bytes):>9} {fmt_bytes(w.kv_bytes):>9} "
                   f"{fmt_bytes(w.free_bytes):>9} {fmt_bytes(w.memory_budget_bytes):>9} {memory_bar(w)} "
                   f"{w.in_flight:>5} {'-' if age is None else f'{age:.1f}s':>6}  {copies_by_state(w)}")
        for c in sorted(w.copies, key=lambda c: (c.state != CopyState.ACTIVE, c.model)):
            inst = f"in-flight {c.in_flight}  instance {c.instance_id}" if c.instance_id else ""
            out.append(f"  - {c.model:<24} {c.state.value:<10} {fmt_bytes(c.weight_bytes):>9}  {inst}".rstrip())
    return out or ["no workers in the workers bucket (yet)"]


def model_lines(snap: Snapshot, by: str) -> list[str]:
    out = []
    for r in sorted_models(model_rows(snap), by):
        fc = r.forecast
        queued = "-" if r.queued is None else f"{r.queued:.0f}"
        point, upper = (f"{fc.predicted_peak:.2f}", f"{fc.predicted_peak_upper:.2f}") if fc else ("-", "-")
        out.append(f"{r.model:<24} {r.instances:>4} {r.prewarmed:>4} {r.in_flight:>5} {queued:>6} "
                   f"{r.rate_rps:>7.2f} {point:>7} {upper:>7}  {fc.method if fc else '-'}")
    return out or ["no models: no copies, demand or forecasts seen (yet)"]


def header(snap: Snapshot, ui: Ui) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(snap.refreshed_at)) if snap.refreshed_at else "never"
    return f"warmserve top | view: {ui.view} | sort: {ui.sort_name} | cluster {snap.cluster} | refreshed {when}"


def render(snap: Snapshot, ui: Ui, width: int, height: int) -> list[str]:
    """The screen: header, error lines, the view's column titles and rows, footer. Rows that do not fit
    are replaced by a last line saying how many are hidden; every line is cut to ``width``."""
    if width <= 0 or height <= 0:
        return []
    top = [header(snap, ui), *(f"! {e}" for e in snap.errors)]
    if ui.view == "workers":
        title, rows = WORKER_HEAD, worker_lines(snap, ui.sort_name)
    else:
        title, rows = MODEL_HEAD, model_lines(snap, ui.sort_name)
    bottom = [FOOTER] if height > 1 else []
    room = height - len(bottom)
    lines = (top + [title])[:room]
    room -= len(lines)
    if len(rows) > room > 0:
        rows = rows[:room - 1] + [f"... {len(rows) - room + 1} more lines (enlarge the terminal)"]
    lines += rows[:max(room, 0)]
    lines += [""] * (height - len(bottom) - len(lines))  # the footer stays on the last line
    return [line[:width] for line in lines + bottom]
