"""The orchestrator core on hand-built views: reconcile, autoscaler rounds, KV targets, scale-up choice, the busy
table and back-off, all with the clock passed in."""

from dataclasses import replace

from services.prewarm_orchestrator.core import WORKER_LOST, OrchestratorConfig, OrchestratorCore
from shared.messages import CommandKind, CopyState, Outcome, PlannedCopy
from shared.policy.autoscale import AutoscaleConfig
from shared.policy.cluster import CopyView
from tests.factories import GB, copy, forecast, view, worker


def core(shared_tier: bool = True, **autoscale) -> OrchestratorCore:
    return OrchestratorCore(OrchestratorConfig(autoscale=AutoscaleConfig(**{"batch_capacity": 4, **autoscale}),
                                               shared_tier=shared_tier))


def kinds(commands):
    return [(c.kind, c.model, c.worker_id) for c in commands]


def test_a_round_stops_idle_and_drained_instances_and_sets_kv_targets():
    c = core(window_s=5.0, min_lifetime_s=5.0)
    v = view(worker("w0", ("a", CopyState.ACTIVE, GB, 0), batch_capacity=4),
             worker("w1", ("b", CopyState.ACTIVE, GB, 3), batch_capacity=4))
    first = c.step(v, [], now_s=100.0, drained={"w1"})
    assert (CommandKind.DEACTIVATE, "b", "w1") in kinds(first.commands)  # drained: stop whatever the load
    kv = [cmd for cmd in first.commands if cmd.kind is CommandKind.SET_KV_TARGET]
    assert [(k.model, k.kv_free_blocks) for k in kv] == [("a", 25)]  # ceil(100 x max(0, 1) / 4)
    for cmd in first.commands:
        c.on_result(cmd, True, 100.1)
    later = c.step(v, [], now_s=106.0)  # a has been idle for the whole window
    stops = [cmd for cmd in later.commands if cmd.kind is CommandKind.DEACTIVATE]
    assert ("a", "w0") in [(s.model, s.worker_id) for s in stops] and "autoscaler" in stops[0].reason


def test_an_engine_that_cannot_resize_kv_is_asked_once():
    c = core()
    v = view(worker("w0", ("a", CopyState.ACTIVE, GB, 0)))
    [kv] = [cmd for cmd in c.step(v, [], now_s=1.0).commands if cmd.kind is CommandKind.SET_KV_TARGET]
    assert c.step(v, [], now_s=1.5).commands == []  # in flight: not asked twice
    c.on_result(kv, False, 2.0, error_code="unsupported")
    assert [cmd for cmd in c.step(v, [], now_s=60.0).commands if cmd.kind is CommandKind.SET_KV_TARGET] == []


def test_the_autoscaler_adds_instances_above_the_threshold_but_not_while_a_scale_up_is_in_flight():
    c = core()
    full = view(worker("w0", ("a", CopyState.ACTIVE, GB, 4)), worker("w1", ("a", CopyState.PREWARMED)))
    plan = [PlannedCopy(model="a", worker_id="w1")]
    assert c.step(full, [], now_s=99.0).scale_up == {}  # evicting the unplanned copy: the model is busy
    c = core()
    assert c.step(full, plan, now_s=100.0).scale_up == {"a": 1}  # 4 > 0.8 x 4
    answer = c.scale_up(full, "a", 1, GB, now_s=100.0)
    assert (answer.outcome, answer.worker_id, answer.command.kind) == (Outcome.PREWARM_HIT, "w1", CommandKind.ACTIVATE)
    assert c.scaling == {"a"} and c.step(full, plan, now_s=101.0).scale_up == {}
    c.on_result(answer.command, True, 102.0)
    assert c.scaling == set() and c.step(full, plan, now_s=102.5).scale_up == {"a": 1}


def test_requests_waiting_at_gateways_count_as_load():
    """An instance full of long requests reports in_flight = B; the queue at the gateway is what tells the
    autoscaler it needs more, and it must not take the queue for idleness either."""
    c = core(up=0.9)
    full = view(worker("w0", ("a", CopyState.ACTIVE, GB, 3)))  # 3 of 4 in flight: within the band alone
    assert c.step(full, [], now_s=100.0).scale_up == {}
    c.on_demand("a", "gw-1", at_s=100.5, concurrency=5.0)  # 3 in flight + 2 waiting at one gateway
    c.on_demand("a", "gw-2", at_s=100.5, concurrency=4.0)
    assert c.gateway_load.current(101.0) == {"a": 9.0}
    c.step(full, [], now_s=101.0)
    c.on_demand("a", "gw-1", at_s=102.5, concurrency=5.0)
    c.on_demand("a", "gw-2", at_s=102.5, concurrency=4.0)
    # mean over what the window has seen: 3 for 1 s, then 9 for 2 s = 7 > 0.9 x 4 -> ceil(7 / 3.6) = 2 instances
    assert c.step(full, [], now_s=103.0).scale_up == {"a": 1}
    assert c.gateway_load.current(110.0) == {}  # reports expire: a gateway that went away adds nothing


