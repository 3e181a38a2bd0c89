"""Evict-aware placement of prewarmed copies (docs/design.md, "Placement"): which models to prewarm on which GPUs.

Pure: a function of its inputs, no I/O, no clock, no randomness; the placement service, the simulator and
the unit tests share it. Units: bytes and seconds.

Algorithm (the WarmServe paper's, plus eviction):
1. Replicas needed per model, with batch capacity B: ``n_found = max(ceil(avg/B) - running, 0)`` and
   ``n_burst = max(ceil(peak/B) - running - n_found, 0)``; at least ``pinned`` in all.
2. Scores: ``T`` = seconds to load one shard (``shard bytes / host-to-device bandwidth``), ``N = n_found +
   n_burst``; foundation replica i scores ``exp(-i/N) * T``, burst replica i scores
   ``exp(-(n_found+i)/N) * T * burstiness`` with burstiness = peak/avg clipped to [1, 100]. Pinned replicas
   score infinity (never evicted). Existing copies of a model take that model's scores in order; copies
   beyond what is needed score 0.
3. New replicas are placed greedily by descending score. A candidate group (tp GPUs of one node) needs a
   free shard's worth of memory on each GPU and nesting against every copy already on those GPUs: never two
   copies of one model on a GPU; an equal-TP group must equal the other's exactly; a larger group must
   contain a smaller one's GPUs; a smaller group must lie inside a larger one's.
4. Among candidates prefer groups where the new replica would be the highest-scoring copy present, then the
   smallest sum of overlapped scores; otherwise the smallest sum overall.
5. When no group has room (``evict=True``): evict lower-scored copies from the group whose evicted score sum
   is smallest, if that sum is below the new replica's score (the total score rises). Pinned copies are
   never evicted.
Ablations: ``strategy="round-robin"`` (the paper's baseline: models in turn, first group with room, no
scores, no eviction), ``evict=False``. KV reservation is the caller's switch: it decides whether reclaimable
KV memory counts in ``Gpu.capacity_bytes``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

PAGE_BYTES = 2 * 2**20


@dataclass(frozen=True)
class Gpu:
    gpu_id: str
    node: str
    index: int  # position on its node; groups and ties are ordered by (node, index)
    capacity_bytes: int  # memory prewarmed copies may use on this GPU (existing copies included)


@dataclass(frozen=True)
class ModelDemand:
    model: str
    weight_bytes: int  # the whole model; each of the tp shards holds weight_bytes / tp, page-aligned
    tp: int = 1
    avg: float = 0.0  # forecast average concurrency
    peak: float = 0.0  # forecast peak concurrency (the upper quantile)
    running: int = 0  # active instances now
    pinned: int = 0  # copies an operator keeps prewarmed regardless of the forecast


@dataclass(frozen=True)
class Replica:
    model: str
    gpus: tuple[str, ...]  # len == the model's tp, all on one node, in (node, index) order


@dataclass(frozen=True)
class PlacementConfig:
    batch_capacity: int = 32  # B: concurrent requests one instance serves
    h2d_bytes_per_s: float = 25e9  # host-to-device bandwidth per GPU (PCIe Gen4 x16)
    strategy: Literal["evict-aware", "round-robin"] = "evict-aware"
    evict: bool = True


@dataclass(frozen=True)
class PlacementDecision:
    replicas: tuple[Replica, ...]  # the desired prewarmed copies: kept and added
    added: tuple[Replica, ...]
    evicted: tuple[Replica, ...]
    scores: dict[Replica, float] = field(default_factory=dict)  # every kept or added replica's score
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why wanted replicas were not placed


def shard_bytes(d: ModelDemand) -> int:
    """Bytes of one shard on one GPU, aligned up to the 2 MiB pages the worker allocates."""
    per = -(-d.weight_bytes // max(d.tp, 1))
    return -(-per // PAGE_BYTES) * PAGE_BYTES


def replica_scores(d: ModelDemand, config: PlacementConfig) -> list[float]:
    """Scores of the replicas a model wants, highest first (steps 1 and 2).

    Sorted, so a bursty model's burst replicas may come before its foundation ones; with ``pinned=k`` the
    first k are infinity (k replicas at least, even without load)."""
    b = max(config.batch_capacity, 1)
    n_found = max(math.ceil(max(d.avg, 0.0) / b) - d.running, 0)
    n_burst = max(math.ceil(max(d.peak, 0.0) / b) - d.running - n_found, 0)
    n = n_found + n_burst
    t = shard_bytes(d) / config.h2d_bytes_per_s
    if d.avg > 0:
        burst = min(max(d.peak / d.avg, 1.0), 100.0)
    else:
        burst = 100.0 if d.peak > 0 else 1.0
    scores = [math.exp(-i / n) * t for i in range(n_found)]
    scores += [math.exp(-(n_found + i) / n) * t * burst for i in range(n_burst)]
    scores.sort(reverse=True)
    pinned = max(d.pinned, 0)
    if pinned > len(scores):
        scores += [0.0] * (pinned - len(scores))
    for i in range(pinned):
        scores[i] = _INF
    return scores


# ---------------------------------------------------------------------------------------------------------
# Internals. A node's GPUs are numbered 0..size-1 in (index, gpu_id) order; a group is a bitmask of those
# positions. Nesting between masks A and B holds when A & B is 0, A or B (equal TP: A == B).

_INF = math.inf
_NEG_INF = -math.inf


class _Copy:
    """One prewarmed copy on one node's GPUs (existing, or placed in this round)."""

    __slots__ = ("model", "node", "mask", "pos", "score", "shard", "pinned", "wanted", "existing", "replica",
                 "key")

    def __init__(self, model, node, pos, score, shard, wanted, existing, replica):
        self.model = model
        self.node = node
        self.pos = pos  # sorted positions on the node
        self.mask = sum(1 << p for p in pos)
        self.score = score
        self.shard = shard
        self.pinned = score == _INF
        self.wanted = wanted  # one of the replicas its model wants (an evicted one is placed again if it can)
        self.existing = existing
        self.replica = replica
        self.key = (score, node.i, pos, model)  # lowest first when choosing what to evict


