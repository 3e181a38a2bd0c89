"""Evict-aware prewarm placement (docs/design.md, "Placement") on small hand-built clusters with known answers.

Units in these tests: shards are whole or simple fractions of GiB and the host-to-device bandwidth is
1 GiB/s, so one replica of a model whose shard is x GiB scores x (its load time), as long as it is the only
replica its model wants (avg = B = 10, peak = avg).
"""

import math

import pytest

from shared.policy.prewarm_placement import (PAGE_BYTES, Gpu, ModelDemand, PlacementConfig, Replica, place,
                                             replica_scores, shard_bytes)

GB = 2**30
INF = math.inf
CFG = PlacementConfig(batch_capacity=10, h2d_bytes_per_s=GB)
NO_EVICT = PlacementConfig(batch_capacity=10, h2d_bytes_per_s=GB, evict=False)
RR = PlacementConfig(batch_capacity=10, h2d_bytes_per_s=GB, strategy="round-robin")


def node(name, *caps_gb):
    """A node whose GPUs are f"{name}-{i}" with the given capacities in GiB."""
    return [Gpu(f"{name}-{i}", name, i, int(c * GB)) for i, c in enumerate(caps_gb)]


def demand(model, shard_gb, tp=1, avg=10.0, peak=None, **kw):
    """A model whose shard is shard_gb GiB; by default it wants one replica, which scores shard_gb."""
    return ModelDemand(model, int(shard_gb * GB) * tp, tp, avg=avg, peak=avg if peak is None else peak, **kw)


def rep(model, *gpus):
    return Replica(model, tuple(gpus))


def total(decision):
    return sum(decision.scores.values())


SHORT = "; evicting room would cost at least its score or a pinned copy"


# ---------------------------------------------------------------- step 1: how many replicas


def counts(**kw):
    return len(replica_scores(ModelDemand("m", GB, **kw), CFG))


def test_foundation_and_burst_replicas_from_avg_and_peak():
    assert counts(avg=25, peak=47) == 5  # ceil(2.5) = 3 foundation, ceil(4.7) - 3 = 2 burst
    assert counts(avg=30, peak=30) == 3  # exactly 3 batches: no fourth
    assert counts(avg=25, peak=20) == 3  # a peak under the average adds no burst replica


def test_running_instances_are_subtracted():
    assert counts(avg=25, peak=47, running=2) == 3  # foundation 3 - 2 = 1, burst 5 - 2 - 1 = 2
    assert counts(avg=25, peak=47, running=4) == 1  # foundation 0, burst 5 - 4 = 1
    assert counts(avg=25, peak=47, running=6) == 0


def test_zero_load_wants_no_replica():
    assert replica_scores(ModelDemand("m", GB), CFG) == []
    assert place([ModelDemand("m", GB)], node("n", 8), [], CFG).replicas == ()


def test_pinned_is_a_minimum_and_scores_infinity():
    assert replica_scores(ModelDemand("m", GB, pinned=2), CFG) == [INF, INF]
    assert replica_scores(ModelDemand("m", GB, avg=10, peak=10, pinned=3), CFG) == [INF, INF, INF]
    scores = replica_scores(ModelDemand("m", GB, avg=25, peak=25, pinned=1), CFG)
    assert scores == pytest.approx([INF, math.exp(-1 / 3), math.exp(-2 / 3)])


# ---------------------------------------------------------------- step 2: scores


def test_scores_decay_exponentially_and_burst_replicas_carry_the_burstiness():
    # 2 GiB shard -> T = 2 s; avg 20, peak 40, B 10 -> 2 foundation + 2 burst, N = 4, burstiness 2
    scores = replica_scores(ModelDemand("m", 2 * GB, avg=20, peak=40), CFG)
    found = [2 * math.exp(0), 2 * math.exp(-1 / 4)]
    burst = [2 * 2 * math.exp(-2 / 4), 2 * 2 * math.exp(-3 / 4)]
    assert scores == pytest.approx(sorted(found + burst, reverse=True))
    assert scores == pytest.approx([2.4261, 2.0, 1.8894, 1.5576], abs=1e-4)  # highest first


