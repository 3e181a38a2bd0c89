"""The admission core: one ask per model at a time with a growing delay after failures, the bounded queue, and
how a request that waited is labelled (the autoscaler/gateway outcome race)."""

from services.gateway.admission_core import ASK_DELAY_MAX_S, AdmissionCore
from shared.messages import Outcome
from shared.policy.routing import Route


def test_one_ask_per_model_at_a_time_and_a_doubling_delay_after_failures():
    c = AdmissionCore(queue_size=4)
    assert c.should_ask("a", 0.0) and not c.should_ask("a", 0.1)  # one out already
    assert c.should_ask("b", 0.1)  # models are independent
    c.on_reply("a", ok=False)
    assert not c.should_ask("a", 0.4) and c.should_ask("a", 0.5)  # 0.5 s after the last ask
    c.on_reply("a", ok=False)
    assert not c.should_ask("a", 1.4) and c.should_ask("a", 1.5)  # then 1 s
    for _ in range(10):
        c.on_reply("a", ok=False)
    assert c.ask_delay_s["a"] == ASK_DELAY_MAX_S
    c.asking.clear()
    c.on_reply("a", ok=True, instance_id="i1", outcome=Outcome.COLD)
    assert c.ask_delay_s["a"] == 0.5 and c.created["i1"] is Outcome.COLD  # a success resets the delay


def test_the_queue_is_bounded_per_model():
    c = AdmissionCore(queue_size=2)
    assert c.enter("a", +1) == 1 and c.enter("a", +1) == 2
    assert c.queue_full("a") and not c.queue_full("b")
    assert c.enter("a", -1) == 1 and c.enter("a", -1) == 0 and "a" not in c.waiting


def test_labels_warm_for_old_instances_and_how_new_ones_were_made():
    c = AdmissionCore(queue_size=4)
    assert c.label("a", "old", existing={"old"}, made=Outcome.COLD) is Outcome.WARM  # a slot freed up
    c.on_reply("a", ok=True, instance_id="ours", outcome=Outcome.PREWARM_HIT)
    assert c.label("a", "ours", existing=set(), made=None) is Outcome.PREWARM_HIT


def test_an_instance_the_autoscaler_made_while_our_ask_was_out_is_labelled_by_the_workers_report():
    """Regression: the autoscaler counts queued requests as load and can start an instance (a cold start) before
    the gateway's own ask is answered; that request was labelled warm."""
    c = AdmissionCore(queue_size=4)
    assert c.should_ask("a", 0.0)
    assert c.label("a", "theirs", existing=set(), made=Outcome.COLD) is Outcome.COLD  # the worker's report
    assert c.label("a", "theirs", existing=set(), made=None) is None  # not known yet: wait for our reply
    c.on_reply("a", ok=True, instance_id="theirs", outcome=Outcome.COLD)  # the shared scale-up answered
    assert c.label("a", "theirs", existing=set(), made=None) is Outcome.COLD
    # a reply that never says: after waiting once, the request is not held any longer
    assert c.should_ask("b", 0.0)
    assert c.label("b", "x", existing=set(), made=None, waited_for_reply=True) is Outcome.WARM


def test_routes_count_this_gateways_requests_exactly_so_a_burst_spreads_between_heartbeats():
    c = AdmissionCore(queue_size=4)
    a, b = Route("w1", "a", in_flight=0, capacity=2), Route("w2", "b", in_flight=0, capacity=2)
    chosen = []
    for _ in range(5):  # no heartbeat in between: the reports stay at 0
        r = c.choose_route([a, b])
        chosen.append(r.instance_id if r else None)
        if r:
            c.started(r)
    assert chosen == ["a", "b", "a", "b", None]  # spread, then full
    # the next reports already count our requests: they are not counted twice
    a2, b2 = Route("w1", "a", in_flight=2, capacity=2), Route("w2", "b", in_flight=1, capacity=2)
    c.finished(b)
    assert c.choose_route([a2, b2]).instance_id == "b"
    assert c.choose_route([a2, b2], exclude={"b"}) is None  # tried already; a is full
    for r in (a, a, b):
        c.finished(r)
    assert c.pending == {}
