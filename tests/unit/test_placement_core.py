"""The placement core: what it feeds the pure policy (capacity, sizes, holds, TP limits) and the plan it makes
(pins, prewarming off, idle-first, no workers), on hand-built cluster views."""

from services.placement.core import PlacementCore, PlacementCoreConfig
from shared.messages import CopyState, ForecastPoint, OperatorHold, PlacementPlan, PlannedCopy
from shared.policy.prewarm_placement import PlacementConfig
from tests.factories import GB, copy, forecast, model, view, worker


def test_gpu_capacity_leaves_out_serving_instances_and_counts_reclaimable_kv_only_with_reservation():
    v = view(worker("w0", ("a", CopyState.ACTIVE, 2 * GB, 1), ("b", CopyState.PREWARMED, GB, 0), kv=3 * GB,
                    reclaimable=GB))
    assert PlacementCore(PlacementCoreConfig(kv_reservation=True)).gpus(v)[0].capacity_bytes == 10 * GB - 5 * GB + GB
    assert PlacementCore(PlacementCoreConfig(kv_reservation=False)).gpus(v)[0].capacity_bytes == 5 * GB


def test_inputs_drop_drained_workers_skip_multi_device_models_and_use_measured_sizes():
    v = view(worker("w0", ("a", CopyState.PREWARMED, 3 * GB, 0)), worker("w1"), worker("w2", node="n1"))
    catalog = {"a": model("a", size=GB), "big": model("big", tp=2), "c": model("c")}
    holds = [OperatorHold(kind="drain", target="w1"), OperatorHold(kind="pin", target="c", copies=2)]
    core = PlacementCore()
    core.adopt(PlacementPlan(created_at_s=0, copies=[PlannedCopy(model="c", worker_id="w2"),
                                                     PlannedCopy(model="c", worker_id="gone")]))
    inputs = core.inputs(v, catalog, {"a": forecast("a", 3.0, 9.0)}, holds)
    assert [(g.gpu_id, g.node, g.index) for g in inputs.gpus] == [("w0", "n0", 0), ("w2", "n1", 0)]
    demands = {d.model: d for d in inputs.demands}
    assert set(demands) == {"a", "c"} and "tensor parallel size 2" in inputs.skipped["big"]
    assert demands["a"].weight_bytes == 3 * GB  # what the worker measured, not the catalog's 1 GiB
    assert demands["c"].weight_bytes == GB + 2 * GB  # not loaded yet: its size plus the overhead measured for a
    assert (demands["a"].avg, demands["a"].peak, demands["c"].pinned) == (3.0, 9.0, 2)
    # resident copies and planned copies on live workers are what exists; the dead worker's is dropped
    assert sorted((r.model, r.gpus) for r in inputs.existing) == [("a", ("w0",)), ("c", ("w2",))]


def test_the_peak_option_chooses_the_upper_quantile_or_the_point_forecast():
    catalog, fc = {"a": model("a")}, {"a": forecast("a", 3.0, 9.0, upper=20.0)}
    upper = PlacementCore().inputs(view(worker("w0")), catalog, fc, [])
    point = PlacementCore(PlacementCoreConfig(peak="point")).inputs(view(worker("w0")), catalog, fc, [])
    assert (upper.demands[0].peak, point.demands[0].peak) == (20.0, 9.0)


