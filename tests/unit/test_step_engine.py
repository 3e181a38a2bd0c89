"""The step-level engine against hand-computed cases: a batch's step time, a prefill queued behind another,
KV preemption, two co-located instances slowing each other, and skipping a decode run in one event."""

import pytest

from simulator.baselines import Baseline
from simulator.costs import Costs
from simulator.engine import Simulator
from simulator.hardware import A100_80G, LLAMA2_7B, Batch, decode_run_time, growth_per_step, step_cost, step_time
from simulator.scheduler import EngineScheduler, SchedulerConfig, Seq
from simulator.workload import Request, SimModel

M7 = SimModel.llama2("m7", "7b")


def test_llama2_7b_shape_by_hand():
    # 32 layers x (2 x 4096^2 + 2 x 4096^2 + 3 x 4096 x 11008) + 2 x 32000 x 4096
    assert LLAMA2_7B.params == 32 * 202_375_168 + 262_144_000 == 6_738_149_376
    assert LLAMA2_7B.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524_288


def test_a_decode_batch_step_is_bound_by_reading_weights_and_kv():
    # 4 sequences with 100 tokens of context each read 13.476 GB of weights + 400 x 0.524 MB of KV
    read = 13_476_298_752 + 400 * 524_288
    memory_s = read / (2.039e12 * 0.80)
    assert memory_s == pytest.approx(8.390e-3, rel=1e-3)
    t = step_time(LLAMA2_7B, A100_80G, Batch(decodes=(100,) * 4))
    assert t == pytest.approx(memory_s + 0.003, rel=1e-6)  # + the per-step overhead; compute is far below


def test_a_long_prefill_is_compute_bound_and_tp_splits_it():
    # 2048 tokens: 2 x 6.476e9 x 2048 linear FLOPs + LM head once + attention 4 x 32 x 4096 x 2048 x 1024.5
    flops = 2 * 6_476_005_376 * 2048 + 2 * 32000 * 4096 + 4 * 32 * 4096 * 2048 * 1024.5
    compute_s = flops / (312e12 * 0.55)
    cost = step_cost(LLAMA2_7B, A100_80G, Batch(prefills=((2048, 0),)))
    assert cost.compute_s == pytest.approx(compute_s, rel=1e-9) and cost.compute_s > cost.memory_s
    tp2 = step_cost(LLAMA2_7B, A100_80G, Batch(prefills=((2048, 0),)), tp=2)
    assert tp2.compute_s == pytest.approx(compute_s / 2, rel=1e-9)
    # two all-reduces per layer of 2048 x 4096 x 2 bytes; a ring of 2 sends 2 (2 - 1) / 2 = all of it
    allreduce = 2 * 32 * (2048 * 4096 * 2 * 1.0 / 300e9 + 8e-6)
    assert tp2.fixed_s == pytest.approx(allreduce + 0.003, rel=1e-9)


def test_a_decode_run_in_one_event_equals_its_steps_one_by_one():
    first = step_cost(LLAMA2_7B, A100_80G, Batch(decodes=(500, 900, 40)))
    growth = growth_per_step(LLAMA2_7B, A100_80G, 3)
    one_by_one = sum(step_time(LLAMA2_7B, A100_80G, Batch(decodes=(500 + k, 900 + k, 40 + k))) for k in range(300))
    assert decode_run_time(first, growth, 300) == pytest.approx(one_by_one, rel=1e-9)
    # a compute-heavy batch (large and with long contexts) crosses from memory- to compute-bound mid-run
    big = tuple(range(1000, 1256))
    first, growth = step_cost(LLAMA2_7B, A100_80G, Batch(decodes=big)), growth_per_step(LLAMA2_7B, A100_80G, 256)
    steps = [step_cost(LLAMA2_7B, A100_80G, Batch(decodes=tuple(c + k for c in big))) for k in range(0, 2000, 1)]
    assert decode_run_time(first, growth, 2000) == pytest.approx(sum(s.time() for s in steps), rel=1e-9)


class Still(Baseline):
    """Nothing scales; the test starts the instances."""

    def __init__(self, shares=None):
        self.fixed_shares = shares or {}

    def shares(self, sim, inst):
        busy = [o for o in sim.gpus[inst.gpus[0]].instances if o.segment is not None and o is not inst]
        return (0.5, 0.5) if busy and self.fixed_shares else (1.0, 1.0)


def one_gpu(models=(M7,), shares=None, **kw):
    sim = Simulator(list(models), 1, 1, A100_80G, Costs(), scheduler=SchedulerConfig(**kw))
    sim.system = Still(shares)
    return sim