def test_reconcile_commands_are_sent_once_and_a_failure_backs_off_doubling():
    c = core()
    plan = [PlannedCopy(model="a", worker_id="w0")]
    v = view(worker("w0"))
    [prewarm] = c.step(v, plan, now_s=10.0).commands
    assert prewarm.kind is CommandKind.PREWARM and prewarm.reason == "placement plan"
    assert c.step(v, plan, now_s=10.5).commands == []  # in flight
    c.on_result(prewarm, False, 11.0, error_code="no_memory")
    assert c.retry_in(prewarm, 11.0) == 1.0 and c.step(v, plan, now_s=11.5).commands == []
    [again] = c.step(v, plan, now_s=12.0).commands
    c.on_result(again, False, 12.0)
    assert c.retry_in(again, 12.0) == 2.0  # doubled
    [third] = c.step(v, plan, now_s=14.0).commands
    c.on_result(third, True, 15.0)
    assert c.retry_in(third, 15.0) == 0.0  # a success clears the back-off


def test_scale_up_answers_warm_when_an_instance_appeared_and_refuses_clearly_when_nothing_fits():
    c = core()
    running = view(worker("w0", copy("a", CopyState.ACTIVE, worker_id="w0")))
    answer = c.scale_up(running, "a", 1, GB, now_s=1.0, reason="no_instance")
    assert (answer.command, answer.outcome, answer.instance_id) == (None, Outcome.WARM, "w0-a")
    full = view(worker("w0", ("x", CopyState.ACTIVE, GB, 4)), worker("w1", budget=GB // 2))  # x is at B
    refused = c.scale_up(full, "a", 1, GB, now_s=1.0)
    assert refused.command is None and refused.error_code == "no_capacity" and "a" in refused.error


def test_scale_ups_of_one_model_in_one_round_go_to_different_devices():
    c = core()
    v = view(worker("w0", ("a", CopyState.PREWARMED)), worker("w1", ("a", CopyState.PREWARMED)), worker("w2"))
    chosen = [c.scale_up(v, "a", 1, GB, now_s=1.0) for _ in range(4)]
    assert [(x.worker_id, x.outcome) for x in chosen[:3]] == [
        ("w0", Outcome.PREWARM_HIT), ("w1", Outcome.PREWARM_HIT), ("w2", Outcome.COLD)]
    assert chosen[3].command is None and chosen[3].error_code == "no_capacity"  # every device is taken


def test_scale_up_skips_devices_busy_with_another_model_and_drained_ones():
    c = core()
    v = view(worker("w0", ("a", CopyState.PREWARMED)), worker("w1"), worker("w2"))
    [prewarm] = c.step(v, [PlannedCopy(model="b", worker_id="w0"), PlannedCopy(model="a", worker_id="w0")],
                       now_s=1.0).commands
    assert (prewarm.kind, prewarm.model) == (CommandKind.PREWARM, "b")
    answer = c.scale_up(v, "a", 1, GB, now_s=1.0, drained={"w1"})
    assert (answer.worker_id, answer.outcome) == ("w2", Outcome.COLD)  # w0 is loading b, w1 is drained


# ---- handover and forecast-driven scale-down (crowded clusters) ------------------------------------------


def test_with_nothing_free_a_queued_model_takes_the_gpu_of_a_light_instance_from_its_copy():
    c = core()
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0"), ("a", CopyState.PREWARMED)),
             worker("w1", copy("y", CopyState.ACTIVE, in_flight=4, worker_id="w1"), ("a", CopyState.PREWARMED)))
    answer = c.scale_up(v, "a", 1, GB, now_s=1.0, waiting=4)  # 4 waiting >= 2 x x's one request
    cmd = answer.command
    assert (cmd.kind, cmd.worker_id, cmd.outcome, cmd.replace_active) == (
        CommandKind.ACTIVATE, "w0", Outcome.PREWARM_HIT, True)
    assert "handover (trades) from w0-x" in cmd.reason
    assert c.scale_up(v, "b", 1, GB, now_s=1.0, waiting=4).error_code == "no_capacity"  # w0 is taken; y is full
    off = OrchestratorCore(OrchestratorConfig(autoscale=AutoscaleConfig(batch_capacity=4), handover=False))
    assert off.scale_up(v, "a", 1, GB, now_s=1.0, waiting=4).error_code == "no_capacity"


def test_a_models_last_instance_is_taken_only_while_it_is_a_trickle_now_and_in_its_forecast():
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0"), ("a", CopyState.PREWARMED)))
    c = core()
    c.on_forecast(forecast("x", avg=2.0, peak=3.0))  # x expects 3 concurrent requests on its only instance
    assert c.scale_up(v, "a", 1, GB, now_s=10.0, waiting=50).error_code == "no_capacity"  # however long a's queue
    c = core(shared_tier=False)  # (with the shared tier, a's one request would be served next to x)
    c.on_forecast(forecast("x", avg=0.2, peak=0.5))  # a trickle: one request in flight now, less forecast
    assert c.scale_up(v, "a", 1, GB, now_s=10.0, waiting=1).error_code == "no_capacity"  # 1 < 2 x 1
    assert c.scale_up(v, "a", 1, GB, now_s=10.0, waiting=2).command.replace_active
    c = core()
    c.on_forecast(forecast("x", avg=2.0, peak=3.0))
    assert c.scale_up(v, "a", 1, GB, now_s=10_000.0, waiting=2).command is not None  # a stale forecast is not acted on


def test_a_giver_whose_siblings_carry_its_load_and_forecast_fits_even_for_one_waiting_request():
    c = core()
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=0, worker_id="w0"), ("a", CopyState.PREWARMED)),
             worker("w1", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w1")),
             worker("w2", budget=4 * GB))
    # w2 is free for a cold load, but w0 is idle, fits (x's other instance carries its load) and holds a's copy
    answer = c.scale_up(v, "a", 1, GB, now_s=1.0, waiting=1)
    assert (answer.worker_id, answer.outcome, "fits" in answer.command.reason) == ("w0", Outcome.PREWARM_HIT, True)
    busy = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0"), ("a", CopyState.PREWARMED)),
                worker("w1", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w1")),
                worker("w2", budget=4 * GB))
    answer = core(shared_tier=False).scale_up(busy, "a", 1, GB, now_s=1.0, waiting=1)  # a drain could outlast
    assert (answer.worker_id, answer.outcome, answer.command.replace_active) == ("w2", Outcome.COLD, False)  # the load
    answer = core().scale_up(busy, "a", 1, GB, now_s=1.0, waiting=1)  # the shared tier: a guest from the copy
    assert (answer.worker_id, answer.outcome, answer.command.share) == ("w0", Outcome.PREWARM_HIT, True)


