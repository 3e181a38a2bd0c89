"""WarmServe against vLLM's own OpenAI server, side by side: same model, engine settings, machine and load.

A user moving from ``vllm serve`` to WarmServe should lose nothing per request: the target (issue 17) is TTFT
and time per output token, mean and P99, no worse than 1.2x vLLM's at 5 and 20 requests/s. Per seed it starts
each system in turn (never both at once: they would share the 2 cores), warms it, runs the same open-loop
load at each rate and stops it; the order of the systems alternates from seed to seed.

- vLLM: ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 with exactly the engine arguments
  WarmServe's worker gives its engine (built by the worker's own ``VllmEngine._engine_args`` and checked
  against vLLM's own parser of the server's flags), its engine pinned to the worker's core
  (``VLLM_CPU_OMP_THREADS_BIND``) and ``VLLM_CPU_KVCACHE_SPACE`` unset, as the worker does.
- WarmServe: ``warmserve up --engine vllm --workers 1 --no-smoke`` in a state folder of its own, the model
  made active by the warm-up requests, the load sent through the HTTP gateway. The key's rate and
  concurrency limits are raised out of the way (vLLM's server has none), and its batch capacity B is
  vLLM's server default batch (``max_num_seqs`` 128 on a CPU), which the worker passes to its engine, so both
  engines batch alike (WarmServe's own default B of 32 would queue at its gateway what vLLM batches); everything
  else is the default.
- Load: Poisson arrivals at each rate for ``--seconds``, open loop (a request is sent at its time whatever
  happened to earlier ones), the same prompts on both (``--input-tokens`` plain words, different per request;
  the tokens each system counted are reported) and exactly ``--output-tokens`` tokens out (``ignore_eos``),
  streamed with the official ``openai`` client over one connection pool, greedy.
- Per request: TTFT (to the first content token), time per output token ((end of stream - first token) /
  (tokens - 1)), inter-token latencies (gaps between SSE events carrying content), and how it ended. A
  request not served (refused, failed, cut short, timed out) counts as 999 s in every mean and percentile.
- Per system and rate: each figure's mean over the seeds with its 95% interval (Student's t), and the ratio
  WarmServe / vLLM with the 1.2x target marked.
- The client is scheduled ahead of both systems (``boost_client``): beside them on a small machine it would
  otherwise time its own wait for a core. Its event loop's lateness is kept per run to show it did not.

    .venv/bin/python -m loadtest.vs_vllm                      # 5 seeds x 2 rates x 30 s: about 25 minutes
    .venv/bin/python -m loadtest.vs_vllm --seconds 5 --seeds 1 --rates 5 --out /tmp/vs_vllm.json   # a trial
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from loadtest.replay_client import check_local, prompt_of
from loadtest.report import header, save
from loadtest.vs_vllm_stats import (
    LABEL, SYSTEMS, TARGET_RATIO, UNSERVED_S, Rec, across_seeds, arrivals, fmt_ms, markdown, pct, prompts, ratio_table,
    ratios, request_metrics, run_summary, table,
)

ROOT = Path(__file__).parents[1]
MODEL = "tiny-llama"  # the local cluster's demo model (tooling.localcluster.up.DEMO_MODEL), random weights
WARMUP_PROMPTS = 10**12  # prompt ids of the warm-up requests, apart from every seed's
VLLM_CPU_SERVER_MAX_NUM_SEQS = 128  # vLLM's default max_num_seqs for its OpenAI server on a CPU (arg_utils)


# ---- vLLM's server with the worker's engine settings -----------------------------------------------------


def _flag(name: str, value) -> list[str]:
    opt = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [opt] if value else ["--no-" + name.replace("_", "-")]
    return [opt, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]


def worker_engine(model_path: Path, kv_cache_bytes: int, batch_capacity: int | None = None):
    """What WarmServe's worker 0 gives its engine for this model: the engine arguments (the worker's own
    code builds them) and the core its engine is pinned to."""
    from services.gpu_worker.engines.vllm_engine import VllmEngine
    from shared.messages import ModelSpec
    from shared.model_folder import max_context, weight_bytes

    engine = VllmEngine("cpu:0", kv_cache_bytes, batch_capacity=batch_capacity)  # worker-0 of `warmserve up`: cpu:0
    spec = ModelSpec(slug=MODEL, path=str(model_path), parameter_bytes=weight_bytes(model_path),
                     max_context_tokens=max_context(model_path))  # as ensure_demo_model registers it
    return engine._engine_args(spec), engine._reserve_core(MODEL)


def server_flags(engine_args) -> list[str]:
    """vLLM server flags for every engine argument the worker sets away from vLLM's defaults (and the seed)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    base = AsyncEngineArgs(model=engine_args.model)
    flags = _flag("model", engine_args.model) + _flag("seed", engine_args.seed)
    for f in dataclasses.fields(engine_args):
        v = getattr(engine_args, f.name)
        if f.name not in ("model", "seed") and v != getattr(base, f.name):
            flags += _flag(f.name, v)
    return flags


