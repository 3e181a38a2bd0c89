"""Admission's decisions, free of I/O: the gateway (``admission.py``) and the simulator both drive it.

- **Route.** A request goes to the least-loaded active instance with room. The load is the instance's
  in-flight requests as its worker last reported them, minus the ones this gateway has sent since (they are
  counted exactly, from ``pending``), so a burst between two heartbeats spreads out.
- **Queue.** A request no active instance has room for waits in a bounded per-model queue.
- **Asks.** The orchestrator is asked for an instance once per model at a time; after a failed ask not
  again before a growing delay (0.5 s doubling to 8 s), so waiters cannot storm it. A successful ask resets
  the delay.
- **Labels.** A request that waited is served ``warm`` by an instance that already existed when it started
  waiting, else by how the new instance was made: the ask's reply says so for instances we asked for; the
  worker's report (``made``) for one the autoscaler started while we waited (it can win the race with our
  own ask). With neither yet known and our ask still out, the shell waits briefly for the reply.
Time is passed in.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from shared.messages import Outcome
from shared.policy.routing import Route, pick_route

ASK_DELAY_MIN_S, ASK_DELAY_MAX_S = 0.5, 8.0
CREATED_KEPT = 4096  # instances whose making we remember (for requests still waiting on them)


class AdmissionCore:
    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.waiting: dict[str, int] = {}
        self.created: dict[str, Outcome] = {}  # instance -> how it was made (for the requests that waited)
        self.asking: set[str] = set()  # models with an ask out
        self.next_ask_s: dict[str, float] = {}
        self.ask_delay_s: dict[str, float] = {}
        self.pending: dict[str, int] = {}  # instance -> requests this gateway sent that have not finished

    # ---- routes ------------------------------------------------------------------------------------------

    def choose_route(self, routes: Sequence[Route], exclude: Collection[str] = ()) -> Route | None:
        """The least-loaded of ``routes`` with room (``exclude``: instances this request has tried)."""
        candidates = [r for r in routes if r.instance_id not in exclude]
        # a worker's report already counts (most of) our pending requests: subtract them so the load is
        # "others' requests as last reported + ours exactly"
        others = [replace(r, in_flight=max(r.in_flight - self.pending.get(r.instance_id, 0), 0)) for r in candidates]
        return pick_route(others, self.pending)

    def started(self, route: Route) -> None:
        self.pending[route.instance_id] = self.pending.get(route.instance_id, 0) + 1

    def finished(self, route: Route) -> None:
        left = self.pending.get(route.instance_id, 0) - 1
        if left > 0:
            self.pending[route.instance_id] = left
        else:
            self.pending.pop(route.instance_id, None)

    # ---- the queue ------------------------------------------------------------------------------------

    def queue_full(self, model: str) -> bool:
        return self.waiting.get(model, 0) >= self.queue_size

    def enter(self, model: str, delta: int) -> int:
        n = self.waiting.get(model, 0) + delta
        if n:
            self.waiting[model] = n
        else:
            self.waiting.pop(model, None)
        return n

    # ---- asks --------------------------------------------------------------------------------------------

    def should_ask(self, model: str, now_s: float) -> bool:
        """Whether to ask for an instance now; if so the ask counts as out until ``on_reply``."""
        if model in self.asking or now_s < self.next_ask_s.get(model, float("-inf")):
            return False
        self.asking.add(model)
        self.next_ask_s[model] = now_s + self.ask_delay_s.get(model, ASK_DELAY_MIN_S)
        return True

    def on_reply(self, model: str, ok: bool, instance_id: str | None = None, outcome: Outcome | None = None) -> None:
        self.asking.discard(model)
        delay = self.ask_delay_s.get(model, ASK_DELAY_MIN_S)
        self.ask_delay_s[model] = ASK_DELAY_MIN_S if ok else min(delay * 2, ASK_DELAY_MAX_S)
        if ok and instance_id and outcome:
            self.created[instance_id] = outcome
            while len(self.created) > CREATED_KEPT:
                self.created.pop(next(iter(self.created)))

    # ---- labels ------------------------------------------------------------------------------------------

    def label(self, model: str, instance_id: str, existing: Collection[str], made: Outcome | None,
              *, waited_for_reply: bool = False) -> Outcome | None:
        """How a request that waited found ``instance_id``. None: ask the reply first (at most once)."""
        if instance_id in existing:
            return Outcome.WARM
        known = self.created.get(instance_id) or made
        if known is None and model in self.asking and not waited_for_reply:
            return None
        return known or Outcome.WARM