class _Node:
    __slots__ = ("i", "name", "size", "ids", "free", "by_pos", "copies", "model_mask", "fdesc", "cands",
                 "plans", "_aggs", "_evinfo")

    def __init__(self, i, name, gpus):
        self.i = i
        self.name = name
        self.size = len(gpus)
        self.ids = [g.gpu_id for g in gpus]
        self.free = [g.capacity_bytes for g in gpus]
        self.by_pos = [[] for _ in gpus]
        self.copies = []
        self.model_mask = {}  # model -> positions holding a copy of it
        self.fdesc = sorted(self.free, reverse=True)
        self.cands = {}  # (tp, shard) -> (sorted candidate groups, their lowest max overlapped score)
        self.plans = {}  # (tp, shard, the model's GPUs) -> (score bound, cheapest eviction plan below it)
        self._aggs = None
        self._evinfo = None

    def _changed(self):
        self.fdesc = sorted(self.free, reverse=True)
        self.cands = {}
        self.plans = {}
        self._aggs = None
        self._evinfo = None

    def add(self, c: _Copy):
        for p in c.pos:
            self.free[p] -= c.shard
            self.by_pos[p].append(c)
        self.copies.append(c)
        self.model_mask[c.model] = self.model_mask.get(c.model, 0) | c.mask
        self._changed()

    def remove(self, c: _Copy):
        for p in c.pos:
            self.free[p] += c.shard
            self.by_pos[p].remove(c)
        self.copies.remove(c)
        left = self.model_mask[c.model] & ~c.mask
        if left:
            self.model_mask[c.model] = left
        else:
            del self.model_mask[c.model]
        self._changed()

    def aggs(self):
        """Copies grouped by their mask: [(mask, score sum, max score, copies)]."""
        if self._aggs is None:
            by = {}
            for c in self.copies:
                a = by.get(c.mask)
                if a is None:
                    by[c.mask] = [c.mask, c.score, c.score, [c]]
                else:
                    a[1] += c.score
                    if c.score > a[2]:
                        a[2] = c.score
                    a[3].append(c)
            self._aggs = list(by.values())
        return self._aggs

    def candidates(self, tp: int, shard: int):
        """Nesting-valid groups of tp GPUs with a shard's room, sorted by overlapped score sum then GPU order.

        Entries are (sum, mask, max overlapped score, positions); the model's own GPUs are filtered later."""
        key = (tp, shard)
        got = self.cands.get(key)
        if got is not None:
            return got
        fit = [p for p in range(self.size) if self.free[p] >= shard]
        out = []
        if len(fit) >= tp:
            if tp == 1:
                for p in fit:
                    cs = self.by_pos[p]
                    if cs:
                        s = 0.0
                        mx = _NEG_INF
                        for c in cs:
                            s += c.score
                            if c.score > mx:
                                mx = c.score
                        out.append((s, 1 << p, mx, (p,)))
                    else:
                        out.append((0.0, 1 << p, _NEG_INF, (p,)))
            else:
                aggs = self.aggs()
                for combo in combinations(fit, tp):
                    g = 0
                    for p in combo:
                        g |= 1 << p
                    s = 0.0
                    mx = _NEG_INF
                    for m, ms, mm, _ in aggs:
                        inter = m & g
                        if inter:
                            if inter != m and inter != g:
                                break
                            s += ms
                            if mm > mx:
                                mx = mm
                    else:
                        out.append((s, g, mx, combo))
            out.sort(key=_first)  # stable: equal sums stay in GPU order
        got = (out, min((e[2] for e in out), default=_INF))
        self.cands[key] = got
        return got

    def evinfo(self):
        """Per position: unpinned copies lowest-scored first, the lowest unpinned score, their bytes."""
        if self._evinfo is None:
            order, low, nbytes = [], [], []
            for cs in self.by_pos:
                un = sorted((c for c in cs if not c.pinned), key=_key)
                order.append(un)
                low.append(un[0].score if un else _INF)
                nbytes.append(sum(c.shard for c in un))
            self._evinfo = (order, low, nbytes)
        return self._evinfo