def check_same_engine(flags: list[str], engine_args) -> None:
    """Parse ``flags`` with vLLM's own server parser and compare the engine arguments it makes with the
    worker's, field by field (a field both leave at their default is equal however each spells it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def parsed(argv):
        return AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(argv))

    got, base_cli = parsed(flags), parsed(["--model", engine_args.model])
    base = AsyncEngineArgs(model=engine_args.model)

    def same(name: str) -> bool:
        want, have = getattr(engine_args, name), getattr(got, name)
        return have == want or (want == getattr(base, name) and have == getattr(base_cli, name))

    bad = [f.name for f in dataclasses.fields(engine_args) if not same(f.name)]
    if bad:
        raise RuntimeError("vLLM's server would not get the worker's engine settings: "
                           + ", ".join(f"{n}={getattr(got, n)!r} (worker: {getattr(engine_args, n)!r})" for n in bad))


SERVER_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "VLLM_LOGGING_LEVEL")


def server_env(core: int | None) -> dict[str, str]:
    """The worker's engine environment: pinned to its core, KV cache sized by the argument alone."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
               PYTHONUNBUFFERED="1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    return env


class VllmServer:
    name = "vllm"

    def __init__(self, flags: list[str], env: dict[str, str], log_path: Path, start_timeout_s: float):
        self.flags, self.env, self.log_path, self.start_timeout_s = flags, env, log_path, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.command: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def models(self) -> None:
        return None  # one engine, no copies to count

    def start(self) -> tuple[str, str]:
        import httpx

        from tooling.localcluster.infra import StartError
        from tooling.localcluster.processes import die_with_parent, free_port, tail

        port = free_port()
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *self.flags,
                        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # a session of its own, as a user's terminal gives it and as `warmserve up` starts each service:
            # the scheduler then weighs it as it weighs WarmServe's services, and not with this client
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"vLLM's server exited ({self.proc.returncode}); {self.log_path} ends with:\n"
                                 f"{tail(self.log_path)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url, "none"
            except httpx.HTTPError:
                pass  # not listening yet: asked again below until the deadline
            time.sleep(0.5)
        self.stop()
        raise StartError(f"vLLM's server not healthy after {self.start_timeout_s:.0f} s (log: {self.log_path})")

    def stop(self) -> str:
        """Ctrl-C, as a user stops it; whatever of its process tree outlives it is killed."""
        import psutil

        if self.proc is None:
            return ""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=15)
        for p in alive:
            p.kill()
        self.proc = None
        return f"{len(alive)} engine processes killed after the server stopped" if alive else ""


SERVING = {"active_instances": 1, "prewarmed_copies": 0, "loading_copies": 0}  # one engine, serving


