"""Autoscaler thresholds, lifetime and drain order; the load window; KV reservation targets."""

import pytest

from shared.policy.autoscale import AutoscaleConfig, InstanceView, LoadWindow, decide
from shared.policy.kv import free_blocks_target, next_kv_target

CFG = AutoscaleConfig()  # paper defaults: 5 s window, up 0.8, down 0.5, 5 s lifetime, B = 32


def inst(i, started=0.0, in_flight=0):
    return InstanceView(f"i{i}", f"w{i}", started, in_flight)


def test_scale_up_above_80_percent_of_capacity_to_load_over_0_8_b():
    d = decide(26.0, [inst(1)], now_s=100.0)  # 26 > 0.8 x 32
    assert (d.target, d.add, d.stop) == (2, 1, ())  # ceil(26 / 0.8 / 32) = 2
    d = decide(100.0, [inst(1)], now_s=100.0)
    assert (d.target, d.add) == (4, 3)  # ceil(100 / 25.6)
    assert decide(25.0, [inst(1)], now_s=100.0).add == 0  # 25 <= 25.6: within the band


def test_first_instance_for_any_load_from_zero():
    assert decide(0.2, [], now_s=0.0).add == 1
    assert decide(0.0, [], now_s=0.0).add == 0


def test_scale_down_below_half_capacity_to_load_over_0_5_b():
    ins = [inst(i, started=0.0, in_flight=i) for i in range(4)]  # capacity 128
    d = decide(40.0, ins, now_s=100.0)  # 40 < 64: target ceil(40 / 16) = 3
    assert d.target == 3 and [i.instance_id for i in d.stop] == ["i0"]  # the least busy drains
    d = decide(0.0, ins, now_s=100.0)
    assert d.target == 0 and len(d.stop) == 4
    assert decide(70.0, ins, now_s=100.0).stop == ()  # 70 >= 64: within the band


def test_young_instances_are_never_stopped():
    ins = [inst(1, started=98.0), inst(2, started=90.0)]
    d = decide(0.0, ins, now_s=100.0)
    assert [i.instance_id for i in d.stop] == ["i2"]  # i1 is 2 s old, under the 5 s minimum
    d = decide(0.0, [inst(1, started=97.0)], now_s=100.0)
    assert d.stop == () and "older than 5 s" in d.reason


def test_no_scale_down_until_the_window_was_observed_whole():
    assert decide(0.0, [inst(1)], now_s=100.0, window_full=False).stop == ()


def test_thresholds_and_minimum_are_configurable():
    cfg = AutoscaleConfig(up=0.5, down=0.2, batch_capacity=10, min_instances=1)
    assert decide(6.0, [inst(1)], now_s=100.0, config=cfg).add == 1  # 6 > 0.5 x 10 -> ceil(6/5) = 2
    assert decide(0.0, [inst(1)], now_s=100.0, config=cfg).stop == ()  # never below min_instances
    assert decide(0.0, [], now_s=100.0, config=cfg).add == 1


def test_load_window_is_time_weighted_over_the_last_seconds():
    w = LoadWindow(5.0)
    w.add(0.0, 10)
    w.add(4.0, 0)  # 10 for 4 s, then 0
    assert w.mean(5.0) == pytest.approx(8.0)
    assert not w.full(4.0) and w.full(5.0)
    assert w.mean(9.0) == pytest.approx(0.0)  # the busy stretch has left the window
    w.add(9.5, 4)
    assert w.mean(10.0) == pytest.approx((0 * 4.5 + 4 * 0.5) / 5.0)
    w.add(3.0, 100)  # out of order: ignored
    assert w.mean(10.0) == pytest.approx(0.4)


def test_kv_target_follows_in_flight_requests():
    assert free_blocks_target(1000, in_flight=8, batch_capacity=32) == 250
    assert free_blocks_target(1000, in_flight=0, batch_capacity=32) == 32  # at least one request's worth
    assert free_blocks_target(1000, in_flight=64, batch_capacity=32) == 1000


def test_kv_target_rises_at_once_and_falls_with_hysteresis():
    assert next_kv_target(None, 1000, 8, 32) == 250  # first target
    assert next_kv_target(250, 1000, 16, 32) == 500  # load rises: capacity comes back now
    assert next_kv_target(500, 1000, 15, 32) is None  # 469: a small fall is not worth moving memory
    assert next_kv_target(500, 1000, 4, 32) == 125  # a large one is
