"""``warmserve``: run the local cluster, run one service, and manage a cluster over NATS admin."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from tooling.cli.client import _admin, _cluster_file, _gateway_url, _nats_url

SERVICE_MODULES = {
    "gateway": "services.gateway.main", "forecaster": "services.forecaster.main",
    "placement": "services.placement.main", "prewarm-orchestrator": "services.prewarm_orchestrator.main",
    "gpu-worker": "services.gpu_worker.main",
}


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_up(a) -> int:
    from tooling.localcluster.up import up
    from shared.settings import LocalClusterSettings, load_settings

    overrides = {k: v for k, v in {"state_dir": a.state_dir, "workers": a.workers, "engine": a.engine,
                                   "gateway_port": a.gateway_port}.items() if v is not None}
    settings = load_settings(LocalClusterSettings, **overrides)
    return up(settings, smoke=not a.no_smoke, exit_after_smoke=a.exit_after_smoke)


def cmd_service(a) -> int:
    import importlib

    sys.argv = [f"warmserve service {a.name}"]  # a service's main parses its own options, not this CLI's
    importlib.import_module(SERVICE_MODULES[a.name]).main()
    return 0


def cmd_migrate(a) -> int:
    from shared.db.migrate import upgrade
    from shared.db.roles import ensure_login
    from shared.settings import MigrateSettings, load_settings

    settings = load_settings(MigrateSettings)
    upgrade(settings.database_url)
    print("database at the latest schema")
    for service, password in settings.db_passwords().items():
        ensure_login(settings.database_url, service, password)
        print(f"database user of {service} ready (WARMSERVE_DB_{service.upper()}_PASSWORD)")
    return 0


def cmd_demo_model(a) -> int:
    from tooling.localcluster.up import DEMO_MODEL, ensure_demo_model
    from shared.settings import DatabaseSettings, load_settings

    path = asyncio.run(ensure_demo_model(load_settings(DatabaseSettings).database_url, a.path))
    print(f"model '{DEMO_MODEL}' at {path} is in the catalog")
    return 0


def cmd_settings_doc(a) -> int:
    from shared.settings_doc import render

    print(render(), end="")
    return 0


def _tool_parser_arg(value: str) -> str:
    """``--tool-parser``: refused here, before NATS, if it cannot be a parser's name (whether vLLM has it is
    known only to the workers)."""
    from shared.admin import check_tool_parser

    try:
        return check_tool_parser(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tool_parser_choice(a) -> dict:
    """``--tool-parser NAME`` / ``--no-tool-parser`` as admin arguments; neither: nothing sent."""
    if a.no_tool_parser:
        return {"tool_parser": None}
    return {"tool_parser": a.tool_parser} if a.tool_parser else {}


def cmd_model(a) -> int:
    if a.action == "make-tiny":
        from shared.model_folder import weight_bytes
        from tooling.modelgen import SIZES, create_tiny_llama

        state = Path(os.environ.get("WARMSERVE_STATE_DIR", ".warmserve"))
        path = create_tiny_llama((a.dir or state / "models") / a.slug, SIZES[a.size], seed=a.seed)
        print(f"created {path} ({SIZES[a.size].parameters / 1e6:.0f}M parameters, "
              f"{weight_bytes(path) / 2**20:.0f} MiB)", flush=True)
        if not a.no_register:
            _print(asyncio.run(_admin("model-register", {"slug": a.slug, "path": str(path.resolve())})))
        return 0
    if a.action in ("register", "add"):
        args = {"slug": a.slug, "path": str(Path(a.path).resolve()), "tensor_parallel_size": a.tp}
        if a.max_context:
            args["max_context_tokens"] = a.max_context
        if a.parameter_bytes:
            args["parameter_bytes"] = a.parameter_bytes
        _print(asyncio.run(_admin("model-register", args | _tool_parser_choice(a))))
    elif a.action == "update":
        _print(asyncio.run(_admin("model-update", {"slug": a.slug} | _tool_parser_choice(a))))
    elif a.action == "show":
        found = [m for m in asyncio.run(_admin("model-list", {})) if m["slug"] == a.slug]
        if not found:
            sys.exit(f"error (not_found): no model {a.slug!r} in the catalog")
        _print(found[0])
    elif a.action == "list":
        models = asyncio.run(_admin("model-list", {}))
        if a.json:
            _print(models)
            return 0
        print(f"{'model':24s} {'status':9s} {'TP':>3s} {'GiB':>7s} {'context':>8s} {'tool parser':16s}  path")
        for m in models:
            print(f"{m['slug']:24s} {m['status']:9s} {m['tensor_parallel_size']:3d} "
                  f"{m['parameter_bytes'] / 2**30:7.2f} {m['max_context_tokens']:8d} "
                  f"{m.get('tool_parser') or '-':16s}  {m['path']}")
    else:
        _print(asyncio.run(_admin("model-remove", {"slug": a.slug})))
    return 0


def cmd_key(a) -> int:
    if a.action == "create":
        args = ({"name": a.name} | ({"rate_limit_rps": a.rps} if a.rps else {})
                | ({"max_concurrency": a.max_concurrency} if a.max_concurrency else {}))
        _print(asyncio.run(_admin("key-create", args)))
    elif a.action == "list":
        _print(asyncio.run(_admin("key-list", {})))
    else:
        _print(asyncio.run(_admin(f"key-{a.action}", {"name": a.name})))
    return 0


def _api_key() -> str:
    return os.environ.get("OPENAI_API_KEY") or _cluster_file().get("api_key") or "none"


def cmd_workers(a) -> int:
    workers = asyncio.run(_admin("worker-list", {}))
    if a.json:
        _print(workers)
        return 0
    if not workers:
        print("no live workers")
    for w in workers:
        used = w["weight_bytes"] + w["kv_bytes"]
        print(f"{w['worker_id']}  {w['node']}  {w['device']}  engine={w['engine']}  "
              f"memory {used / 2**20:.0f}/{w['memory_budget_bytes'] / 2**20:.0f} MiB "
              f"(weights {w['weight_bytes'] / 2**20:.0f}, kv {w['kv_bytes'] / 2**20:.0f})")
        for c in w["copies"]:
            inst = f" instance={c['instance_id']} in_flight={c['in_flight']}" if c.get("instance_id") else ""
            print(f"    {c['model']:<24} {c['state']:<10} {c['weight_bytes'] / 2**20:.0f} MiB{inst}")
    return 0


def cmd_placement(a) -> int:
    _print(asyncio.run(_admin("placement-history", {"limit": a.limit})))
    return 0


def cmd_chat(a) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=f"{a.base_url or _gateway_url()}/v1", api_key=_api_key())
    messages = [{"role": "user", "content": a.message}]
    if a.stream:
        for chunk in client.chat.completions.create(model=a.model, messages=messages, max_tokens=a.max_tokens,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    else:
        resp = client.chat.completions.create(model=a.model, messages=messages, max_tokens=a.max_tokens)
        print(resp.choices[0].message.content)
    return 0


def _tool_parser_flags(parser: argparse.ArgumentParser, more: str, required: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--tool-parser", metavar="NAME", type=_tool_parser_arg,
                       help="vLLM's tool-call parser for tool_choice \"auto\" (e.g. hermes, llama3_json); an "
                            "unknown name is reported by the worker when a request needs it" + more)
    group.add_argument("--no-tool-parser", action="store_true",
                       help="clear it: the model has no tool parser for tool_choice \"auto\"")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warmserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local cluster (embedded NATS and Postgres, all services)")
    up.add_argument("--state-dir", type=Path, help="where NATS, Postgres, models and logs live (.warmserve)")
    up.add_argument("--workers", type=int, help="number of workers (default 1)")
    up.add_argument("--engine", choices=["auto", "sim", "vllm"], help="worker engine (default auto: vllm if installed)")
    up.add_argument("--gateway-port", type=int, help="HTTP port of the gateway (default 8080)")
    up.add_argument("--no-smoke", action="store_true", help="skip the smoke request once ready")
    up.add_argument("--exit-after-smoke", action="store_true", help="stop once the smoke request is answered")
    up.set_defaults(func=cmd_up)

    svc = sub.add_parser("service", help="run one service in the foreground (as in docker-compose)")
    svc.add_argument("name", choices=sorted(SERVICE_MODULES))
    svc.set_defaults(func=cmd_service)

    sub.add_parser("migrate", help="bring the database (WARMSERVE_DATABASE_URL) to the latest schema and "
                   "create the services' users whose WARMSERVE_DB_<SERVICE>_PASSWORD is set") \
        .set_defaults(func=cmd_migrate)

    sub.add_parser("settings-doc", help="print every setting as markdown (docs/configuration.md)") \
        .set_defaults(func=cmd_settings_doc)

    from tooling.cli import compose_secrets

    compose_secrets.add_parser(sub)

    demo = sub.add_parser("demo-model", help="create the demo model if missing and register it in the database")
    demo.add_argument("path", type=Path)
    demo.set_defaults(func=cmd_demo_model)

    model = sub.add_parser("model", help="manage the model catalog")
    msub = model.add_subparsers(dest="action", required=True)
    reg = msub.add_parser("register", aliases=["add"], help="add or update a model")
    reg.add_argument("slug", help="catalog id: a-z, 0-9 and '-'")
    reg.add_argument("path", help="model folder, as the workers see it")
    reg.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    reg.add_argument("--max-context", type=int, help="context length (read from config.json if omitted)")
    reg.add_argument("--parameter-bytes", type=int, help="weight bytes (read from the folder if omitted)")
    _tool_parser_flags(reg, " (neither flag: a registered model keeps its own)")
    upd = msub.add_parser("update", help="change a registered model's tool parser")
    upd.add_argument("slug")
    _tool_parser_flags(upd, "", required=True)
    tiny = msub.add_parser("make-tiny", help="create a random-weight Llama model offline and register it")
    tiny.add_argument("slug", help="catalog id: a-z, 0-9 and '-'")
    tiny.add_argument("--size", default="5m", choices=["5m", "300m"], help="5m for tests, 300m for demos")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dir", type=Path, help="parent folder (default: the state folder's models/)")
    tiny.add_argument("--no-register", action="store_true", help="only create the folder")
    msub.add_parser("list", help="list the catalog").add_argument("--json", action="store_true")
    msub.add_parser("show", help="one model's catalog entry as JSON").add_argument("slug")
    rm = msub.add_parser("remove", help="remove a model")
    rm.add_argument("slug")
    model.set_defaults(func=cmd_model)

    key = sub.add_parser("key", help="manage client API keys (only their hashes are stored)")
    ksub = key.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="create a key and print it (shown once)")
    kc.add_argument("name")
    kc.add_argument("--rps", type=float, help="its own rate limit in requests per second")
    kc.add_argument("--max-concurrency", type=int, metavar="N",
                    help="its own limit of requests in flight at once (default WARMSERVE_KEY_MAX_CONCURRENCY)")
    ksub.add_parser("list", help="list keys (names, prefixes, state)")
    for verb in ("disable", "enable"):
        ksub.add_parser(verb, help=f"{verb} a key").add_argument("name")
    key.set_defaults(func=cmd_key)

    wk = sub.add_parser("workers", help="list live workers and what each device holds")
    wk.add_argument("--json", action="store_true")
    wk.set_defaults(func=cmd_workers)

    pl = sub.add_parser("placement-history", help="recent placement plans as JSON (see also: placement history)")
    pl.add_argument("--limit", type=int, default=5)
    pl.set_defaults(func=cmd_placement)

    from tooling.cli import operator

    operator.add_parsers(sub)

    chat = sub.add_parser("chat", help="send one chat request through the gateway")
    chat.add_argument("message")
    chat.add_argument("--model", default="tiny-llama")
    chat.add_argument("--max-tokens", type=int, default=32)
    chat.add_argument("--stream", action="store_true")
    chat.add_argument("--base-url", help="gateway URL (default: the running local cluster)")
    chat.set_defaults(func=cmd_chat)

    from tooling.cli import forecast

    forecast.add_parser(sub)

    from tooling.cli import deadletters

    deadletters.add_parser(sub)

    from tooling.cli import request

    request.add_parser(sub)

    from tooling.cli import top

    top.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run a command; failures to reach the cluster become one clear line, not a traceback."""
    from shared.bus import BusError, redact

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[3:] if argv is None else argv[2:])
    try:
        sys.exit(args.func(args))
    except BusError as exc:
        hint = {"no_responders": "no service answers there; is the cluster running (warmserve up)?",
                "nats_unreachable": "is the cluster running (warmserve up), or is WARMSERVE_NATS_URL right?",
                "nats_unauthorized": "admin commands need operator credentials: WARMSERVE_NATS_URL="
                                     "nats://operator:<password>@host:port, or the local cluster's cluster.json"}
        sys.exit(f"error: {exc} (NATS {redact(_nats_url())}): {hint.get(exc.code, exc.code)}")  # no password
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        import openai

        from tooling.workload.traces import TraceFormatError

        if isinstance(exc, TraceFormatError):
            sys.exit(f"error: {exc}")

        if isinstance(exc, openai.APIConnectionError):
            sys.exit(f"error: cannot reach the gateway at {_gateway_url()}; is the cluster running (warmserve up)?")
        if isinstance(exc, openai.APIStatusError):
            sys.exit(f"error: the gateway answered {exc.status_code}: {exc.message}")
        raise


if __name__ == "__main__":
    main()