class WarmServeCluster:
    name = "warmserve"

    def __init__(self, state: Path, env: dict[str, str], start_timeout_s: float):
        self.state, self.env, self.start_timeout_s = state, env, start_timeout_s
        self.up = None

    def start(self) -> tuple[str, str]:
        from tooling.localcluster.launch import launch

        for p in self.state.glob("*"):  # a fresh cluster each time; the model folder is kept
            if p.name != "models":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.up = launch(self.state, "--engine", "vllm", "--workers", "1", "--no-smoke", extra_env=self.env,
                         timeout_s=self.start_timeout_s)
        return self.up.info["gateway_url"], self.up.info["api_key"]

    @property
    def pid(self) -> int | None:
        return self.up.proc.pid if self.up else None  # `warmserve up`: every process of the cluster is below it

    def models(self) -> dict | None:
        """The model's card on the gateway: active instances, prewarmed and loading copies."""
        import httpx

        info = self.up.info
        try:
            cards = httpx.get(f"{info['gateway_url']}/v1/models", timeout=5,
                              headers={"Authorization": f"Bearer {info['api_key']}"}).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        card = next((c for c in cards if c["id"] == MODEL), None)
        return card and {k: card.get(k) for k in ("active_instances", "prewarmed_copies", "loading_copies")}

    def stop(self) -> str:
        if self.up is None:
            return ""
        rest, self.up = self.up.stop(), None
        return "; ".join(line.strip() for line in rest.splitlines()
                         if "restarting it" in line or "keeps exiting" in line)


# ---- the client ---------------------------------------------------------------------------------------


class SurfaceError(RuntimeError):
    """A system refuses or ignores what the benchmark must send (``ignore_eos``)."""


def _request(prompt: str, output_tokens: int) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=output_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})


async def send(client, prompt: str, output_tokens: int, rec: Rec, t0: float) -> None:
    """One streamed chat completion; fills ``rec`` as it goes (a cancelled one keeps what it saw)."""
    import openai

    rec.sent_s = time.perf_counter() - t0
    try:
        stream = await client.chat.completions.create(**_request(prompt, output_tokens))
        rec.outcome = stream.response.headers.get("x-warmserve-outcome")
        async for chunk in stream:
            t = time.perf_counter() - t0
            if chunk.usage is not None:
                rec.prompt_tokens, rec.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
            for c in chunk.choices:
                if c.delta is not None and c.delta.content:
                    rec.events.append((t, c.delta.content))
                if c.finish_reason:
                    rec.finish = c.finish_reason
        rec.end, rec.error = ("ok", None) if rec.finish else ("lost", "the stream ended without a finish reason")
    except openai.APIStatusError as exc:
        rec.end, rec.error = "error", f"HTTP {exc.status_code}: {exc.message}"[:300]
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        rec.end, rec.error = "lost", f"{exc.__class__.__name__}: {exc}"[:300]
    except openai.APIError as exc:  # an error event in the stream
        rec.end, rec.error = "error", f"error event: {exc.message}"[:300]
    finally:
        rec.done_s = time.perf_counter() - t0


def client_for(url: str, key: str, timeout_s: float):
    """The official client, one connection pool, no retries (a retry would hide a failure inside a latency)."""
    import openai

    check_local(url)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout_s)


async def warm_up(url: str, key: str, n: int, output_tokens: int, input_tokens: int, system: str) -> list[Rec]:
    """``n`` unmeasured requests, one at a time, then ``n`` at once. The first is also the check that the
    system takes ``ignore_eos`` and honours it: the benchmark compares fixed-length answers and will not
    drop the parameter."""
    client = client_for(url, key, 300.0)
    recs = []
    try:
        for i in range(max(n, 1)):
            rec = Rec(at_s=0.0)
            await send(client, prompt_of(input_tokens, WARMUP_PROMPTS + i), output_tokens, rec, time.perf_counter())
            recs.append(rec)
            if i == 0:
                _check_surface(system, rec, output_tokens)
        burst = [Rec(at_s=0.0) for _ in range(n)]
        t0 = time.perf_counter()
        await asyncio.gather(*(send(client, prompt_of(input_tokens, WARMUP_PROMPTS + n + i), output_tokens, r, t0)
                               for i, r in enumerate(burst)))
        recs += burst
    finally:
        await client.close()
    return recs