def test_scale_down_keeps_the_instances_the_forecast_needs_within_the_next_window():
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=0, worker_id="w0")))
    reactive = OrchestratorCore(OrchestratorConfig(autoscale=AutoscaleConfig(batch_capacity=4),
                                                   forecast_scale_down=False))
    forecasted = core()
    for c in (reactive, forecasted):  # an average of 2 half-fills one instance of 4 (the scale-down threshold)
        c.on_forecast(forecast("x", avg=2.0, peak=3.0))
        c.step(v, [], now_s=100.0)
    stops = lambda c: [cmd for cmd in c.step(v, [], now_s=106.0).commands if cmd.kind is CommandKind.DEACTIVATE]
    assert len(stops(reactive)) == 1  # idle for a whole window: stopped
    assert stops(forecasted) == []  # the forecast says x needs it within the next window
    forecasted.on_forecast(forecast("x", avg=1.5, peak=3.0))
    assert len(stops(forecasted)) == 1  # too little to half-fill it: its GPU goes back to the pool


def test_a_handover_never_stops_an_instance_spanning_more_devices_than_it_takes():
    big = [copy("big", CopyState.ACTIVE, in_flight=1, worker_id="w0")]
    v = view(worker("w0", *big, ("a", CopyState.PREWARMED)), worker("w1"))
    v = replace(v, instances=(replace(v.instances[0], devices=("w0", "w1")),))  # big spans w0 and w1
    assert core().scale_up(v, "a", 1, GB, now_s=1.0, waiting=40).error_code == "no_capacity"