def test_load_time_comes_from_the_page_aligned_shard_and_the_bandwidth():
    tp2 = ModelDemand("m", 4 * GB, tp=2, avg=10, peak=10)  # 2 GiB per GPU
    assert replica_scores(tp2, CFG) == pytest.approx([2.0])
    odd = ModelDemand("m", GB + 1, avg=10, peak=10)  # one byte over: a whole extra 2 MiB page
    assert shard_bytes(odd) == GB + PAGE_BYTES
    assert replica_scores(odd, CFG) == pytest.approx([1 + 1 / 512])
    fast = PlacementConfig(batch_capacity=10, h2d_bytes_per_s=4 * GB)
    assert replica_scores(tp2, fast) == pytest.approx([0.5])


def test_burstiness_is_clipped_to_1_and_100():
    wild = replica_scores(ModelDemand("m", GB, avg=10, peak=5000), CFG)  # peak/avg 500 -> 100
    assert len(wild) == 500
    assert wild[0] == pytest.approx(100 * math.exp(-1 / 500))
    assert 1.0 in wild  # the foundation replica is not multiplied
    assert replica_scores(ModelDemand("m", GB, avg=0, peak=10), CFG) == pytest.approx([100.0])  # no average
    # a peak under the average: burstiness 1, and no burst replica anyway
    assert replica_scores(ModelDemand("m", GB, avg=20, peak=5), CFG) == pytest.approx([1.0, math.exp(-1 / 2)])


# ---------------------------------------------------------------- step 3: greedy order and memory


def test_slow_to_load_models_go_first_when_memory_is_short():
    gpus = node("n", 3)
    d = place([demand("small", 2), demand("big", 3)], gpus, [], CFG)
    assert d.replicas == (rep("big", "n-0"),)
    assert d.skipped == {"small": "1 of 1 replicas: no GPU with 2.1 GB free" + SHORT}


def test_bursty_models_go_first_when_memory_is_short():
    # bursty: avg 10, peak 30 -> scores 3e^(-1/3) = 2.15, 3e^(-2/3) = 1.54 (burst) and 1 (foundation)
    d = place([demand("calm", 1), demand("bursty", 1, peak=30)], node("n", 1, 1), [], CFG)
    assert d.added == (rep("bursty", "n-0"), rep("bursty", "n-1"))
    assert d.scores == pytest.approx({rep("bursty", "n-0"): 3 * math.exp(-1 / 3),
                                      rep("bursty", "n-1"): 3 * math.exp(-2 / 3)})
    assert set(d.skipped) == {"bursty", "calm"}
    assert d.skipped["bursty"].startswith("1 of 3 replicas: no GPU with 1.1 GB free")


def test_one_copy_of_a_model_per_gpu():
    three = demand("m", 1, avg=30)
    d = place([three], node("n", 100), [], CFG)
    assert d.replicas == (rep("m", "n-0"),)
    assert d.skipped == {"m": "2 of 3 replicas: every GPU with 1.1 GB free already holds a copy of it or "
                              "breaks TP nesting" + SHORT}
    d = place([three], node("n", 100, 100), [], CFG)
    assert d.replicas == (rep("m", "n-0"), rep("m", "n-1"))


def test_memory_is_per_gpu_and_groups_stay_on_one_node():
    # two nodes of 2 GPUs: a TP4 model cannot use them; a TP2 model uses one node, first in GPU order
    gpus = node("a", 8, 8) + node("b", 8, 8)
    d = place([demand("tp4", 1, tp=4), demand("tp2", 2, tp=2)], gpus, [], CFG)
    assert d.replicas == (rep("tp2", "a-0", "a-1"),)
    assert d.skipped == {"tp4": "1 of 1 replicas: needs 4 GPUs on one node; the largest node has 2"}
    # existing copies use memory: 3 GiB used of 4 on n-0 leaves no room for a 2 GiB shard there
    d = place([demand("old", 3), demand("new", 2)], node("n", 4, 4), [rep("old", "n-0")], CFG)
    assert d.added == (rep("new", "n-1"),)