def _check_surface(system: str, rec: Rec, output_tokens: int) -> None:
    if rec.end == "error" and "ignore_eos" in (rec.error or ""):
        raise SurfaceError(f"{LABEL[system]} refuses ignore_eos ({rec.error}). This benchmark compares answers of "
                           f"exactly {output_tokens} tokens on both systems and does not drop the parameter: run it "
                           "once the gateway passes vLLM's sampling extensions through (issue 17).")
    if rec.end != "ok":
        raise SurfaceError(f"{LABEL[system]}: the first warm-up request was not served ({rec.end}: {rec.error})")
    if rec.completion_tokens != output_tokens:
        raise SurfaceError(f"{LABEL[system]} took ignore_eos but answered {rec.completion_tokens} tokens of "
                           f"{output_tokens}: it does not honour the parameter")


async def loop_lag(out: list[float], every_s: float = 0.01) -> None:
    """How late this event loop wakes up: a client whose loop stalls times every request late by as much."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(every_s)
        out.append(time.perf_counter() - t - every_s)


async def run_load(url: str, key: str, at: list[float], texts: list[str], a, label: str) -> tuple[list[Rec], dict]:
    """Send one request per arrival time, open loop, and wait up to ``a.drain`` s after the last for the
    rest; what is still running then is cancelled (lost). Progress every 5 s. Returns the requests and the
    client's own figures (elapsed time, how late its event loop woke)."""
    client = client_for(url, key, a.request_timeout)
    recs = [Rec(at_s=t) for t in at]
    tasks: list[asyncio.Task] = []
    lags: list[float] = []
    lag = asyncio.create_task(loop_lag(lags))
    try:
        t0 = time.perf_counter()
        next_report = 5.0
        for rec, text in zip(recs, texts):
            delay = t0 + rec.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                asyncio.wait_for(send(client, text, a.output_tokens, rec, t0), a.request_timeout)))
            if rec.at_s >= next_report:
                print(_progress(label, time.perf_counter() - t0, recs, tasks), flush=True)
                next_report += 5.0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=a.drain)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for rec, task in zip(recs, tasks):
            if rec.end == "lost" and rec.error is None:
                rec.error = (f"still running after the {a.drain:g} s drain" if task.cancelled()
                             else f"no answer within {a.request_timeout:g} s")
        elapsed = time.perf_counter() - t0
    finally:
        lag.cancel()
        await client.close()
    print(_progress(label, elapsed, recs, tasks), flush=True)
    return recs, {"elapsed_s": round(elapsed, 2), "loop_lag_p99_s": pct(lags, 99),
                  "loop_lag_max_s": max(lags, default=None)}


def _progress(label: str, t: float, recs: list[Rec], tasks: list[asyncio.Task]) -> str:
    done = [r.end for r, task in zip(recs, tasks) if task.done()]
    return (f"    {label} t={t:5.1f} s  sent {len(tasks):4d}/{len(recs)}  ok {done.count('ok'):4d}  "
            f"errors {done.count('error'):3d}  lost {done.count('lost'):3d}  in flight {len(tasks) - len(done):3d}")


# ---- the benchmark ------------------------------------------------------------------------------------


CLIENT_NICE = -10


def boost_client(nice: int = CLIENT_NICE) -> str:
    """Schedule this client ahead of both systems, so it times the servers and not its own wait for a core.

    Linux groups processes by session (autogroups) and shares the CPU between the groups: beside WarmServe's
    services, each in a session of its own, a client at the default weight waited up to half a second for a
    core on the 2-core machine while it idled 90% of the time (its loop woke late; measured in /proc's
    schedstat as run-queue wait), which vLLM's server, then in the client's own session, did not cause. Both
    systems now run in sessions of their own at the default weight, and only this client's session is
    raised; ``warmserve up``'s supervisor, which sleeps, is the one other process in it. Says what was done."""
    try:
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
            return "not raised: the kernel does not group by session (autogroup off)"
        Path("/proc/self/autogroup").write_text(str(nice))
        return f"this client's session (autogroup) at nice {nice}; both systems in sessions of their own at nice 0"
    except OSError as exc:
        return f"not raised ({exc.__class__.__name__}: {exc}); client delays show as loop lag per run"