# ---- the shared tier (crowded clusters) -------------------------------------------------------------------


def sharing_core(**kw) -> OrchestratorCore:
    return OrchestratorCore(OrchestratorConfig(autoscale=AutoscaleConfig(batch_capacity=32), **kw))


def test_a_quiet_model_with_no_free_device_is_a_guest_on_the_least_loaded_device_holding_its_copy():
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=25, worker_id="w0"), ("a", CopyState.PREWARMED)),
             worker("w1", copy("y", CopyState.ACTIVE, in_flight=6, worker_id="w1"), ("a", CopyState.PREWARMED)),
             worker("w2", copy("z", CopyState.ACTIVE, in_flight=2, worker_id="w2")))
    answer = sharing_core().scale_up(v, "a", 1, GB, now_s=1.0, waiting=1)
    cmd = answer.command
    # w2 is the least loaded but holds no copy: a prewarm hit on w1 comes first; w0 is too busy (25 + 1 > 0.8 x 32)
    assert (cmd.worker_id, cmd.outcome, cmd.share, cmd.replace_active) == ("w1", Outcome.PREWARM_HIT, True, False)
    assert "shared tier" in cmd.reason
    off = sharing_core(shared_tier=False, handover=False)
    assert off.scale_up(v, "a", 1, GB, now_s=1.0, waiting=1).error_code == "no_capacity"
    # a model that is not quiet (9 waiting > 0.25 x 32) is not a guest: it gets a dedicated device or waits
    assert sharing_core(handover=False).scale_up(v, "a", 1, GB, now_s=1.0, waiting=9).error_code == "no_capacity"
    # nothing shares a device loaded to the scale-up threshold, nor one that holds max_instances already
    full = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=25, worker_id="w0"), ("a", CopyState.PREWARMED)))
    assert sharing_core(handover=False).scale_up(full, "a", 1, GB, now_s=1.0, waiting=1).error_code == "no_capacity"
    crowded = view(worker("w0", *(copy(m, CopyState.ACTIVE, worker_id="w0") for m in ("x", "y")),
                          ("a", CopyState.PREWARMED)))
    assert sharing_core(shared_max_instances=2, handover=False).scale_up(
        crowded, "a", 1, GB, now_s=1.0, waiting=1).error_code == "no_capacity"
    assert sharing_core(handover=False).scale_up(crowded, "a", 1, GB, now_s=1.0, waiting=1).command.share


def test_a_guests_own_forecast_and_its_hosts_forecast_count_against_the_device():
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=2, worker_id="w0"), ("a", CopyState.PREWARMED)))
    c = sharing_core(handover=False)
    c.on_forecast(forecast("x", avg=10.0, peak=25.0))  # x is quiet now, but its next window fills the device
    assert c.scale_up(v, "a", 1, GB, now_s=10.0, waiting=1).error_code == "no_capacity"
    c = sharing_core(handover=False)
    c.on_forecast(forecast("a", avg=4.0, peak=12.0))  # a's own forecast is not quiet
    assert c.scale_up(v, "a", 1, GB, now_s=10.0, waiting=1).error_code == "no_capacity"


def test_a_dedicated_prewarm_hit_beats_a_guest_and_a_guest_prewarm_hit_beats_a_cold_load_and_a_handover():
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0"), ("a", CopyState.PREWARMED)),
             worker("w1", ("a", CopyState.PREWARMED)))
    assert sharing_core().scale_up(v, "a", 1, GB, now_s=1.0, waiting=1).command.worker_id == "w1"
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0"), ("a", CopyState.PREWARMED)),
             worker("w1"))
    cmd = sharing_core().scale_up(v, "a", 1, GB, now_s=1.0, waiting=1).command
    assert (cmd.worker_id, cmd.share) == ("w0", True)
    # no copy anywhere: a free device's cold load first, a guest load only when no device is free
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0")), worker("w1"))
    cmd = sharing_core().scale_up(v, "a", 1, GB, now_s=1.0, waiting=1).command
    assert (cmd.worker_id, cmd.outcome, cmd.share) == ("w1", Outcome.COLD, False)
    v = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0")))
    cmd = sharing_core(handover=False).scale_up(v, "a", 1, GB, now_s=1.0, waiting=1).command
    assert (cmd.worker_id, cmd.outcome, cmd.share) == ("w0", Outcome.COLD, True)
    tight = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=1, worker_id="w0"), budget=GB, kv_cache=GB))
    assert sharing_core(handover=False).scale_up(tight, "a", 1, GB, now_s=1.0, waiting=1).error_code == "no_capacity"