def test_a_prefill_queued_behind_another_waits_for_the_token_budget():
    sim = one_gpu(max_num_batched_tokens=2048)
    sim.start_instance("m7", ("n0g0",), "warm", 0.0)
    sim.run([Request(0, "m7", 1.0, 2048, 3), Request(1, "m7", 1.0, 2048, 3)], until_s=10.0)
    a, b = sim.records[0], sim.records[1]
    s1 = step_time(LLAMA2_7B, A100_80G, Batch(prefills=((2048, 0),)))  # A's whole prompt fills the budget
    s2 = step_time(LLAMA2_7B, A100_80G, Batch(prefills=((2047, 0),), decodes=(2049,)))  # A decodes, B chunk 1
    s3 = step_time(LLAMA2_7B, A100_80G, Batch(prefills=((1, 2047),), decodes=(2050,)))  # B's last prompt token
    assert a.ttft_s == pytest.approx(s1)
    assert b.ttft_s == pytest.approx(s1 + s2 + s3)  # B's first token waited two steps behind A's prefill


def test_out_of_kv_the_last_admitted_sequence_is_preempted_and_recomputed():
    sched = EngineScheduler(SchedulerConfig(block_tokens=16), total_blocks=10)  # 160 tokens
    a, b = Seq(0, 64, 64), Seq(1, 64, 64)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert [(s.rid, n) for s, n in step.work] == [(0, 64), (1, 64)] and sched.used_blocks == 8
    sched.apply(step, 1, 0.1)
    assert a.generated == b.generated == 1 and a.first_token_s == b.first_token_s == 0.1
    while not b.preemptions:  # both grow by a token a step: 2 free blocks last 16 steps each ... then B goes
        step = sched.schedule()
        sched.apply(step, step.steps, 1.0)
    assert sched.waiting[0] is b and b.computed == 0 and b.blocks == 0 and a in sched.running
    # B later recomputes its prompt and what it had generated, then goes on where it was
    generated = b.generated
    while b.preemptions and b in sched.waiting:
        step = sched.schedule()
        sched.apply(step, step.steps, 2.0)
    assert b.known == 64 + generated + (b.generated - generated) and b.first_token_s == 0.1


def test_preemption_in_the_simulator_delays_completion_but_serves_everything():
    sim = one_gpu(block_tokens=16)
    inst = sim.start_instance("m7", ("n0g0",), "warm", 0.0, kv_limit=40 * 524_288)  # 40 tokens per GPU: 2 blocks
    sim.run([Request(0, "m7", 0.5, 8, 20), Request(1, "m7", 0.5, 8, 20)], until_s=20.0)
    assert inst.sched.preemptions >= 1
    assert all(sim.records[i].done_s is not None for i in (0, 1))
    assert sim.records[1].preemptions >= 1 and sim.records[1].done_s > sim.records[0].done_s


def test_two_co_located_instances_slow_each_other_by_their_shares():
    other = SimModel.llama2("o7", "7b")
    alone = one_gpu((M7, other), shares=True)
    alone.start_instance("m7", ("n0g0",), "warm", 0.0, kv_limit=10 * 10**9)
    alone.start_instance("o7", ("n0g0",), "warm", 0.0, kv_limit=10 * 10**9)
    alone.run([Request(0, "m7", 1.0, 100, 50)], until_s=30.0)
    both = one_gpu((M7, other), shares=True)
    both.start_instance("m7", ("n0g0",), "warm", 0.0, kv_limit=10 * 10**9)
    both.start_instance("o7", ("n0g0",), "warm", 0.0, kv_limit=10 * 10**9)
    both.run([Request(0, "m7", 1.0, 100, 50), Request(1, "o7", 1.0, 100, 50)], until_s=30.0)
    solo, shared = alone.records[0].tpot_s, both.records[0].tpot_s
    # memory-bound decode at half the bandwidth: the memory part doubles, the fixed overhead does not
    decode = step_cost(LLAMA2_7B, A100_80G, Batch(decodes=(125,)))
    assert solo == pytest.approx(decode.memory_s + decode.fixed_s, rel=0.02)
    assert shared == pytest.approx(2 * decode.memory_s + decode.fixed_s, rel=0.02)
    assert both.records[1].tpot_s == pytest.approx(shared, rel=1e-6)


def test_a_request_handed_over_mid_decode_run_joins_at_the_next_step():
    sim = one_gpu()
    sim.start_instance("m7", ("n0g0",), "warm", 0.0)
    sim.run([Request(0, "m7", 1.0, 100, 400), Request(1, "m7", 2.0, 100, 10)], until_s=30.0)
    first_run = sim.records[0]
    late = sim.records[1]
    one_prefill = step_time(LLAMA2_7B, A100_80G, Batch(prefills=((100, 0),), decodes=(200,)))
    # it waited at most the step in flight, then its prefill shared a step with the running decode
    assert late.ttft_s <= one_prefill + step_time(LLAMA2_7B, A100_80G, Batch(decodes=(300,))) + 1e-9
    assert first_run.done_s > late.done_s