def test_burst_replicas_cover_the_forecast_windows_from_now_until_a_copy_planned_now_is_ready():
    fc = forecast("a", 3.0, 9.0, upper=10.0).model_copy(update={"points": [
        ForecastPoint(window_start_s=300.0 * i, avg=3.0, avg_upper=4.0, peak=p, peak_upper=u)
        for i, (p, u) in enumerate(((9.0, 10.0), (40.0, 50.0), (80.0, 90.0)))]})
    catalog, v = {"a": model("a", size=GB)}, view(worker("w0"))

    def peak(now_s: float, start_s: float = 20.0, peak: str = "upper") -> float:
        core = PlacementCore(PlacementCoreConfig(copy_start_s=start_s, peak=peak))
        return core.inputs(v, catalog, {"a": fc}, [], now_s=now_s).demands[0].peak

    ready = PlacementCoreConfig().copy_ready_s(catalog["a"].parameter_bytes)
    assert 20.0 < ready < 21.0  # engine start plus 1 GiB at 2 GB/s
    assert peak(100.0) == 10.0  # ready well inside the running window: lead 1
    assert peak(290.0) == 50.0  # ready in the next window: the larger of lead 1 and lead 2
    assert peak(290.0, peak="point") == 40.0
    assert peak(250.0, start_s=400.0) == 90.0  # a slow engine start reaches lead 3
    assert peak(2000.0) == 90.0  # past the horizon: its last window
    assert PlacementCore().inputs(v, catalog, {"a": fc}, []).demands[0].peak == 10.0  # no clock: the first window


def test_a_forecast_rise_puts_copies_in_the_plan_and_a_pin_keeps_one_without_forecast():
    catalog = {"hot": model("hot"), "cold": model("cold"), "kept": model("kept")}
    p = PlacementCore().plan(view(worker("w0"), worker("w1")), catalog, {"hot": forecast("hot", 40.0, 90.0)},
                             [OperatorHold(kind="pin", target="kept")], now_s=1.0)
    planned = sorted((c.model, c.worker_id) for c in p.copies)
    assert [m for m, _ in planned].count("hot") == 2  # one per worker: never two copies of a model on one GPU
    assert ("kept", "w0") in planned or ("kept", "w1") in planned
    assert "cold" not in {m for m, _ in planned}
    assert p.inputs["scores"][f"kept@{next(w for m, w in planned if m == 'kept')}"] == "pinned"
    assert p.inputs["demand"]["hot"]["peak_upper"] == 90.0


def test_prewarming_off_plans_only_pins_and_drops_copies_left_by_stopped_instances():
    v = view(worker("w0", ("left", CopyState.PREWARMED, GB, 0)), worker("w1", ("busy", CopyState.ACTIVE, GB, 3)))
    catalog = {"left": model("left"), "busy": model("busy"), "kept": model("kept")}
    forecasts = {m: forecast(m, 40.0, 90.0) for m in catalog}
    holds = [OperatorHold(kind="pin", target="kept")]
    on = PlacementCore().plan(v, catalog, forecasts, holds, now_s=1.0)
    off = PlacementCore(PlacementCoreConfig(prewarm=False)).plan(v, catalog, forecasts, holds, now_s=1.0)
    assert {"left", "busy"} <= {c.model for c in on.copies}  # the forecasts ask for copies
    assert [c.model for c in off.copies] == ["kept"]  # no forecast-driven copy, the left-over one evicted
    assert off.inputs["prewarm"] is False and off.inputs["demand"]["left"]["peak_upper"] == 0.0


def test_idle_first_puts_a_model_on_an_idle_worker_before_a_serving_one():
    """A serving worker lends 6 GiB of KV, an idle one has 2 GiB: one pass puts the copy where the most room
    is (the serving worker, where it cannot become an instance until that one stops); idle-first does not."""
    v = view(worker("busy", ("x", CopyState.ACTIVE, 2 * GB, 1), kv=7 * GB, reclaimable=6 * GB, budget=10 * GB),
             worker("idle", budget=2 * GB))
    catalog = {"x": model("x", size=2 * GB), "a": model("a", size=GB)}
    fc = {"a": forecast("a", 1.0, 2.0)}
    one_pass = PlacementCore(PlacementCoreConfig(idle_first=False)).plan(v, catalog, fc, [], now_s=1.0)
    idle_first = PlacementCore(PlacementCoreConfig(idle_first=True)).plan(v, catalog, fc, [], now_s=1.0)
    assert [(c.model, c.worker_id) for c in one_pass.copies] == [("a", "busy")]
    assert [(c.model, c.worker_id) for c in idle_first.copies] == [("a", "idle")]
    assert idle_first.inputs["idle_first"] is True