def test_a_promoted_model_is_served_by_its_guest_until_its_dedicated_instance_runs_then_the_guest_drains():
    guest = copy("a", CopyState.ACTIVE, in_flight=3, worker_id="w0", since_s=10.0)  # x, active since 0, hosts
    before = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=2, worker_id="w0"), guest),
                  worker("w1", ("a", CopyState.PREWARMED)))
    c, plan = sharing_core(), [PlannedCopy(model="a", worker_id="w1")]
    for t in range(6):  # a's load rises past 0.25 x B at the gateway
        c.on_demand("a", "gw", float(t), 12.0)
        r = c.step(before, plan, now_s=float(t))
    assert r.scale_up == {"a": 1}
    assert not [cmd for cmd in r.commands if cmd.kind is CommandKind.DEACTIVATE]  # the guest keeps serving
    answer = c.scale_up(before, "a", 1, GB, now_s=5.0, reason="at_capacity")
    assert (answer.worker_id, answer.outcome, answer.command.share) == ("w1", Outcome.PREWARM_HIT, False)
    c.on_result(answer.command, True, now_s=6.0)
    after = view(worker("w0", copy("x", CopyState.ACTIVE, in_flight=2, worker_id="w0"), guest),
                 worker("w1", copy("a", CopyState.ACTIVE, in_flight=0, worker_id="w1")))
    stops = [cmd for cmd in c.step(after, plan, now_s=6.0).commands if cmd.kind is CommandKind.DEACTIVATE]
    assert [(s.instance_id, s.drain) for s in stops] == [("w0-a", True)] and "promoted" in stops[0].reason
    # a guest whose host has stopped has its device to itself: nothing to promote it to
    alone = view(worker("w0", guest), worker("w1", ("a", CopyState.PREWARMED)))
    busy = sharing_core()
    for t in range(6):
        busy.on_demand("a", "gw", float(t), 12.0)
        r = busy.step(alone, plan, now_s=float(t))
    assert r.scale_up == {} and not [cmd for cmd in r.commands if cmd.kind is CommandKind.DEACTIVATE]
    # a quiet guest stays where it is
    quiet = sharing_core()
    quiet.on_demand("a", "gw", 1.0, 2.0)
    assert quiet.step(before, plan, now_s=1.0).scale_up == {}


def test_a_group_of_idle_devices_and_a_light_instance_whose_model_restarts_from_a_copy_elsewhere_is_taken():
    """A TP-2 model's copy spans w0 (idle) and w1 (the last instance of x, a few requests): x is no trickle,
    so it gives w1 up only because its next request is a prewarm hit on w2's copy."""
    two = [copy("big", CopyState.PREWARMED, worker_id=w) for w in ("w0", "w1")]
    plain = view(worker("w0", two[0]), worker("w1", copy("x", CopyState.ACTIVE, in_flight=3, worker_id="w1"), two[1]),
                 worker("w2"))
    plain = replace(plain, copies=tuple(c for c in plain.copies if c.model != "big") + (
        CopyView("big", ("w0", "w1"), True, GB),))
    c = sharing_core()
    c.on_demand("x", "gw", 0.5, 3.0)
    assert c.scale_up(plain, "big", 2, GB, now_s=1.0, waiting=40).error_code == "no_capacity"
    rehomed = replace(plain, copies=plain.copies + (CopyView("x", ("w2",), True, GB),))
    cmd = c.scale_up(rehomed, "big", 2, GB, now_s=1.0, waiting=40).command
    assert (cmd.devices, cmd.outcome, cmd.replace_active) == (("w0", "w1"), Outcome.PREWARM_HIT, True)
    assert "handover (trades) from w1-x" in cmd.reason