def test_the_skip_message_names_the_group_and_the_memory():
    llama70 = ModelDemand("llama-70b", int(138e9), tp=4, avg=30, peak=30)  # 34.5 GB shards, 3 replicas
    d = place([llama70], [Gpu(f"g{i}", "n", i, int(40e9)) for i in range(4)], [], CFG)
    assert d.replicas == (rep("llama-70b", "g0", "g1", "g2", "g3"),)
    assert d.skipped == {"llama-70b": "2 of 3 replicas: no group of 4 GPUs with 34.5 GB free on one node" + SHORT}


# ---------------------------------------------------------------- TP nesting


@pytest.mark.parametrize("config", [CFG, NO_EVICT], ids=["evict", "no-evict"])
def test_equal_tp_groups_are_identical_or_disjoint(config):
    # A (TP2) on n-0,n-1 and C (TP1) on n-0. Without nesting B would take n-1,n-2 (only A overlapped);
    # that straddles A, so B shares A's exact GPUs even though C is there too.
    existing = [rep("A", "n-0", "n-1"), rep("C", "n-0")]
    demands = [demand("A", 1, tp=2), demand("C", 0.5), demand("B", 0.75, tp=2)]
    d = place(demands, node("n", 4, 4, 4), existing, config)
    assert d.added == (rep("B", "n-0", "n-1"),)


@pytest.mark.parametrize("config", [CFG, NO_EVICT], ids=["evict", "no-evict"])
def test_a_larger_group_must_contain_the_smaller_ones_it_touches(config):
    # A on 0-1, B on 2-3 (TP2), C on 0 (TP1). The cheapest TP4 group, 1-4, would cut A in half.
    existing = [rep("A", "n-0", "n-1"), rep("B", "n-2", "n-3"), rep("C", "n-0")]
    demands = [demand("A", 1, tp=2), demand("B", 1, tp=2), demand("C", 0.5), demand("D", 1, tp=4)]
    d = place(demands, node("n", 4, 4, 4, 4, 4), existing, config)
    assert d.added == (rep("D", "n-0", "n-1", "n-2", "n-3"),)
    assert d.evicted == ()


@pytest.mark.parametrize("config", [CFG, NO_EVICT], ids=["evict", "no-evict"])
def test_smaller_groups_lie_inside_a_larger_one(config):
    # X (TP4) covers the node: a TP2 copy and a TP1 copy go inside it; the TP1 copy avoids the GPUs the
    # TP2 copy added score to (smallest overlapped sum)
    demands = [demand("X", 1, tp=4), demand("Y", 0.5, tp=2), demand("Z", 0.25)]
    d = place(demands, node("n", 4, 4, 4, 4), [rep("X", "n-0", "n-1", "n-2", "n-3")], config)
    assert d.added == (rep("Y", "n-0", "n-1"), rep("Z", "n-2"))


@pytest.mark.parametrize("config", [CFG, NO_EVICT], ids=["evict", "no-evict"])
def test_a_smaller_group_may_not_straddle_a_larger_one(config):
    # X (TP4) on 0-3 fills GPUs 0-2. Y (TP2, 0.5 GiB) has room only on 3 and 4: that pair straddles X.
    # Z (TP1) may sit on X's GPU 3.
    existing = [rep("X", "n-0", "n-1", "n-2", "n-3")]
    demands = [demand("X", 1, tp=4), demand("Y", 0.5, tp=2), demand("Z", 1)]
    d = place(demands, node("n", 1, 1, 1, 4, 0.75, 0), existing, config)
    assert d.added == (rep("Z", "n-3"),)
    why = "1 of 1 replicas: every group of 2 GPUs with 0.5 GB free already holds a copy of it or breaks TP nesting"
    assert d.skipped == {"Y": why + (SHORT if config.evict else " (eviction is off)")}


# ---------------------------------------------------------------- step 4: which group