def test_a_worker_whose_instance_the_forecast_will_stop_counts_as_idle_for_copies():
    """No worker is idle. x runs two instances but its forecast needs one: the least busy (on x2) will stop,
    so a's copy goes there, where it can become an instance soon; without the rule it goes to the first
    serving worker in order (x1, whose instance stays)."""
    v = view(worker("x1", copy("x", CopyState.ACTIVE, 2 * GB, 3, worker_id="x1"), kv=4 * GB, reclaimable=3 * GB,
                    budget=10 * GB),
             worker("x2", copy("x", CopyState.ACTIVE, 2 * GB, 0, worker_id="x2"), kv=4 * GB, reclaimable=3 * GB,
                    budget=10 * GB),
             worker("y", copy("y", CopyState.ACTIVE, 2 * GB, 1, worker_id="y"), kv=4 * GB, reclaimable=3 * GB,
                    budget=10 * GB))
    catalog = {"x": model("x", size=2 * GB), "y": model("y", size=2 * GB), "a": model("a", size=GB)}
    fc = {"a": forecast("a", 1.0, 2.0), "x": forecast("x", 1.0, 1.0), "y": forecast("y", 1.0, 1.0)}
    on = PlacementCore(PlacementCoreConfig(idle_first=True, forecast_freed_first=True)).plan(v, catalog, fc, [],
                                                                                             now_s=1.0)
    off = PlacementCore(PlacementCoreConfig(idle_first=True)).plan(v, catalog, fc, [], now_s=1.0)  # the default
    assert [(c.model, c.worker_id) for c in on.copies] == [("a", "x2")]
    assert [(c.model, c.worker_id) for c in off.copies] == [("a", "x1")]
    # with no forecast for x, nothing says x2 will stop
    unknown = PlacementCore(PlacementCoreConfig(idle_first=True, forecast_freed_first=True)).plan(
        v, catalog, {"a": fc["a"]}, [], now_s=1.0)
    assert [(c.model, c.worker_id) for c in unknown.copies] == [("a", "x1")]


def test_multi_device_models_are_planned_as_groups_when_workers_can_run_them():
    v = view(*(worker(f"g{i}", budget=10 * GB) for i in range(4)))
    core = PlacementCore(PlacementCoreConfig(max_tp=4, placement=PlacementConfig(batch_capacity=4)))
    p = core.plan(v, {"big": model("big", size=8 * GB, tp=2)}, {"big": forecast("big", 4.0, 8.0)}, [], now_s=1.0)
    groups = sorted(tuple(c.devices) for c in p.copies)
    assert groups == [("g0", "g1"), ("g2", "g3")]  # two replicas, each on a nested pair of devices


def test_with_no_live_worker_the_current_plan_is_kept_and_placement_resumes_where_it_was():
    catalog = {"a": model("a"), "b": model("b")}
    pins = [OperatorHold(kind="pin", target="a"), OperatorHold(kind="pin", target="b")]
    core = PlacementCore()
    current = core.plan(view(worker("w0"), worker("w1")), catalog, {}, pins, now_s=1.0)
    assert len(current.copies) == 2 and core.changed(current)
    core.adopt(current)
    during = core.plan(view(), catalog, {}, pins, now_s=2.0)  # nobody reports
    assert during is current
    # the workers are back, one copy loaded already: nothing moves
    first = current.copies[0]
    back = [worker(w, *([(first.model, CopyState.PREWARMED, GB, 0)] if w == first.worker_id else []))
            for w in ("w0", "w1")]
    after = core.plan(view(*back), catalog, {}, pins, now_s=3.0)
    assert after.same_copies(current) and not core.changed(after)