def request_rows(recs: list[Rec]) -> dict:
    cols = ["at_s", "sent_s", "end", "ttft_s", "tpot_s", "itl_max_s", "completion_tokens", "prompt_tokens",
            "outcome", "error"]
    rows = []
    for r in recs:
        m = request_metrics(r)
        rows.append([round(r.at_s, 4), None if r.sent_s is None else round(r.sent_s, 4), r.end,
                     None if m["ttft_s"] is None else round(m["ttft_s"], 5),
                     None if m["tpot_s"] is None else round(m["tpot_s"], 6),
                     round(max(m["itl_s"]), 5) if m["itl_s"] else None, m["tokens"], r.prompt_tokens, r.outcome,
                     r.error])
    return {"columns": cols, "rows": rows}


class CpuMeter:
    """CPU used over a run, in cores on average: by the system under test (its whole process tree), by this
    client, and by everything else on the machine. On a shared machine ``others`` says how much of the run
    other work took."""

    def __init__(self, root_pid: int | None):
        import psutil

        self.psutil, self.root = psutil, root_pid
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, dict[int, float], float]:
        ps = self.psutil
        t = ps.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        tree: dict[int, float] = {}
        try:
            root = ps.Process(self.root) if self.root else None
            for p in ([root, *root.children(recursive=True)] if root else []):
                try:
                    c = p.cpu_times()
                    tree[p.pid] = c.user + c.system
                except ps.Error:
                    pass  # exited between listing and reading: its time is gone with it
        except ps.Error:
            pass  # the system under test is not running: nothing of it to count
        me = ps.Process().cpu_times()
        return time.monotonic(), busy, tree, me.user + me.system

    def stop(self) -> dict:
        (t0, busy0, tree0, me0), (t1, busy1, tree1, me1) = self.start, self._sample()
        wall = max(t1 - t0, 1e-9)
        system = sum(v - tree0.get(pid, 0.0) for pid, v in tree1.items())
        client = me1 - me0
        return {"system_cores": round(system / wall, 2), "client_cores": round(client / wall, 2),
                "others_cores": round(max(busy1 - busy0 - system - client, 0.0) / wall, 2)}


def run_seed(system, seed: int, a, runs: list[dict], notes: list[str]) -> None:
    """Start ``system``, warm it, let it settle, run every rate on it, stop it. Per run it also keeps the
    CPU use (``CpuMeter``) and, for WarmServe, the model's card before and after (one active instance and
    no other copy is the regime measured)."""
    t = time.monotonic()
    url, key = system.start()
    print(f"  {LABEL[system.name]} up in {time.monotonic() - t:.0f} s at {url}", flush=True)
    try:
        warm = asyncio.run(warm_up(url, key, a.warmup, a.output_tokens, a.input_tokens, system.name))
        print(f"  warmed up: {sum(r.end == 'ok' for r in warm)}/{len(warm)} served"
              + (f", outcomes {dict(Counter(r.outcome for r in warm))}" if system.name == "warmserve" else ""),
              flush=True)
        for rate in a.rates:
            time.sleep(a.settle)  # what the start or the last run left running finishes first
            at = arrivals(rate, a.seconds, seed)
            texts = prompts(len(at), a.input_tokens, seed)
            label = f"[{system.name} {rate:g}/s seed {seed}]"
            before = system.models()
            meter = CpuMeter(system.pid)
            recs, client = asyncio.run(run_load(url, key, at, texts, a, label))
            cpu = meter.stop()
            after = system.models()
            s = run_summary(recs, a.output_tokens)
            runs.append({"system": system.name, "rate": rate, "seed": seed, "client": client,
                         "cpu_cores": cpu, "load_average": os.getloadavg(),
                         "model_card_before": before, "model_card_after": after, "summary": s,
                         "requests": request_rows(recs)})
            print(f"    {label} TTFT mean {fmt_ms(s['ttft_mean_s'])} P99 {fmt_ms(s['ttft_p99_s'])} ms, TPOT mean "
                  f"{fmt_ms(s['tpot_mean_s'])} P99 {fmt_ms(s['tpot_p99_s'])} ms, not served {s['unserved']}, "
                  f"short {s['short']}; client late by up to {s['max_late_s'] * 1e3:.0f} ms (its loop "
                  f"{(client['loop_lag_max_s'] or 0) * 1e3:.0f} ms); CPU cores: system "
                  f"{cpu['system_cores']:.2f}, client {cpu['client_cores']:.2f}, others {cpu['others_cores']:.2f}",
                  flush=True)
            if s["short"]:
                notes.append(f"{label}: {s['short']} answers shorter than {a.output_tokens} tokens")
            for when, card in (("before", before), ("after", after)):
                if system.name == "warmserve" and card != SERVING:
                    notes.append(f"{label}: the model's card {when} the run was {card}, not {SERVING}")
    finally:
        stopped = system.stop()
        if stopped:
            notes.append(f"{LABEL[system.name]}, seed {seed}: {stopped}")