@pytest.mark.parametrize("gb,where", [
    (1.25, "n-1"),  # top-scored only on n-1 (1 + 1 there, 1.5 on n-0): n-1 although its sum is larger
    (2.0, "n-0"),   # top-scored on both: the smaller overlapped sum, 1.5
    (0.5, "n-0"),   # top-scored nowhere: the smallest sum overall
])
def test_prefers_groups_where_the_new_replica_is_top_scored_then_the_smallest_overlap(gb, where):
    existing = [rep("X", "n-0"), rep("Y", "n-1"), rep("Z", "n-1")]
    demands = [demand("X", 1.5), demand("Y", 1), demand("Z", 1), demand("N", gb)]
    d = place(demands, node("n", 10, 10), existing, CFG)
    assert d.added == (rep("N", where),)


def test_an_empty_group_is_preferred_and_ties_go_by_gpu_order():
    gpus = node("b", 10, 10) + node("a", 10, 10)
    d = place([demand("X", 1), demand("N", 1, tp=2)], gpus, [rep("X", "a-0")], CFG)
    assert d.added == (rep("N", "b-0", "b-1"),)  # node a is first but holds X
    d = place([demand("N", 1, tp=2)], gpus, [], CFG)
    assert d.added == (rep("N", "a-0", "a-1"),)
    # equal overlapped sums on both nodes: the first node
    existing = [rep("X", "b-0"), rep("X", "b-1"), rep("Y", "a-0"), rep("Y", "a-1")]
    d = place([demand("X", 1, avg=20, peak=20), demand("Y", 1, avg=20, peak=20), demand("N", 0.5)], gpus,
              existing, CFG)
    assert d.added == (rep("N", "a-1"),)  # Y's second copy scores less than its first
    d = place([demand("X", 1, avg=20, peak=20), demand("Y", 1, avg=20, peak=20), demand("N", 0.5, tp=2)], gpus,
              existing, CFG)
    assert d.added == (rep("N", "a-0", "a-1"),)
    # equal eviction costs on both nodes: the first node
    d = place([demand("X", 1), demand("Y", 1), demand("N", 2)], node("b", 2) + node("a", 2),
              [rep("X", "b-0"), rep("Y", "a-0")], CFG)
    assert d.evicted == (rep("Y", "a-0"),)
    assert d.added == (rep("N", "a-0"), rep("Y", "b-0"))  # and Y moves to the room left next to X


# ---------------------------------------------------------------- step 5: eviction


def test_eviction_takes_the_cheapest_group_and_raises_the_total_score():
    existing = [rep("A", "n-0"), rep("C", "n-1")]
    demands = [demand("A", 2.5), demand("C", 2), demand("B", 3)]
    before = place(demands[:2], node("n", 3, 3), existing, CFG)
    d = place(demands, node("n", 3, 3), existing, CFG)
    assert d.evicted == (rep("C", "n-1"),)
    assert d.added == (rep("B", "n-1"),)
    assert d.replicas == (rep("A", "n-0"), rep("B", "n-1"))
    assert total(before) == pytest.approx(4.5)
    assert total(d) == pytest.approx(5.5)
    assert d.skipped == {"C": "1 of 1 replicas: no GPU with 2.1 GB free" + SHORT}


def test_the_lowest_scored_copies_go_first_until_there_is_room():
    # n-0 (3 GiB) holds A 0.25, X 0.5 and C 2: B (1 GiB) needs 0.75 more than the 0.25 free
    existing = [rep("A", "n-0"), rep("X", "n-0"), rep("C", "n-0")]
    demands = [demand("A", 0.25), demand("X", 0.5), demand("C", 2), demand("B", 1)]
    d = place(demands, node("n", 3), existing, CFG)
    assert d.evicted == (rep("A", "n-0"), rep("X", "n-0"))
    assert d.replicas == (rep("B", "n-0"), rep("C", "n-0"))
    # across the group's GPUs too, one copy at a time: Z (0.125) on n-1 first, which is not enough there,
    # then the TP2 copy T (0.25), which frees both GPUs, so Y (0.75) and X (0.5) stay
    existing = [rep("T", "n-0", "n-1"), rep("Y", "n-0"), rep("X", "n-1"), rep("Z", "n-1")]
    demands = [demand("T", 0.25, tp=2), demand("Y", 0.75), demand("X", 0.5), demand("Z", 0.125),
               demand("B", 0.25, tp=2, avg=0, peak=10)]  # B scores 25
    d = place(demands, node("n", 1, 0.875), existing, CFG)
    # Z fits again in what T left: it was kept after all, neither evicted nor added
    assert d.evicted == (rep("T", "n-0", "n-1"),)
    assert d.added == (rep("B", "n-0", "n-1"),)
    assert d.replicas == (rep("Y", "n-0"), rep("B", "n-0", "n-1"), rep("X", "n-1"), rep("Z", "n-1"))


