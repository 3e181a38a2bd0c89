"""Placement's and the orchestrator's glue around the pure policies: what they feed them and what they do
with the answers (drained workers, pins, measured sizes, TP limits, autoscaler rounds, KV targets)."""

from services.placement.planner import gpu_of, plan, plan_inputs
from services.prewarm_orchestrator.autoscaler import AutoscalerState, GatewayLoad
from shared.messages import CopyState, Forecast, ModelCopy, ModelSpec, OperatorHold, PlacementPlan, PlannedCopy, WorkerState
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.prewarm_placement import PlacementConfig

GB = 2**30


def worker(wid, *copies, budget=10 * GB, kv=0, reclaimable=0, node="n0"):
    return WorkerState(worker_id=wid, node=node, device=f"cpu:{wid[-1]}", engine="sim", memory_budget_bytes=budget,
                       kv_bytes=kv, reclaimable_bytes=reclaimable, heartbeat_at_s=100.0, batch_capacity=4,
                       copies=[ModelCopy(model=m, state=s, weight_bytes=b, since_s=0.0, in_flight=f,
                                         instance_id=f"{wid}-{m}" if s is CopyState.ACTIVE else None,
                                         kv_total_blocks=100 if s is CopyState.ACTIVE else 0)
                               for m, s, b, f in copies])


def spec(slug, size=GB, tp=1):
    return ModelSpec(slug=slug, path=f"/m/{slug}", parameter_bytes=size, tensor_parallel_size=tp)


def forecast(model, avg, peak):
    return Forecast(model=model, window_start_s=0, window_s=300, predicted_avg=avg, predicted_peak=peak,
                    predicted_peak_upper=peak, method="naive", made_at_s=0)


def test_gpu_capacity_leaves_out_serving_instances_and_counts_reclaimable_kv_only_with_reservation():
    w = worker("w0", ("a", CopyState.ACTIVE, 2 * GB, 1), ("b", CopyState.PREWARMED, GB, 0), kv=3 * GB,
               reclaimable=GB)
    assert gpu_of(w, 0, kv_reservation=True).capacity_bytes == 10 * GB - 2 * GB - 3 * GB + GB
    assert gpu_of(w, 0, kv_reservation=False).capacity_bytes == 5 * GB


def test_inputs_drop_drained_workers_skip_multi_device_models_and_use_measured_sizes():
    ws = [worker("w0", ("a", CopyState.PREWARMED, 3 * GB, 0)), worker("w1"), worker("w2", node="n1")]
    catalog = {"a": spec("a", size=GB), "big": spec("big", tp=2), "c": spec("c")}
    holds = [OperatorHold(kind="drain", target="w1"), OperatorHold(kind="pin", target="c", copies=2)]
    current = PlacementPlan(created_at_s=0, copies=[PlannedCopy(model="c", worker_id="w2"),
                                                    PlannedCopy(model="c", worker_id="gone")])
    inputs = plan_inputs(catalog, ws, {"a": forecast("a", 3.0, 9.0)}, holds, current, kv_reservation=True)
    assert [(g.gpu_id, g.node, g.index) for g in inputs.gpus] == [("w0", "n0", 0), ("w2", "n1", 0)]
    demands = {d.model: d for d in inputs.demands}
    assert set(demands) == {"a", "c"} and "tensor parallel size 2" in inputs.skipped["big"]
    assert demands["a"].weight_bytes == 3 * GB  # what the worker measured, not the catalog's 1 GiB
    assert demands["c"].weight_bytes == GB + 2 * GB  # not loaded yet: its size plus the overhead measured for a
    assert (demands["a"].avg, demands["a"].peak, demands["c"].pinned) == (3.0, 9.0, 2)
    # resident copies and planned copies on live workers are what exists; the dead worker's is dropped
    assert sorted((r.model, r.gpus) for r in inputs.existing) == [("a", ("w0",)), ("c", ("w2",))]


def test_a_forecast_rise_puts_copies_in_the_plan_and_a_pin_keeps_one_without_forecast():
    ws = [worker("w0"), worker("w1")]
    catalog = {"hot": spec("hot"), "cold": spec("cold"), "kept": spec("kept")}
    p = plan(catalog, ws, {"hot": forecast("hot", 40.0, 90.0)}, [OperatorHold(kind="pin", target="kept")], None,
             PlacementConfig(), kv_reservation=True, now_s=1.0)
    planned = sorted((c.model, c.worker_id) for c in p.copies)
    assert [m for m, _ in planned].count("hot") == 2  # one per worker: never two copies of a model on one GPU
    assert ("kept", "w0") in planned or ("kept", "w1") in planned
    assert "cold" not in {m for m, _ in planned}
    assert p.inputs["scores"][f"kept@{next(w for m, w in planned if m == 'kept')}"] == "pinned"
    assert p.inputs["demand"]["hot"]["peak_upper"] == 90.0


