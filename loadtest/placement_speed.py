"""Cost of one prewarm placement round on a large cluster (docs/design.md, "Placement"): evict-aware vs round-robin.

Cluster: 128 nodes x 8 GPUs of 80 GB. Models: 256 Llama-2 7B/13B/70B at TP 1/2/4 (60/30/10%), power-law
popularity share_i ~ (i+1)^-alpha, total load scaled so the replicas wanted at peak fill the cluster
(--fill), peak = avg x burstiness drawn uniformly from [1, 4]. Scenarios: the first round on an empty
cluster; the steady round after it (same inputs, its replicas as existing); a load shift (popularity
reshuffled, load doubled) and a capacity shrink to 40 GB per GPU, both from the first round's replicas,
where eviction happens; the round-robin ablation of the first round. Pure CPU, one core. "score" is the
sum of the finite scores of the copies kept and added (what evict-aware placement maximises greedily).
Run:  python -m loadtest.placement_speed [--nodes 128] [--models 256] [--reps 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np

from loadtest.report import header, save
from shared.policy.prewarm_placement import (Gpu, ModelDemand, PlacementConfig, PlacementDecision, Replica,
                                             place)

OUT = Path("docs/benchmarks/placement_speed.json")
KINDS = (("7b", 13.5e9, 1), ("13b", 26.0e9, 2), ("70b", 138.0e9, 4))  # name, weight bytes, tp
MIX = (0.6, 0.3, 0.1)


def make_gpus(nodes: int, per_node: int, capacity: float) -> list[Gpu]:
    return [Gpu(f"n{n:03d}-g{i}", f"n{n:03d}", i, int(capacity)) for n in range(nodes) for i in range(per_node)]


def make_demands(models: int, alpha: float, fill: float, cluster_bytes: float, batch: int, seed: int,
                 load_factor: float = 1.0, shuffle: bool = False) -> list[ModelDemand]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=models, p=MIX)
    burst = rng.uniform(1.0, 4.0, size=models)
    rank = np.arange(models)
    if shuffle:  # the same models, popular in a different order
        rank = np.random.default_rng(seed + 1).permutation(models)
    share = (rank + 1.0) ** -alpha
    share /= share.sum()
    weight = np.array([KINDS[k][1] for k in kinds])

    def wanted_bytes(total: float) -> float:
        return float(sum(math.ceil(total * s * b / batch) * w for s, b, w in zip(share, burst, weight)))

    lo, hi = 0.0, 1.0
    while wanted_bytes(hi) < fill * cluster_bytes:
        hi *= 2
    for _ in range(50):  # total average concurrency whose peak replicas fill the cluster
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if wanted_bytes(mid) < fill * cluster_bytes else (lo, mid)
    total = hi * load_factor
    out = []
    for i in range(models):
        name, wb, tp = KINDS[kinds[i]]
        avg = float(total * share[i])
        out.append(ModelDemand(f"m{i:03d}-{name}", int(wb), tp, avg=avg, peak=avg * float(burst[i])))
    return out


def timed(reps: int, fn) -> tuple[PlacementDecision, list[float]]:
    times = []
    result = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return result, times


def total_score(d: PlacementDecision) -> float:
    return sum(s for s in d.scores.values() if math.isfinite(s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=128)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--shrunk-gb", type=float, default=40.0, help="capacity per GPU in the shrink scenario")
    p.add_argument("--models", type=int, default=256)
    p.add_argument("--alpha", type=float, default=1.0, help="popularity share_i ~ (i+1)^-alpha")
    p.add_argument("--fill", type=float, default=1.0, help="bytes of the replicas wanted at peak / cluster bytes")
    p.add_argument("--batch", type=int, default=32, help="B: concurrent requests per instance")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()

    gpus = make_gpus(a.nodes, a.gpus_per_node, a.gpu_gb * 1e9)
    shrunk = make_gpus(a.nodes, a.gpus_per_node, a.shrunk_gb * 1e9)
    cluster = len(gpus) * a.gpu_gb * 1e9
    demands = make_demands(a.models, a.alpha, a.fill, cluster, a.batch, a.seed)
    shifted = make_demands(a.models, a.alpha, a.fill, cluster, a.batch, a.seed, load_factor=2.0, shuffle=True)
    cfg = PlacementConfig(batch_capacity=a.batch)
    rr = PlacementConfig(batch_capacity=a.batch, strategy="round-robin")
    first = place(demands, gpus, [], cfg)
    prior: tuple[Replica, ...] = first.replicas
    # the greedy first round can leave a replica out that the next round, seeing the result, makes room for
    settled: tuple[Replica, ...] = place(demands, gpus, prior, cfg).replicas

    scenarios = [
        ("first round, empty cluster", lambda: place(demands, gpus, [], cfg)),
        ("steady round (same inputs)", lambda: place(demands, gpus, prior, cfg)),
        ("third round (same inputs)", lambda: place(demands, gpus, settled, cfg)),
        ("load shift: x2, reshuffled", lambda: place(shifted, gpus, prior, cfg)),
        (f"capacity shrink to {a.shrunk_gb:g} GB", lambda: place(demands, shrunk, prior, cfg)),
        ("round-robin, empty cluster", lambda: place(demands, gpus, [], rr)),
    ]
    wanted = sum(math.ceil(d.peak / a.batch) for d in demands)
    report = header("placement_speed", vars(a))
    report["cluster"] = {"gpus": len(gpus), "nodes": a.nodes, "gpu_bytes": a.gpu_gb * 1e9, "models": a.models,
                         "models_by_kind": {k[0]: sum(d.model.endswith(k[0]) for d in demands) for k in KINDS},
                         "replicas_wanted": wanted}
    report["results"] = []
    print(f"{len(gpus)} GPUs ({a.nodes} nodes x {a.gpus_per_node}, {a.gpu_gb:g} GB), {a.models} models, "
          f"{wanted} replicas wanted at peak, {a.reps} repetitions each, one core")
    print(f"{'scenario':32s} {'replicas':>8s} {'added':>6s} {'evicted':>7s} {'skipped':>7s} {'score':>8s} "
          f"{'median ms':>9s} {'max ms':>8s}")
    for name, fn in scenarios:
        d, times = timed(a.reps, fn)
        r = {"scenario": name, "replicas": len(d.replicas), "added": len(d.added), "evicted": len(d.evicted),
             "models_short": len(d.skipped), "total_score": round(total_score(d), 2),
             "median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}
        report["results"].append(r)
        print(f"{name:32s} {r['replicas']:8d} {r['added']:6d} {r['evicted']:7d} {r['models_short']:7d} "
              f"{r['total_score']:8.1f} {r['median_ms']:9.1f} {r['max_ms']:8.1f}")
    save(report, a.out)


if __name__ == "__main__":
    main()
