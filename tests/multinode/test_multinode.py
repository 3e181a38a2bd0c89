"""Failures across nodes, on the multi-node bed (tests/multinode/bed.py): a NATS server dies, the leaders'
node dies, a worker node's link is cut under load, a minority node is partitioned. Each test ends with the
bed whole again, and checks that nothing was lost or done twice (against JetStream and Postgres)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from shared import bus
from shared.messages import LeaderLease, WorkerEvent, WorkerState
from shared.subjects import LEASES_BUCKET, STREAMS, WORKER_EVENT, WORKERS_BUCKET, BUCKETS
from tests.e2e.conftest import query
from tests.multinode.bed import HEARTBEAT_TIMEOUT_S, LEASE_S, ROLES, WORKERS
from tests.multinode.conftest import Load, connz, until

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(900)]


def run(coro):
    return asyncio.run(coro)


async def _with_nats(bed, fn, only=None):
    nc = await bus.connect(bed.nats.urls(only=only), "multinode-test", deadline_s=15)
    try:
        return await fn(nc)
    finally:
        await bus.close(nc)


def read_keys(bed, bucket: str, keys, value_type, only=None) -> dict:
    """The values of ``keys`` in a KV bucket that can be read now (a failover may hide some for a moment),
    through the NATS servers ``only`` (default: any)."""
    async def read(nc):
        kv = await nc.jetstream().key_value(bucket)
        out = {}
        for key in keys:
            try:
                out[key] = value_type.decode((await kv.get(key)).value)
            except Exception:
                pass  # not readable during a failover: left out, and the caller asks again
        return out
    return run(_with_nats(bed, read, only=only))


def leases(bed) -> dict[str, LeaderLease]:
    return read_keys(bed, LEASES_BUCKET.name, ROLES.values(), LeaderLease)


def worker_states(bed) -> dict[str, WorkerState]:
    return read_keys(bed, WORKERS_BUCKET.name, WORKERS, WorkerState)


def stream_events(bed) -> list[WorkerEvent]:
    """Every worker event in JetStream, in order (all the stream held when asked)."""
    async def read(nc):
        js = nc.jetstream()
        stream = await js.find_stream_name_by_subject(WORKER_EVENT.wildcard)
        total = (await js.stream_info(stream)).state.messages
        sub = await js.subscribe(WORKER_EVENT.wildcard, ordered_consumer=True, deliver_policy="all")
        events = []
        while len(events) < total:
            msg = await sub.next_msg(timeout=5)
            events.append(WorkerEvent.decode(msg.data))
        await sub.unsubscribe()
        return events
    return until(lambda: run(_with_nats(bed, read)), timeout=60, what="the worker events read from JetStream")


def double_loads(bed, events: list[WorkerEvent]) -> list[str]:
    """(worker, model) pairs loaded again while a copy was already there: a command carried out twice. A
    worker process started again (its node revived) holds nothing, so what it loads then is no repeat."""
    starts = sorted((t, name) for name in WORKERS for t in bed.procs[name].started_at[1:])
    present: set[tuple[str, str]] = set()
    twice = []
    for e in sorted(events, key=lambda e: e.at_s):
        while starts and starts[0][0] <= e.at_s:
            _, restarted = starts.pop(0)
            present = {k for k in present if k[0] != restarted}
        key = (e.worker_id, e.model)
        if e.from_state.value == "absent":
            if key in present:
                twice.append(f"{key} at {e.at_s:.1f}")
            present.add(key)
        if e.to_state.value == "absent":
            present.discard(key)
    return twice


def stored_exactly_once(bed, events: list[WorkerEvent]) -> None:
    """Every event in the stream is in Postgres once (the orchestrator leader's durable consumer)."""
    def check():
        rows = query(bed.database_url, "select event_id, count(*) from model_events group by event_id")
        counts = dict(rows)
        return all(counts.get(e.event_id) == 1 for e in events) and counts
    until(check, timeout=60, what="every worker event stored in Postgres exactly once")


def leader_node(bed, role: str) -> str:
    """The node of ``role``'s leader, once its lease can be read (a previous test's heal may still have
    JetStream electing leaders)."""
    lease = until(lambda: leases(bed).get(role), timeout=60, what=f"{role}'s lease readable")
    return lease.holder.split("-")[0]


def settled_leader_nodes(bed) -> dict[str, str]:
    """Each role's leader node, once the leases have kept the same holders and epochs for more than a lease
    period: a previous test's heal may still be moving a lease, and a test that cuts off "the leader's node"
    must cut the node that leads when it cuts."""
    def stable():
        first = {r: (lease.holder, lease.epoch) for r, lease in leases(bed).items()}
        time.sleep(LEASE_S + 1)
        second = {r: (lease.holder, lease.epoch) for r, lease in leases(bed).items()}
        if first != second or len(first) != len(ROLES):
            return None
        return {r: holder.split("-")[0] for r, (holder, _) in first.items()}
    return until(stable, timeout=60, what="the leases settled (the same holders and epochs for a lease period)")


def clean_window(load: Load, seconds: float = 5.0, settle_s: float = 45.0) -> float:
    """Once the disruption has settled, a window of ``seconds`` in which requests are served and none fails.
    Settling (clients moving off a NATS server that vanished, streams electing leaders) may take up to
    ``settle_s``; every error meanwhile must be a clear one. Returns how long settling took."""
    started = time.monotonic()
    load.take()
    while True:
        time.sleep(seconds)
        ok, errors = load.take()
        clear_errors(errors, load)
        if ok > 0 and not errors:
            return time.monotonic() - started - seconds
        assert time.monotonic() - started < settle_s, (ok, errors[-5:], gateway_state(load))


def gateway_state(load: Load) -> dict[str, list[str]]:
    """What the load's gateways say about the model (for a failure's message)."""
    import urllib.request

    out = {}
    for g in load.gateways:
        try:
            text = urllib.request.urlopen(f"{load.bed.gateway_url(g)}/metrics", timeout=3).read().decode()
            out[g] = [line for line in text.splitlines() if not line.startswith("#") and "tiny-llama" in line
                      and any(k in line for k in ("requests_waiting", "requests_running", "instances", "outcome"))]
        except Exception as exc:
            out[g] = [repr(exc)]
    return out


def clear_errors(errors: list[str], load: Load | None = None) -> None:
    """A request caught by a failure ends with an error that says so, never a client timeout."""
    unclear = [e for e in errors if "Timeout" in e]
    assert not unclear, (unclear[:5], gateway_state(load) if load is not None else None)


def test_the_bed_serves_with_one_leader_per_role(bed):
    held = until(lambda: len(leases(bed)) == 3 and leases(bed), timeout=30, what="three leases")
    assert {role: lease.holder for role, lease in held.items()} == {r: f"n0-{r}" for r in ROLES.values()}
    load = Load(bed, ["n0", "n1"]).start()
    try:
        until(lambda: load.ok > 3, timeout=60, what="requests served through both gateways")
    finally:
        load.stop()

    async def replicas(nc):
        js = nc.jetstream()
        return {name: (await js.stream_info(name)).config.num_replicas
                for name in [s.name for s in STREAMS] + [f"KV_{b.name}" for b in BUCKETS]}
    assert set(run(_with_nats(bed, replicas)).values()) == {3}


def test_a_nats_server_dies_and_every_service_reconnects_to_the_others(bed):
    load = Load(bed, ["n0", "n1"]).start()
    try:
        until(lambda: load.ok > 0, timeout=60, what="served")
        bed.nats.kill(2)
        lease_conns = {f"{role}-lease-{node}-{role}" for role in ROLES.values() for node in ("n0", "n1")}
        expected = lease_conns | {"gateway-gw-n0", "gateway-gw-n1"} | {f"gpu-worker-{w}" for w in WORKERS} \
            | {"placement", "prewarm-orchestrator", "forecaster"}

        def all_reconnected():
            names = set(connz(bed, 0)) | set(connz(bed, 1))
            return expected <= names or None
        until(all_reconnected, timeout=30, what=f"{sorted(expected)} connected to nats-0 or nats-1")

        async def available(nc):  # every stream and bucket has a leader and answers (a stream whose leader
            js = nc.jetstream()   # was on the dead server times out until its replicas elect another)
            for name in [s.name for s in STREAMS] + [f"KV_{b.name}" for b in BUCKETS]:
                try:
                    info = await js.stream_info(name)
                except Exception:
                    return False
                if info.cluster is None or not info.cluster.leader:
                    return False
            return True
        until(lambda: run(_with_nats(bed, available, only=[0, 1])), timeout=30, what="streams available")
        settled = clean_window(load)
        print(f"a NATS server died: serving settled {settled:.1f} s after every process had reconnected")
    finally:
        bed.nats.start(2)
        load.stop()
    assert len(leases(bed)) == 3


def test_the_leaders_node_dies_and_the_standbys_take_over(bed):
    """The node holding the orchestrator's leader (and the placement leader, unless a NATS failover moved it)
    dies: the standbys on the other node lead with higher epochs, the plan goes on, nothing is lost or done
    twice, and the revived replicas stand by."""
    victim = settled_leader_nodes(bed)["orchestrator"]
    survivor = "n1" if victim == "n0" else "n0"
    before = {r: lease.epoch for r, lease in leases(bed).items()}
    load = Load(bed, [survivor]).start()
    try:
        until(lambda: load.ok > 0, timeout=60, what=f"served through the gateway on {survivor}")
        killed_at = time.monotonic()
        bed.kill_node(victim)
        until(lambda: {leader_node(bed, r) for r in ROLES.values()} == {survivor}, timeout=LEASE_S + 30,
              what=f"the replicas on {survivor} leading")
        took = time.monotonic() - killed_at
        # in a later term (the value says 0 between a takeover and its first renewal)
        until(lambda: leases(bed)["orchestrator"].epoch > before["orchestrator"], timeout=10,
              what="the orchestrator's new epoch")
        # the plan goes on: a second pinned copy needs the new placement leader and the new orchestrator
        run(_pin(bed, copies=2))
        until(lambda: sum(s.copy_of(bed.model) is not None and s.copy_of(bed.model).state.value in
                          ("prewarmed", "active") for s in worker_states(bed).values()) >= 2,
              timeout=60, what="the second pinned copy prewarmed by the new leaders")
        time.sleep(HEARTBEAT_TIMEOUT_S)
        clean_window(load)
    finally:
        load.stop()
        run(_pin(bed, copies=1))
        sizes = bed.log_sizes()
        bed.revive_node(victim)
    side = "a" if victim == "n0" else "b"
    bed.wait_for_log([f"{r}-{side}" for r in ROLES.values()], "standing by for the lease", timeout_s=90, since=sizes)
    bed.wait_ready(timeout_s=60)
    events = stream_events(bed)
    assert not double_loads(bed, events), double_loads(bed, events)
    stored_exactly_once(bed, events)
    until(lambda: {leader_node(bed, r) for r in ROLES.values()} == {survivor}, timeout=20,
          what="the leases still held on the survivor: the revived replicas stand by")
    print(f"takeover after the leaders' node died: {took:.1f} s (lease {LEASE_S:g} s)")


async def _pin(bed, copies: int) -> None:
    from shared.admin import AdminClient, PinArgs

    nc = await bus.connect(bed.nats.urls(), "multinode-admin", deadline_s=15)
    try:
        client = AdminClient(nc)
        deadline = time.monotonic() + 60
        while True:  # no placement answers while the new leader starts
            try:
                await client.call("prewarm-pin", PinArgs(slug=bed.model, copies=copies, reason="multinode test"),
                                  timeout=10)
                return
            except bus.BusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await bus.close(nc)


def test_a_worker_nodes_link_is_cut_under_load(bed):
    load = Load(bed, ["n0", "n1"], clients=4).start()
    events_before = len(stream_events(bed))
    try:
        until(lambda: load.ok > 3, timeout=60, what="served")
        cut_off = [w for w, node in WORKERS.items() if node == "n2"]

        def beats() -> dict[str, float]:  # read on the side that keeps the majority (nats-2 is on n2)
            states = read_keys(bed, WORKERS_BUCKET.name, cut_off, WorkerState, only=[0, 1])
            return {w: states[w].heartbeat_at_s for w in cut_off if w in states}

        bed.net.cut("n2")
        cut_at = time.time()
        # their last heartbeats age past the timeout (the worker's clock is this machine's): readers drop them
        def stale() -> dict[str, float] | None:
            b = beats()
            return b if len(b) == len(cut_off) and all(time.time() - t > HEARTBEAT_TIMEOUT_S for t in b.values()) \
                else None
        silent = until(stale,
              timeout=HEARTBEAT_TIMEOUT_S + 20, what="the cut workers' heartbeats older than the timeout")
        assert max(silent.values()) < cut_at + 1.0, "nothing of theirs arrived after the cut"
        during_ok, during_errors = load.take()
        clear_errors(during_errors)
        settled = clean_window(load)  # the rest of the cluster serves, with nothing failing
        bed.net.heal("n2")
        until(lambda: all(beats().get(w, 0.0) > silent[w] for w in cut_off), timeout=30,
              what="the cut workers heartbeating again")
        bed.nats.wait_healthy(2)
        clean_window(load)
    finally:
        load.stop()
    events = stream_events(bed)
    assert not double_loads(bed, events), double_loads(bed, events)
    stored_exactly_once(bed, events)
    print(f"link cut: {during_ok} served and {len(during_errors)} failed clearly while the cut was detected, "
          f"serving settled {settled:.1f} s later; {len(events) - events_before} worker events")


def test_a_partitioned_minority_leader_steps_down(bed):
    role_nodes = settled_leader_nodes(bed)
    node = role_nodes["orchestrator"]
    other = "n0" if node == "n1" else "n1"
    before = leases(bed)
    logs_at = bed.log_sizes()
    bed.net.cut(node)
    try:
        led = [r for r, n in role_nodes.items() if n == node]

        def suspended():
            return all("suspends its term" in bed.log_text(f"{r}-{'a' if node == 'n0' else 'b'}")[logs_at[
                f"{r}-{'a' if node == 'n0' else 'b'}"]:] for r in led)
        until(suspended, timeout=LEASE_S + 10, what=f"the leaders on {node} suspending their terms")
        # a later term: a higher epoch (0 in the value for the moment between a takeover and its first renewal)
        until(lambda: all(lease.holder.startswith(other) and lease.epoch > before[r].epoch
                          for r, lease in leases(bed).items() if r in led) and len(leases(bed)) == 3,
              timeout=LEASE_S + 20, what=f"the majority's replicas on {other} leading, in later terms")
        # while cut off, the minority's orchestrator sent no command (it logs every one it sends)
        minority = f"orchestrator-{'a' if node == 'n0' else 'b'}"
        text = bed.log_text(minority)[logs_at[minority]:]
        after_suspension = text.split("suspends its term", 1)[1]
        sent = re.findall(r"(prewarm|activate|deactivate|evict|set_kv_target) \S+ on \S+: done", after_suspension)
        assert not sent, sent
    finally:
        bed.net.heal(node)
    for r in led:
        name = f"{r}-{'a' if node == 'n0' else 'b'}"
        until(lambda: "steps down" in bed.log_text(name)[logs_at[name]:], timeout=30,
              what=f"{name} ending its suspended term once it sees the new leader")
    # no split brain: the old leaders stood down (above), and the lease names the majority's replica
    until(lambda: {leader_node(bed, r) for r in led} == {other}, timeout=20, what=f"the leases held on {other}")
    load = Load(bed, ["n0", "n1"]).start()
    try:
        until(lambda: load.ok > 0, timeout=60, what="served after the partition healed")
        clean_window(load)
    finally:
        load.stop()