def test_prewarming_off_plans_only_pins_and_drops_copies_left_by_stopped_instances():
    ws = [worker("w0", ("left", CopyState.PREWARMED, GB, 0)), worker("w1", ("busy", CopyState.ACTIVE, GB, 3))]
    catalog = {"left": spec("left"), "busy": spec("busy"), "kept": spec("kept")}
    forecasts = {m: forecast(m, 40.0, 90.0) for m in catalog}
    holds = [OperatorHold(kind="pin", target="kept")]
    on = plan(catalog, ws, forecasts, holds, None, PlacementConfig(), kv_reservation=True, now_s=1.0)
    off = plan(catalog, ws, forecasts, holds, None, PlacementConfig(), kv_reservation=True, now_s=1.0, prewarm=False)
    assert {"left", "busy"} <= {c.model for c in on.copies}  # the forecasts ask for copies
    assert [c.model for c in off.copies] == ["kept"]  # no forecast-driven copy, the left-over one evicted
    assert off.inputs["prewarm"] is False and off.inputs["demand"]["left"]["peak_upper"] == 0.0


def test_autoscaler_round_stops_idle_and_drained_instances_and_sets_kv_targets():
    state = AutoscalerState(AutoscaleConfig(batch_capacity=4, window_s=5.0, min_lifetime_s=5.0))
    ws = [worker("w0", ("a", CopyState.ACTIVE, GB, 0)), worker("w1", ("b", CopyState.ACTIVE, GB, 3))]
    first = state.step(ws, now_s=100.0, drained={"w1"})
    assert [(s.model, s.worker_id) for s in first.stops] == [("b", "w1")]  # drained: stop whatever the load
    assert [(t.model, t.free_blocks) for t in first.kv_targets] == [("a", 25)]  # ceil(100 x max(0,1) / 4)
    later = state.step(ws, now_s=106.0)  # a has been idle for the whole window
    assert ("a", "w0") in [(s.model, s.worker_id) for s in later.stops]
    assert "autoscaler" in later.stops[0].reason
    state.kv_unsupported.add("w0")
    assert state.step(ws, now_s=107.0).kv_targets == [t for t in state.step(ws, 107.5).kv_targets if t.worker_id != "w0"]


def test_autoscaler_adds_instances_above_the_threshold_but_leaves_busy_models_alone():
    state = AutoscalerState(AutoscaleConfig(batch_capacity=4))
    busy = [worker("w0", ("a", CopyState.ACTIVE, GB, 4))]
    assert state.step(busy, now_s=100.0).scale_up == {"a": 1}  # 4 > 0.8 x 4
    assert state.step(busy, now_s=101.0, busy_models={"a"}).scale_up == {}


def test_requests_waiting_at_gateways_count_as_load():
    """An instance full of long requests reports in_flight = B; the queue at the gateway is what tells the
    autoscaler it needs more, and it must not take the queue for idleness either."""
    state = AutoscalerState(AutoscaleConfig(batch_capacity=4, up=0.9))
    full = [worker("w0", ("a", CopyState.ACTIVE, GB, 3))]  # 3 of 4 in flight: within the band alone
    assert state.step(full, now_s=100.0).scale_up == {}
    gateways = GatewayLoad()
    gateways.add("a", "gw-1", at_s=100.5, concurrency=5.0)  # 3 in flight + 2 waiting at one gateway
    gateways.add("a", "gw-2", at_s=100.5, concurrency=4.0)
    assert gateways.current(101.0) == {"a": 9.0}
    state.step(full, now_s=101.0, gateway_load=gateways.current(101.0))
    gateways.add("a", "gw-1", at_s=102.5, concurrency=5.0)
    gateways.add("a", "gw-2", at_s=102.5, concurrency=4.0)
    # mean over what the window has seen: 3 for 1 s, then 9 for 2 s = 7 > 0.9 x 4 -> ceil(7 / 3.6) = 2 instances
    assert state.step(full, now_s=103.0, gateway_load=gateways.current(103.0)).scale_up == {"a": 1}
    assert gateways.current(110.0) == {}  # reports expire: a gateway that went away adds nothing


def test_with_no_live_worker_the_current_plan_is_kept_and_placement_resumes_where_it_was():
    catalog = {"a": spec("a"), "b": spec("b")}
    pins = [OperatorHold(kind="pin", target="a"), OperatorHold(kind="pin", target="b")]
    current = plan(catalog, [worker("w0"), worker("w1")], {}, pins, None, PlacementConfig(), True, now_s=1.0)
    assert len(current.copies) == 2
    during = plan(catalog, [], {}, pins, current, PlacementConfig(), True, now_s=2.0)  # nobody reports
    assert during is current
    # the workers are back, one copy loaded already: nothing moves
    first = current.copies[0]
    back = [worker(w, *([(first.model, CopyState.PREWARMED, GB, 0)] if w == first.worker_id else []))
            for w in ("w0", "w1")]
    after = plan(catalog, back, {}, pins, during, PlacementConfig(), True, now_s=3.0)
    assert after.same_copies(current)