def _node_plan(node: _Node, tp: int, shard: int, excl: int, limit: float):
    """The node's group of tp GPUs whose required evictions have the smallest score sum below limit.

    Evicted: copies that break nesting with the group, then the lowest-scored unpinned copies on GPUs of
    the group still short of room, one at a time, until every GPU has room. Returns (sum, node, positions,
    copies) or None."""
    order, low, nbytes = node.evinfo()
    free = node.free
    lb = [_INF] * node.size  # the least a group with this GPU pays
    usable = []
    for p in range(node.size):
        if excl >> p & 1:
            continue
        if free[p] >= shard:
            lb[p] = 0.0
        elif free[p] + nbytes[p] >= shard and low[p] < limit:
            lb[p] = low[p]  # at least one copy here has to go
        else:
            continue
        usable.append(p)
    if len(usable) < tp or sorted(lb[p] for p in usable)[tp - 1] >= limit:
        return None
    aggs = node.aggs()
    best = None
    for combo in combinations(usable, tp):
        g = 0
        bound = 0.0
        for p in combo:
            g |= 1 << p
            if lb[p] > bound:
                bound = lb[p]
        if bound >= limit:
            continue
        victims = []
        total = 0.0
        ok = True
        for m, _, _, cs in aggs:  # copies that break nesting with the group
            inter = m & g
            if inter and inter != m and inter != g:
                for c in cs:
                    if c.pinned:
                        ok = False
                        break
                    victims.append(c)
                    total += c.score
                if not ok or total >= limit:
                    ok = False
                    break
        if not ok:
            continue
        room = {p: free[p] for p in combo}
        for c in victims:
            for p in c.pos:
                if p in room:
                    room[p] += c.shard
        lacking = [p for p in combo if room[p] < shard]
        while lacking:
            pick = None
            for p in lacking:
                for c in order[p]:
                    if c not in victims:
                        if pick is None or c.key < pick.key:
                            pick = c
                        break
            if pick is None:
                ok = False
                break
            victims.append(pick)
            total += pick.score
            if total >= limit:
                ok = False
                break
            for p in pick.pos:
                if p in room:
                    room[p] += pick.shard
            lacking = [p for p in lacking if room[p] < shard]
        if ok:
            best = (total, node, combo, victims)
            limit = total
            if total <= 0.0:
                break
    return best