def test_no_eviction_when_the_new_replica_scores_lower():
    d = place([demand("A", 3), demand("B", 2)], node("n", 4), [rep("A", "n-0")], CFG)
    assert (d.replicas, d.evicted, d.added) == ((rep("A", "n-0"),), (), ())
    assert d.skipped == {"B": "1 of 1 replicas: no GPU with 2.1 GB free" + SHORT}


def test_no_eviction_when_eviction_is_off():
    existing = [rep("A", "n-0"), rep("C", "n-1")]
    demands = [demand("A", 2.5), demand("C", 2), demand("B", 3)]
    d = place(demands, node("n", 3, 3), existing, NO_EVICT)
    assert (d.replicas, d.evicted, d.added) == ((rep("A", "n-0"), rep("C", "n-1")), (), ())
    assert d.skipped == {"B": "1 of 1 replicas: no GPU with 3.2 GB free (eviction is off)"}


def test_pinned_copies_are_never_evicted():
    existing = [rep("A", "n-0"), rep("C", "n-1")]
    # C is the cheaper victim but pinned: A goes instead (2.5 < 3)
    demands = [demand("A", 2.5), demand("C", 2, pinned=1), demand("B", 3)]
    d = place(demands, node("n", 3, 3), existing, CFG)
    assert d.evicted == (rep("A", "n-0"),)
    assert d.replicas == (rep("B", "n-0"), rep("C", "n-1"))
    assert d.scores[rep("C", "n-1")] == INF
    # both pinned: nothing to evict
    demands = [demand("A", 2.5, pinned=1), demand("C", 2, pinned=1), demand("B", 3)]
    d = place(demands, node("n", 3, 3), existing, CFG)
    assert (d.evicted, d.added) == ((), ())


def test_pinned_replicas_are_placed_without_load_and_may_evict():
    d = place([demand("A", 1), ModelDemand("P", GB, pinned=2)], node("n", 1, 1), [rep("A", "n-0")], CFG)
    assert d.added == (rep("P", "n-1"), rep("P", "n-0"))
    assert d.evicted == (rep("A", "n-0"),)
    assert d.scores == {rep("P", "n-0"): INF, rep("P", "n-1"): INF}


def test_eviction_removes_copies_that_break_nesting_and_frees_all_their_gpus():
    # A (TP2) fills GPUs 1-2; B (TP2, score 100) needs two GPUs with 1 GiB: every pair evicts A (sum 1);
    # the first pair, 0-1, straddles A, so A goes for nesting and its GPU 2 is free afterwards
    demands = [demand("A", 1, tp=2), demand("B", 1, tp=2, avg=0, peak=10)]
    d = place(demands, node("n", 1, 1, 1), [rep("A", "n-1", "n-2")], CFG)
    assert d.evicted == (rep("A", "n-1", "n-2"),)
    assert d.replicas == (rep("B", "n-0", "n-1"),)
    assert d.scores == {rep("B", "n-0", "n-1"): 100.0}
    # ... so a TP1 model placed in the same round finds GPU 2 free
    d = place(demands + [demand("E", 1, avg=0, peak=0.5)], node("n", 1, 1, 1), [rep("A", "n-1", "n-2")], CFG)
    assert d.replicas == (rep("B", "n-0", "n-1"), rep("E", "n-2"))