def aggregate(runs: list[dict], rates: list[float], systems: list[str]) -> tuple[dict, dict]:
    results, by_rate = {}, {}
    for rate in rates:
        key = f"{rate:g}"
        per = {s: [r["summary"] for r in runs if r["system"] == s and r["rate"] == rate] for s in systems}
        results[key] = {s: across_seeds(v) for s, v in per.items() if v}
        if per.get("warmserve") and per.get("vllm") and len(per["warmserve"]) == len(per["vllm"]):
            by_rate[key] = ratios(per["warmserve"], per["vllm"])
    return results, by_rate


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from shared.settings import WorkerSettings
    from tooling.localcluster.infra import StartError
    from tooling.modelgen import create_tiny_llama

    state = Path(a.state_dir).resolve()
    model_path = create_tiny_llama(state / "warmserve" / "models" / MODEL)  # where `warmserve up` makes it
    kv = a.kv_cache_bytes or WorkerSettings.model_fields["kv_cache_bytes"].default
    engine_args, core = worker_engine(model_path, kv, a.batch_capacity)
    flags = server_flags(engine_args)
    check_same_engine(flags, engine_args)
    vllm = VllmServer(flags, server_env(core), state / "vllm-server.log", a.start_timeout)
    ws_env = {"WARMSERVE_KV_CACHE_BYTES": str(kv), "WARMSERVE_BATCH_CAPACITY": str(a.batch_capacity),
              "WARMSERVE_RATE_LIMIT_RPS": "100000", "WARMSERVE_KEY_MAX_CONCURRENCY": "100000"}
    ws = WarmServeCluster(state / "warmserve", ws_env, a.start_timeout)
    systems = {"vllm": vllm, "warmserve": ws}
    client_priority = boost_client() if a.client_priority else "not raised (--no-client-priority)"
    print(f"client priority: {client_priority}", flush=True)
    n_runs = len(a.seeds) * len(a.systems) * len(a.rates)
    print(f"{n_runs} runs: {len(a.seeds)} seeds x {len(a.systems)} systems x rates {a.rates} req/s, {a.seconds:g} s "
          f"each; model {MODEL} ({model_path}), KV cache {kv / 2**30:g} GiB, engine on core {core}\n"
          f"vLLM server flags: {' '.join(flags)}", flush=True)
    runs, notes = [], []
    try:
        for k, seed in enumerate(a.seeds):
            order = a.systems if k % 2 == 0 else a.systems[::-1]
            for name in order:
                print(f"\n== seed {seed}: {LABEL[name]} ==", flush=True)
                run_seed(systems[name], seed, a, runs, notes)
    except (StartError, SurfaceError, RuntimeError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    results, by_rate = aggregate(runs, a.rates, a.systems)
    regime = (f"one model ({MODEL}: 5M-parameter Llama, random weights, bf16) served warm by one vLLM CPU engine "
              f"(vllm {_vllm_version()}, eager, {kv / 2**30:g} GiB KV cache, batches of up to {a.batch_capacity} "
              f"requests (max_num_seqs; WarmServe's B), pinned to core {core}) on a "
              f"{os.cpu_count()}-core machine with the client beside it (its priority: {client_priority}); "
              f"open-loop Poisson arrivals at "
              f"{', '.join(f'{r:g}' for r in a.rates)} req/s for {a.seconds:g} s per run, prompts of "
              f"{a.input_tokens} words, {a.output_tokens} output tokens (ignore_eos), greedy, streamed; "
              f"{len(a.seeds)} seed{'s' if len(a.seeds) != 1 else ''}, the systems one at a time in alternating "
              "order")
    params = {k: getattr(a, k) for k in ("batch_capacity", "rates", "seconds", "input_tokens", "output_tokens",
                                         "warmup", "settle", "systems", "request_timeout", "drain")}
    report = header("vs_vllm", params | {"seeds": len(a.seeds), "seed_list": a.seeds, "kv_cache_bytes": kv,
                                         "unserved_counted_as_s": UNSERVED_S, "target_ratio": TARGET_RATIO,
                                         "client_priority": client_priority})
    env = server_env(core)
    report.update(regime=regime, results=results, ratios=by_rate, notes=notes, runs=runs,
                  vllm_server={"command": vllm.command[:-1] + ["<free port>"] if vllm.command else None,
                               "flags": flags, "env": {k: env.get(k) for k in SERVER_ENV}},
                  warmserve={"command": "warmserve up --engine vllm --workers 1 --no-smoke", "env": ws_env})
    print("\n" + table(results))
    if by_rate:
        print("\n" + ratio_table(by_rate))
    for n in notes:
        print(f"note: {n}")
    save(report, a.out)
    a.out.with_suffix(".md").write_text(markdown(report))
    print(f"saved {a.out.with_suffix('.md')}")
    return 0


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.vs_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[5.0, 20.0], help="requests/s (default 5 20)")
    p.add_argument("--seconds", type=float, default=30.0, help="arrivals per (system, rate, seed) run (default 30)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5; fewer is a trial)")
    p.add_argument("--input-tokens", type=int, default=32, help="about this many prompt words (default 32)")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens per answer, ignore_eos (default 64)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per start, sequential then at once")
    p.add_argument("--batch-capacity", type=int, default=VLLM_CPU_SERVER_MAX_NUM_SEQS,
                   help="requests one engine runs at once, on both: WarmServe's B, which its worker also gives "
                        "its engine as max_num_seqs (default %(default)s, vLLM's own for its server on a CPU)")
    p.add_argument("--kv-cache-bytes", type=int, help="KV cache of both engines (default: the worker's, "
                                                      "WARMSERVE_KV_CACHE_BYTES's default)")
    p.add_argument("--no-client-priority", dest="client_priority", action="store_false",
                   help="leave this client at the default scheduling weight (it then waits for a core beside "
                        "WarmServe's services on a small machine)")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds before each run (default 5)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="a request unanswered this long is lost")
    p.add_argument("--drain", type=float, default=60.0, help="wait this long after the last arrival")
    p.add_argument("--start-timeout", type=float, default=300.0, help="longest start of either system")
    p.add_argument("--state-dir", default=".warmserve/vs_vllm", help="the model, the cluster's state, the server's log")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "vs_vllm.json",
                   help="the JSON; the table goes beside it with .md")
    a = p.parse_args(argv)
    if min(a.rates) <= 0 or a.seconds <= 0 or a.seeds < 1 or a.output_tokens < 2 or a.input_tokens < 1:
        p.error("rates, --seconds, --seeds and --input-tokens must be positive, --output-tokens at least 2")
    a.seeds = list(range(a.seeds))
    if len(a.seeds) < 5:
        print(f"note: {len(a.seeds)} seed(s): a trial; the benchmark standard is 5 or more", flush=True)
    try:
        import vllm  # noqa: F401
    except ImportError:
        p.error("needs vLLM (./dev installs the CPU build)")
    return a


if __name__ == "__main__":
    sys.exit(main())