def _first(e):
    return e[0]


def _key(c):
    return c.key


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


class _Round:
    """One placement round: the cluster state and the bookkeeping behind a PlacementDecision."""

    def __init__(self, demands, gpus, config):
        self.config = config
        self.demand = {}
        self.order = []  # models in the order given
        for d in demands:
            if d.model not in self.demand:
                self.demand[d.model] = d
                self.order.append(d.model)
        self.scores = {m: replica_scores(d, config) for m, d in self.demand.items()}
        self.shard = {m: shard_bytes(d) for m, d in self.demand.items()}
        self.tp = {m: max(d.tp, 1) for m, d in self.demand.items()}
        by_node = {}
        seen = set()
        for g in gpus:
            if g.gpu_id not in seen:
                seen.add(g.gpu_id)
                by_node.setdefault(g.node, []).append(g)
        self.nodes = []
        self.where = {}  # gpu_id -> (node, position)
        for i, name in enumerate(sorted(by_node)):
            node = _Node(i, name, sorted(by_node[name], key=lambda g: (g.index, g.gpu_id)))
            self.nodes.append(node)
            for p, gid in enumerate(node.ids):
                self.where[gid] = (node, p)
        self.max_size = max((n.size for n in self.nodes), default=0)
        # scores of the wanted replicas not placed yet, highest first
        self.pending = {m: list(self.scores[m]) for m in self.order}
        self.added = []
        self.evicted = []
        self.evicted_at = {}  # (model, node, positions) of an evicted existing copy -> its replica
        self.reason = {}
        self.heap = []
        self.parked = {}  # model -> len(evict_log) when it last failed everywhere
        self.evict_log = []  # node of each eviction in step 5

    # -- existing copies and capacity -------------------------------------------------------------------

    def load_existing(self, existing):
        valid = {}
        seen = set()
        for r in sorted(existing, key=lambda r: (r.model, r.gpus)):  # input order does not matter
            if r in seen:
                continue
            seen.add(r)
            locs = [self.where.get(g) for g in r.gpus]
            ok = bool(locs) and None not in locs and len({id(n) for n, _ in locs}) == 1 \
                and len({p for _, p in locs}) == len(locs) \
                and (r.model not in self.demand or len(locs) == self.tp[r.model])
            if not ok:  # a GPU that is gone, a group across nodes, or a TP that no longer matches
                self.evicted.append(r)
                continue
            node = locs[0][0]
            valid.setdefault(r.model, []).append((node.i, tuple(sorted(p for _, p in locs)), r))
        for model in sorted(valid):
            scores = self.scores.get(model, [])
            shard = self.shard.get(model, 0)  # a model without a demand: its size is unknown, counted as 0
            k = 0
            for ni, pos, r in sorted(valid[model], key=lambda v: (v[0], v[1])):
                node = self.nodes[ni]
                mask = sum(1 << p for p in pos)
                if node.model_mask.get(model, 0) & mask:  # a second copy of the model on a GPU
                    self.evicted.append(r)
                    continue
                score = scores[k] if k < len(scores) else 0.0
                node.add(_Copy(model, node, pos, score, shard, k < len(scores), True, r))
                k += 1
            if model in self.pending:
                self.pending[model] = scores[k:]

    def shrink(self):
        """Capacity below what existing copies use: evict the lowest-scored unpinned copies there."""
        for node in self.nodes:
            for p in range(node.size):
                while node.free[p] < 0:
                    un = [c for c in node.by_pos[p] if not c.pinned]
                    if not un:
                        break
                    self._evict(min(un, key=_key))

    def _evict(self, c: _Copy):
        c.node.remove(c)
        if c.existing:
            self.evicted.append(c.replica)
            self.evicted_at[(c.model, c.node.i, c.pos)] = c.replica
        else:
            self.added.remove(c)
        if c.wanted and c.model in self.pending:
            pend = self.pending[c.model]
            pend.append(c.score)
            pend.sort(reverse=True)
            heapq.heappush(self.heap, (-c.score, c.model))
            self.parked.pop(c.model, None)

    def _add(self, model, node, pos, score):
        rep = Replica(model, tuple(node.ids[p] for p in pos))
        c = _Copy(model, node, pos, score, self.shard[model], True, False, rep)
        node.add(c)
        self.added.append(c)

    # -- evict-aware (steps 3-5) ------------------------------------------------------------------------

    def greedy(self):
        self.heap = [(-s, m) for m in self.order for s in self.pending[m]]
        heapq.heapify(self.heap)
        evict = self.config.evict
        while self.heap:
            _, m = heapq.heappop(self.heap)
            pend = self.pending[m]
            if not pend:
                continue
            s = pend[0]
            since = self.parked.get(m)
            if since is None:
                nodes = self.nodes
            else:  # it failed everywhere before: only nodes where evictions freed memory can have changed
                changed = set(self.evict_log[since:])
                if not changed:
                    continue
                nodes = [self.nodes[i] for i in sorted(changed)]
            got = self._fit(m, s, nodes)
            if got is not None:
                self._add(m, got[0], got[1], s)
                pend.pop(0)
                continue
            if evict:
                plan = self._eviction(m, s, nodes)
                if plan is not None:
                    node, pos, victims = plan
                    for c in victims:
                        self._evict(c)
                    self._add(m, node, pos, s)
                    pend.pop(0)
                    self.evict_log.append(node.i)
                    self._after_eviction(node)
                    continue
            self.parked[m] = len(self.evict_log)
            if m not in self.reason:
                self.reason[m] = self._why(m)

    def _after_eviction(self, node):
        """Memory an eviction left over may now fit a model that failed: give it another try there."""
        for m in list(self.parked):
            pend = self.pending[m]
            if pend and self._fit(m, pend[0], (node,)) is not None:
                heapq.heappush(self.heap, (-pend[0], m))

    def _fit(self, model, s, nodes):
        """Step 4: the best group with room and valid nesting, or None."""
        tp, shard = self.tp[model], self.shard[model]
        best0 = best1 = None  # (sum, node, entry): the new replica top-scored there / any
        key = (tp, shard)
        for node in nodes:
            if node.size < tp or node.fdesc[tp - 1] < shard:
                continue
            got = node.cands.get(key)
            entries, lowmax = got if got is not None else node.candidates(tp, shard)
            if not entries:
                continue
            maybe0 = lowmax < s
            if best0 is not None:
                if not maybe0 or entries[0][0] >= best0[0]:
                    continue
            elif not maybe0 and best1 is not None and entries[0][0] >= best1[0]:
                continue
            excl = node.model_mask.get(model, 0)
            first = True
            for e in entries:
                if e[1] & excl:
                    continue
                if first:
                    first = False
                    if best1 is None or e[0] < best1[0]:
                        best1 = (e[0], node, e)
                    if not maybe0:
                        break
                if e[2] < s:
                    if best0 is None or e[0] < best0[0]:
                        best0 = (e[0], node, e)
                    break
                if best0 is not None and e[0] >= best0[0]:
                    break
            if best0 is not None and best0[0] <= 0.0:
                break  # nothing later can beat a free group on an earlier node
        best = best0 if best0 is not None else best1
        return None if best is None else (best[1], best[2][3])

    def _eviction(self, model, s, nodes):
        """Step 5: the group whose required evictions have the smallest score sum, if below s."""
        tp, shard = self.tp[model], self.shard[model]
        best = None
        for node in nodes:
            if node.size < tp:
                continue
            key = (tp, shard, node.model_mask.get(model, 0))
            got = node.plans.get(key)
            if got is None or s > got[0]:
                # a node's cheapest plan does not depend on s; s only bounds the search, so the answer
                # holds for any later query with a score up to this one until the node changes
                got = (s, _node_plan(node, tp, shard, key[2], s))
                node.plans[key] = got
            plan = got[1]
            if plan is not None and plan[0] < s and (best is None or plan[0] < best[0]):
                best = plan
                if plan[0] <= 0.0:
                    break
        return None if best is None else best[1:]

    def _why(self, model) -> str:
        tp, shard = self.tp[model], self.shard[model]
        if tp > self.max_size:
            return f"needs {tp} GPU{'s' if tp > 1 else ''} on one node; the largest node has {self.max_size}"
        room = any(n.size >= tp and n.fdesc[tp - 1] >= shard for n in self.nodes)
        what = f"group of {tp} GPUs" if tp > 1 else "GPU"
        if not room:
            why = f"no {what} with {_gb(shard)} free" + (" on one node" if tp > 1 else "")
        elif self.config.strategy == "round-robin":
            why = f"every {what} with {_gb(shard)} free already holds a copy of it"
        else:
            why = f"every {what} with {_gb(shard)} free already holds a copy of it or breaks TP nesting"
        if self.config.strategy == "round-robin":
            return why + " (round-robin: no eviction)"
        if not self.config.evict:
            return why + " (eviction is off)"
        return why + "; evicting room would cost at least its score or a pinned copy"

    # -- round-robin ablation ---------------------------------------------------------------------------

    def round_robin(self):
        start = {}  # (tp, shard) -> first node that may still have room (memory only shrinks here)
        active = [m for m in self.order if self.pending[m]]
        while active:
            nxt = []
            for m in active:
                tp, shard = self.tp[m], self.shard[m]
                key = (tp, shard)
                i = start.get(key, 0)
                got = None
                for node in self.nodes[i:]:
                    if node.size < tp or node.fdesc[tp - 1] < shard:
                        if node.i == i:
                            i += 1
                        continue
                    excl = node.model_mask.get(m, 0)
                    fit = [p for p in range(node.size) if node.free[p] >= shard and not excl >> p & 1]
                    if len(fit) >= tp:
                        got = (node, tuple(fit[:tp]))
                        break
                start[key] = i
                if got is None:
                    self.reason[m] = self._why(m)
                    continue
                self._add(m, got[0], got[1], self.pending[m].pop(0))
                if self.pending[m]:
                    nxt.append(m)
            active = nxt

    # -- the decision -----------------------------------------------------------------------------------

    def decision(self) -> PlacementDecision:
        # an existing copy evicted and then placed again on the same GPUs was kept after all
        returned = {}
        for c in self.added:
            orig = self.evicted_at.get((c.model, c.node.i, c.pos))
            if orig is not None:
                c.replica = orig
                returned[id(c)] = orig
        added = [c.replica for c in self.added if id(c) not in returned]
        kept = set(returned.values())
        evicted = [r for r in self.evicted if r not in kept]
        alive = sorted((c for n in self.nodes for c in n.copies), key=lambda c: (c.node.i, c.pos, c.model))
        per_model = {}
        for c in alive:
            per_model.setdefault(c.model, []).append(c)
        scores = {}
        skipped = {}
        for m, cs in per_model.items():  # the scores the next round will give these copies: GPU order
            want = self.scores.get(m, [])
            for k, c in enumerate(cs):
                scores[c.replica] = want[k] if k < len(want) else 0.0
        for m in self.order:
            want = len(self.scores[m])
            missing = want - len(per_model.get(m, ()))
            if missing > 0:
                skipped[m] = f"{missing} of {want} replicas: {self.reason.get(m, 'not placed')}"
        return PlacementDecision(replicas=tuple(c.replica for c in alive), added=tuple(added),
                                 evicted=tuple(evicted), scores=scores, skipped=skipped)


def place(demands: Sequence[ModelDemand], gpus: Sequence[Gpu], existing: Sequence[Replica],
          config: PlacementConfig = PlacementConfig()) -> PlacementDecision:
    """The desired prewarmed copies given forecasts, the cluster and the copies that exist (steps 3-5)."""
    if config.strategy not in ("evict-aware", "round-robin"):
        raise ValueError(f"unknown placement strategy {config.strategy!r}")
    r = _Round(demands, gpus, config)
    r.load_existing(existing)
    r.shrink()
    if config.strategy == "round-robin":
        r.round_robin()
    else:
        r.greedy()
    return r.decision()