def test_a_lower_scored_replica_does_not_evict_what_a_higher_one_could():
    # N wants 2 replicas scoring 1 and e^(-1/2) = 0.61. The first evicts X (0.5) rather than Y (0.75);
    # the second could only evict Y, which is worth more than it.
    existing = [rep("X", "b-0"), rep("Y", "a-0")]
    demands = [demand("X", 0.5), demand("Y", 0.75), demand("N", 1, avg=20)]
    d = place(demands, node("a", 1) + node("b", 1), existing, CFG)
    assert d.evicted == (rep("X", "b-0"),)
    assert d.replicas == (rep("Y", "a-0"), rep("N", "b-0"))
    assert set(d.skipped) == {"N", "X"}


def test_room_left_by_an_eviction_is_offered_to_a_replica_that_failed_before():
    # F's second replica (2 GiB, score 2e^(-1/2) = 1.21) fails first: on n-2 it would have to evict W (0.25)
    # and then V (V's third copy: 2e^(-2/3) = 1.03), 1.28 in all. E (TP2, 1.125) then takes n-0,n-1 and
    # evicts V, which straddles it, for 1.03 alone: that frees 2 GiB on n-2, where F now fits.
    gpus = node("a", 2, 2, 2, 2) + node("n", 1.125, 4, 2.25)
    existing = [rep("V", "a-0", "a-1"), rep("V", "a-2", "a-3"), rep("V", "n-1", "n-2"), rep("F", "n-1"),
                rep("W", "n-2")]
    demands = [demand("V", 2, tp=2, avg=30), demand("F", 2, avg=20), demand("W", 0.25), demand("E", 1.125, tp=2)]
    d = place(demands, gpus, existing, CFG)
    assert d.evicted == (rep("V", "n-1", "n-2"),)
    assert d.added == (rep("E", "n-0", "n-1"), rep("F", "n-2"))
    assert set(d.skipped) == {"V"}


def test_capacity_shrink_evicts_the_lowest_scored_copy_which_moves_if_it_can():
    existing = [rep("A", "n-0"), rep("C", "n-0")]
    demands = [demand("A", 1), demand("C", 1.5)]
    d = place(demands, node("n", 2, 1.5), existing, CFG)  # n-0 had 2.5 GiB and now has 2
    assert d.evicted == (rep("A", "n-0"),)
    assert d.added == (rep("A", "n-1"),)
    assert d.replicas == (rep("C", "n-0"), rep("A", "n-1"))
    # a pinned copy stays even over capacity; only the unpinned one goes
    demands = [demand("A", 1), demand("C", 1.5, pinned=1)]
    d = place(demands, node("n", 1), existing, CFG)
    assert d.evicted == (rep("A", "n-0"),)
    assert d.replicas == (rep("C", "n-0"),)


# ---------------------------------------------------------------- existing copies


def test_existing_copies_take_their_models_scores_in_gpu_order_and_extras_score_zero():
    two = demand("m", 1, avg=20)  # scores 1 and e^(-1/2)
    existing = [rep("m", "n-2"), rep("m", "n-0"), rep("m", "n-1"), rep("gone", "n-1")]
    d = place([two], node("n", 8, 8, 8), existing, CFG)
    assert (d.added, d.evicted) == ((), ())
    assert d.replicas == (rep("m", "n-0"), rep("gone", "n-1"), rep("m", "n-1"), rep("m", "n-2"))
    assert d.scores == pytest.approx({rep("m", "n-0"): 1.0, rep("m", "n-1"): math.exp(-1 / 2),
                                      rep("m", "n-2"): 0.0, rep("gone", "n-1"): 0.0})


def test_existing_copies_that_cannot_be_kept_are_reported_evicted():
    existing = [rep("m", "x-0"),  # a GPU that is gone
                rep("t", "n-0"),  # its model is TP2 now
                rep("s", "n-0", "m-0")]  # across nodes
    demands = [demand("m", 1, avg=0), demand("t", 1, tp=2, avg=0), demand("s", 1, tp=2, avg=0)]
    d = place(demands, node("n", 8, 8) + node("m", 8), existing, CFG)
    assert set(d.evicted) == set(existing)
    assert d.replicas == ()