def test_the_oldest_instance_on_a_device_is_its_host_and_a_model_whose_hosted_instances_fall_short_gets_another():
    c, plan = sharing_core(), [PlannedCopy(model="a", worker_id="w2")]
    # x was a guest once (its host stopped); quiet y joined it later: x is the host, nothing moves
    x = copy("x", CopyState.ACTIVE, in_flight=12, worker_id="w0").model_copy(update={"shared": True})
    y = copy("y", CopyState.ACTIVE, in_flight=1, worker_id="w0", since_s=10.0)
    for t in range(6):
        c.on_demand("x", "gw", float(t), 12.0)
        r = c.step(view(worker("w0", x, y)), plan, now_s=float(t))
    assert r.scale_up == {} and not [cmd for cmd in r.commands if cmd.kind is CommandKind.DEACTIVATE]
    # a runs hosted on w1 and as a guest on w0; at 30 its hosted instance (25.6 at the threshold) falls short
    hosted = copy("a", CopyState.ACTIVE, in_flight=12, worker_id="w1")
    guest = copy("a", CopyState.ACTIVE, in_flight=4, worker_id="w0", since_s=10.0)
    v = view(worker("w0", copy("z", CopyState.ACTIVE, in_flight=1, worker_id="w0"), guest), worker("w1", hosted),
             worker("w2", ("a", CopyState.PREWARMED)))
    c = sharing_core()
    for t in range(6):
        c.on_demand("a", "gw", float(t), 30.0)
        r = c.step(v, plan, now_s=float(t))
    assert r.scale_up == {"a": 1} and not [cmd for cmd in r.commands if cmd.kind is CommandKind.DEACTIVATE]
    c, sent = sharing_core(), []
    for t in range(6):  # at 20 the hosted instance carries it: the guest drains (once)
        c.on_demand("a", "gw", float(t), 20.0)
        sent += c.step(v, plan, now_s=float(t)).commands
    assert [cmd.instance_id for cmd in sent if cmd.kind is CommandKind.DEACTIVATE] == ["w0-a"]


def test_a_worker_lost_during_an_activation_takes_no_scale_up_until_its_hold_ends():
    c = OrchestratorCore(OrchestratorConfig(lost_hold_s=10.0))
    v = view(worker("w0", ("a", CopyState.PREWARMED)), worker("w1"))
    first = c.scale_up(v, "a", 1, GB, now_s=100.0, reason="no_instance", waiting=2)
    assert (first.worker_id, first.outcome) == ("w0", Outcome.PREWARM_HIT)
    c.on_result(first.command, False, 103.0, error_code=WORKER_LOST)
    assert c.busy == {} and c.lost_now(103.0) == ["w0"]
    # its entry may still look live for a moment (or a restarted process heartbeats under its id): not chosen
    again = c.scale_up(v, "a", 1, GB, now_s=103.0, reason="no_instance", waiting=2)
    assert (again.worker_id, again.outcome) == ("w1", Outcome.COLD)
    c.on_result(again.command, True, 104.0)
    c.step(v, [PlannedCopy(model="a", worker_id="w0")], now_s=113.5)
    assert c.lost == {}  # the hold ran out and is forgotten
    assert c.scale_up(v, "a", 1, GB, now_s=113.5).worker_id == "w0"


def test_nothing_the_core_keeps_grows_with_gateways_models_and_workers_that_came_and_went():
    c = core()
    for i in range(50):  # ephemeral gateways, models and workers, each heard from once
        c.on_demand(f"m{i}", f"gw-{i}", at_s=100.0, concurrency=1.0)
        c.on_forecast(forecast(f"m{i}", 1.0, 2.0).model_copy(update={"window_start_s": 0.0, "window_s": 60.0}))
        cmd = c.step(view(worker(f"w{i}", ("a", CopyState.ACTIVE, GB, 0))), [PlannedCopy(model="b", worker_id=f"w{i}")],
                     now_s=100.0).commands
        for k in cmd:
            c.on_result(k, False, 100.0, error_code="unsupported")
    assert len(c.retry_at) >= 50 and len(c.forecasts) == 50  # backing off, still young
    assert c.kv_unsupported == {"w49"}  # each round forgets what it learnt of devices no longer there
    c.on_forecast(forecast("kept", 1.0, 2.0).model_copy(update={"window_start_s": 120.0, "window_s": 60.0}))
    c.on_demand("kept", "gw-live", at_s=199.0, concurrency=1.0)
    live = view(worker("w-live"))
    c.step(live, [], now_s=200.0)
    assert set(c.gateway_load.reports) == {"kept"} and set(c.gateway_load.reports["kept"]) == {"gw-live"}
    assert set(c.forecasts) == {"kept"}  # the others are older than two windows: never acted on again
    assert c.retry_at == {} and c.kv_unsupported == set()  # their workers are gone and their back-offs over
    for now in (400.0, 500.0):  # and once "kept" is quiet and its forecast old, nothing at all
        c.step(live, [], now_s=now)
    assert (c.windows, c.forecasts, c.gateway_load.reports) == ({}, {}, {})
