"""``warmserve worker|prewarm|placement ...``: operator commands over the admin subjects, as tables."""

from __future__ import annotations

import asyncio
import json
import time


def _admin(verb: str, args: dict):
    from tooling.cli.client import _admin as request

    return asyncio.run(request(verb, args))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def cmd_worker(a) -> int:
    if a.action == "drain":
        hold = _admin("worker-drain", {"worker_id": a.worker_id, "reason": a.reason})
        print(f"worker {hold['target']} drained: its instances finish their requests and stop, its prewarmed "
              f"copies are evicted, nothing new is placed there (undo: warmserve worker undrain {a.worker_id})")
        if a.wait:
            return _wait_empty(a.worker_id, a.wait)
    else:
        _admin("worker-undrain", {"worker_id": a.worker_id})
        print(f"worker {a.worker_id} is back in service")
    return 0


def _wait_empty(worker_id: str, timeout_s: float) -> int:
    """Progress until the drained worker holds nothing (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        w = next((w for w in _admin("worker-list", {}) if w["worker_id"] == worker_id), None)
        copies = w["copies"] if w else []
        in_flight = sum(c["in_flight"] for c in copies)
        print(f"  {worker_id}: {len(copies)} cop{'y' if len(copies) == 1 else 'ies'}, {in_flight} request(s) in flight"
              + ("" if w else " (not heartbeating)"), flush=True)
        if not copies:
            print(f"{worker_id} is empty")
            return 0
        if time.monotonic() > deadline:
            print(f"{worker_id} still holds {', '.join(c['model'] + ':' + c['state'] for c in copies)} after "
                  f"{timeout_s:g} s")
            return 1
        time.sleep(1.0)


def cmd_prewarm(a) -> int:
    if a.action == "pin":
        hold = _admin("prewarm-pin", {"slug": a.slug, "copies": a.copies, "reason": a.reason})
        print(f"{hold['target']}: {hold['copies']} prewarmed cop{'y' if hold['copies'] == 1 else 'ies'} kept "
              "whatever the forecast")
    elif a.action == "unpin":
        _admin("prewarm-unpin", {"slug": a.slug})
        print(f"{a.slug}: placement follows the forecast again")
    else:
        holds = _admin("hold-list", {})
        if a.json:
            print(json.dumps(holds, indent=2))
        elif not holds:
            print("no drained workers and no pinned models")
        for h in holds:
            what = f"pin {h['copies']}" if h["kind"] == "pin" else "drain"
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["at_s"]))
            print(f"{what:8s} {h['target']:24s} since {since}  {h['reason']}")
    return 0


def cmd_placement(a) -> int:
    if a.action == "history":
        rows = _admin("placement-history", {"limit": a.limit})
        if a.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            inputs = r["inputs"]
            copies = ", ".join(f"{c['model']}@{c['worker_id']}" for c in r["prewarm_set"]) or "nothing"
            changes = [f"+{x}" for x in inputs.get("added", [])] + [f"-{x}" for x in inputs.get("evicted", [])]
            print(f"{r['created_at'][:19]}  {r['plan_id'][:8]}  {copies}" + (f"  ({' '.join(changes)})" if changes else ""))
        return 0
    show = _admin("placement-show", {})
    if a.json:
        print(json.dumps(show, indent=2))
        return 0
    inputs = show.get("inputs", {})
    if not show.get("plan_id"):
        print("no plan yet (is placement running with workers registered?)")
        return 0
    print(f"plan {show['plan_id'][:8]} ({inputs.get('strategy')}, evict={inputs.get('evict')}, "
          f"B={inputs.get('batch_capacity')})")
    print(f"{'model':24s} {'avg':>7s} {'peak':>7s} {'running':>7s} {'GiB':>6s}  copies (score)")
    scores = inputs.get("scores", {})
    by_model: dict[str, list[str]] = {}
    for c in show["copies"]:
        key = f"{c['model']}@{c['worker_id']}"
        by_model.setdefault(c["model"], []).append(f"{c['worker_id']} ({scores.get(key, '-')})")
    for model, d in sorted(inputs.get("demand", {}).items()):
        pin = f" pinned {d['pinned']}" if d.get("pinned") else ""
        print(f"{model:24s} {d['avg']:7.2f} {d['peak_upper']:7.2f} {d['running']:7d} {_gib(d['weight_bytes']):>6s}  "
              f"{', '.join(by_model.get(model, [])) or '-'}{pin}")
    for model, why in sorted(inputs.get("skipped", {}).items()):
        print(f"  skipped {model}: {why}")
    return 0


def add_parsers(sub) -> None:
    wk = sub.add_parser("worker", help="take a worker out of service and back (drain / undrain)")
    wsub = wk.add_subparsers(dest="action", required=True)
    dr = wsub.add_parser("drain", help="stop placing work there; drain its instances; evict its copies")
    dr.add_argument("worker_id")
    dr.add_argument("--reason", default="")
    dr.add_argument("--wait", type=float, nargs="?", const=120.0, metavar="SECONDS",
                    help="show progress until the worker holds nothing (default at most 120 s)")
    wsub.add_parser("undrain", help="put a drained worker back in service").add_argument("worker_id")
    wk.set_defaults(func=cmd_worker)

    pw = sub.add_parser("prewarm", help="pin a model prewarmed regardless of its forecast, unpin, list holds")
    psub = pw.add_subparsers(dest="action", required=True)
    pin = psub.add_parser("pin", help="keep COPIES prewarmed copies of a model (never evicted)")
    pin.add_argument("slug")
    pin.add_argument("--copies", type=int, default=1)
    pin.add_argument("--reason", default="")
    psub.add_parser("unpin", help="let the forecast decide again").add_argument("slug")
    ls = psub.add_parser("list", help="pinned models and drained workers")
    ls.add_argument("--json", action="store_true")
    pw.set_defaults(func=cmd_prewarm)

    pl = sub.add_parser("placement", help="the plan in force (show) and its history")
    plsub = pl.add_subparsers(dest="action", required=True)
    shw = plsub.add_parser("show", help="planned copies with their scores, demand per model, skipped models")
    shw.add_argument("--json", action="store_true")
    hist = plsub.add_parser("history", help="recent plans from Postgres, with what each added and evicted")
    hist.add_argument("--limit", type=int, default=10)
    hist.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_placement)