def test_a_second_round_keeps_everything():
    gpus = node("a", 8, 8, 8, 8) + node("b", 8, 8, 8, 8)
    demands = [demand("big", 6, tp=4, avg=20, peak=30), demand("mid", 3, tp=2, avg=30, peak=60),
               demand("small", 2, avg=40, peak=50), demand("tiny", 1, avg=10, peak=80),
               demand("keep", 2, pinned=1)]
    first = place(demands, gpus, [], CFG)
    assert first.skipped  # memory is short, so the first round leaves something out
    second = place(demands, gpus, first.replicas, CFG)
    assert (second.added, second.evicted) == ((), ())
    assert second.replicas == first.replicas
    assert second.scores == first.scores


# ---------------------------------------------------------------- round-robin ablation


def test_round_robin_differs_where_scores_matter():
    # S (1 GiB, wants 2) is listed first; L (TP2, 2 GiB shards) scores 2
    demands = [demand("S", 1, avg=20), demand("L", 2, tp=2)]
    ours = place(demands, node("n", 2, 2), [], CFG)
    assert ours.replicas == (rep("L", "n-0", "n-1"),)
    rr = place(demands, node("n", 2, 2), [], RR)
    assert rr.added == (rep("S", "n-0"), rep("S", "n-1"))
    assert rr.skipped == {"L": "1 of 1 replicas: no group of 2 GPUs with 2.1 GB free on one node "
                               "(round-robin: no eviction)"}
    assert rr.scores == pytest.approx({rep("S", "n-0"): 1.0, rep("S", "n-1"): math.exp(-1 / 2)})
    assert total(ours) > total(rr)


def test_round_robin_ignores_nesting_and_takes_turns():
    existing = [rep("A", "n-0", "n-1")]
    demands = [demand("A", 1, tp=2), demand("B", 1, tp=2)]
    gpus = node("n", 1, 2, 2)
    assert place(demands, gpus, existing, CFG).added == ()  # 1-2 would straddle A
    assert place(demands, gpus, existing, RR).added == (rep("B", "n-1", "n-2"),)
    # turns: each model one replica per turn, in the order given
    demands = [demand("x", 1, avg=20), demand("y", 1, avg=30)]
    rr = place(demands, node("n", 1, 1, 1, 1, 1), [], RR)
    assert rr.added == (rep("x", "n-0"), rep("y", "n-1"), rep("x", "n-2"), rep("y", "n-3"), rep("y", "n-4"))


# ---------------------------------------------------------------- determinism


def cluster():
    gpus = [g for n in ("n0", "n1", "n2") for g in node(n, 10, 10, 10, 10, 10, 10, 10, 10)]
    kinds = [(2.5, 1), (3.0, 2), (8.5, 4)]
    demands = [demand(f"m{i}", kinds[i % 3][0], kinds[i % 3][1], avg=5.0 + 7 * i % 31, peak=9.0 + 13 * i % 47,
                      pinned=1 if i == 5 else 0) for i in range(12)]
    return gpus, demands


def test_same_inputs_give_the_same_output_whatever_their_order():
    gpus, demands = cluster()
    first = place(demands, gpus, [], CFG)
    assert len(first.replicas) > 10 and first.skipped
    assert place(demands, gpus, [], CFG) == first
    assert place(demands[::-1], gpus[::-1], [], CFG) == first
    existing = first.replicas[::2]
    again = place(demands, gpus, existing, CFG)
    assert place(demands[::-1], gpus[::-1], existing[::-1], CFG) == again


def test_the_larger_cluster_reaches_a_steady_state():
    gpus, demands = cluster()
    first = place(demands, gpus, [], CFG)
    second = place(demands, gpus, first.replicas, CFG)
    assert (second.added, second.evicted) == ((), ())
    assert second.replicas == first.replicas


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError):
        place([], [], [], PlacementConfig(strategy="random"))  # type: ignore[arg-type]
