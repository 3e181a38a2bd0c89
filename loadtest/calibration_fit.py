"""Engine step times measured with real vLLM, and the roofline constants fitted to them: what
``calibrate_cpu`` and ``calibrate_gpu`` share.

Step times come from vLLM's own per-request timestamps (taken in the engine core, so the front end's
tokenising and IPC are not in them): a prefill step is scheduling to first token of a ``max_tokens=1``
request, a decode step the mean gap between the tokens of a request that decodes ``DECODE_TOKENS``. Where
vLLM gives no timestamps, wall-clock differences stand in for them.

The fit finds effective FLOP/s, bytes/s and per-step overhead (the shares folded in, so mfu = mbu = 1) that
minimise the squared relative error of ``simulator.hardware.step_time`` over every point. FLOPs and bytes
come from ``step_cost`` on a unit device, so the fit and the simulator cannot disagree about them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from simulator.hardware import SHAPES, Batch, DeviceSpec, step_cost

PREFILL_TOKENS = (16, 64, 256, 1024)
DECODE_BATCHES = (1, 4, 16)
DECODE_PROMPT = 32  # prompt tokens of each decoding sequence
DECODE_TOKENS = 64  # tokens each decodes; steps 1..63 read DECODE_PROMPT + k KV tokens
TOLERANCE = 0.25  # the calibration passes when every point is predicted within this relative error


@dataclass(frozen=True)
class Point:
    model: str  # a simulator.hardware.SHAPES name
    kind: str  # "prefill" | "decode"
    size: int  # prompt tokens (prefill) or sequences (decode)
    context: int  # KV tokens before the chunk (prefill) or read per sequence (decode: the run's midpoint)
    measured_s: float

    @property
    def batch(self) -> Batch:
        if self.kind == "prefill":
            return Batch(prefills=((self.size, self.context),))
        return Batch(decodes=(self.context,) * self.size)

    @property
    def label(self) -> str:
        return f"{self.size} tokens" if self.kind == "prefill" else f"batch {self.size}"


# ---------------------------------------------------------------------------------------------- measuring

def _prompts(tokens: int, count: int, salt: int, vocab: int = 4000) -> list[dict]:
    """Distinct token ids per request and run (no prefix is ever shared), clear of the special tokens."""
    return [{"prompt_token_ids": [10 + (salt * 7919 + i * 104729 + j * 31) % (vocab - 10) for j in range(tokens)]}
            for i in range(count)]


def _generate(llm, tokens: int, count: int, max_tokens: int, salt: int) -> tuple[list, float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    outs = llm.generate(_prompts(tokens, count, salt), params, use_tqdm=False)
    return outs, time.perf_counter() - t


def _prefill_s(outs: list, wall_s: float) -> float:
    m = getattr(outs[0], "metrics", None)
    if m is not None and getattr(m, "first_token_ts", 0) and getattr(m, "scheduled_ts", 0):
        return m.first_token_ts - m.scheduled_ts
    return wall_s


def _decode_step_s(outs: list) -> float | None:
    gaps = []
    for o in outs:
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        if m is None or not getattr(m, "last_token_ts", 0) or n < 2:
            return None
        gaps.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    return statistics.median(gaps)


def measure_steps(llm, model: str, reps: int = 3, say: Callable[[str], None] = print) -> list[Point]:
    """Prefill and decode step times of ``llm`` (a started ``vllm.LLM``) running ``model``'s shape, each the
    median of ``reps`` runs after one warm-up run (first runs pay kernel selection for their shapes)."""
    points, salt = [], 0
    for n in PREFILL_TOKENS:
        times = []
        for rep in range(reps + 1):
            salt += 1
            outs, wall = _generate(llm, n, 1, 1, salt)
            if rep:
                times.append(_prefill_s(outs, wall))
        points.append(Point(model, "prefill", n, 0, statistics.median(times)))
        say(f"  {model} prefill {n:>5} tokens: {points[-1].measured_s * 1e3:9.2f} ms "
            f"(runs {', '.join(f'{t * 1e3:.1f}' for t in times)})")
    for b in DECODE_BATCHES:
        times = []
        salt += 1
        _generate(llm, DECODE_PROMPT, b, 8, salt)  # warm-up
        for _ in range(reps):
            salt += 1
            outs, wall = _generate(llm, DECODE_PROMPT, b, DECODE_TOKENS, salt)
            step = _decode_step_s(outs)
            if step is None:  # no timestamps: subtract a run that only prefills
                _, first = _generate(llm, DECODE_PROMPT, b, 1, salt + 10_000)
                step = (wall - first) / (DECODE_TOKENS - 1)
            times.append(step)
        points.append(Point(model, "decode", b, DECODE_PROMPT + DECODE_TOKENS // 2, statistics.median(times)))
        say(f"  {model} decode  batch {b:>3}:    {points[-1].measured_s * 1e3:9.2f} ms/step "
            f"(runs {', '.join(f'{t * 1e3:.2f}' for t in times)})")
    return points


def shutdown(llm) -> None:
    """Stop the engine core now (an ``LLM`` has no close of its own), so the next one gets the memory."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


# ---------------------------------------------------------------------------------------------- fitting

def work(points: list[Point], base: DeviceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs, bytes read) of each point's step, as ``step_cost`` counts them (unit rates, no overhead)."""
    unit = base.scaled(peak_flops=1.0, mem_bw=1.0, mfu=1.0, mbu=1.0, step_overhead_s=0.0)
    costs = [step_cost(SHAPES[p.model], unit, p.batch) for p in points]
    return np.array([c.compute_s for c in costs]), np.array([c.memory_s for c in costs])


def fit_device(points: list[Point], base: DeviceSpec) -> DeviceSpec:
    """``base`` with the effective peak_flops, mem_bw (mfu = mbu = 1) and step_overhead_s that minimise
    the squared relative error over ``points``. The max() makes the error surface kinked, so the search
    starts from a few corners and keeps the best."""
    from scipy.optimize import least_squares

    flops, read = work(points, base)
    measured = np.array([p.measured_s for p in points])

    def residuals(x: np.ndarray) -> np.ndarray:
        f, b, o = np.exp(x)
        return (np.maximum(flops / f, read / b) + o) / measured - 1.0

    f0, b0, o0 = np.median(flops / measured), np.median(read / measured), 0.5 * measured.min()
    best = None
    for sf in (1.0, 4.0):
        for sb in (1.0, 4.0):
            for so in (0.1, 1.0):
                start = np.log([f0 * sf, b0 * sb, o0 * so])
                r = least_squares(residuals, start, method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12)
                if best is None or r.cost < best.cost:
                    best = r
    f, b, o = np.exp(best.x)
    return base.scaled(peak_flops=float(f), mem_bw=float(b), mfu=1.0, mbu=1.0, step_overhead_s=float(o))


def device_overrides(base: DeviceSpec, fitted: DeviceSpec, keep_peaks: bool) -> dict:
    """What a calibration file stores: the fitted rates as shares of ``base``'s published peaks
    (``keep_peaks``, a GPU), or as the peaks themselves with shares of 1 (the CPU base has no published peak)."""
    rates = ({"mfu": fitted.peak_flops / base.peak_flops, "mbu": fitted.mem_bw / base.mem_bw} if keep_peaks
             else {"peak_flops": fitted.peak_flops, "mem_bw": fitted.mem_bw, "mfu": 1.0, "mbu": 1.0})
    return {"base": base.name, **rates, "step_overhead_s": fitted.step_overhead_s}


def compare(points: list[Point], device: DeviceSpec) -> list[dict]:
    """Every point, measured against what ``simulator.hardware.step_time`` predicts on ``device``."""
    rows = []
    for p in points:
        cost = step_cost(SHAPES[p.model], device, p.batch)
        predicted = cost.time()
        rows.append(asdict(p) | {"label": p.label, "predicted_s": predicted,
                                 "error": predicted / p.measured_s - 1.0,
                                 "bound": "compute" if cost.compute_s >= cost.memory_s else "memory"})
    return rows


def within(rows: list[dict], tolerance: float = TOLERANCE) -> bool:
    return all(abs(r["error"]) <= tolerance for r in rows)


def table(rows: list[dict]) -> str:
    """A markdown table of ``compare``'s rows."""
    out = ["| model | kind | tokens/batch | measured ms | predicted ms | error % | bound |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        miss = " **(miss)**" if abs(r["error"]) > TOLERANCE else ""
        out.append(f"| {r['model']} | {r['kind']} | {r['label']} | {r['measured_s'] * 1e3:.2f} | "
                   f"{r['predicted_s'] * 1e3:.2f} | {r['error'] * 100:+.1f}{miss} | {r['bound']} |")
    return "\n".join(out)


def print_table(rows: list[dict]) -> None:
    print("\n" + table(rows))


def summary(rows: list[dict]) -> dict:
    worst = max(rows, key=lambda r: abs(r["error"]))
    return {"tolerance": TOLERANCE, "all_within": within(rows), "points": len(rows),
            "misses": [f"{r['model']} {r['kind']} {r['label']}: {r['error'] * 100:+.1f}%"
                       for r in rows if abs(r["error"]) > TOLERANCE],
            "worst": f"{worst['model']} {worst['kind']} {worst['label']}: {worst['error'] * 100:+.1f}%",
            "rms_error": math.sqrt(sum(r["error"] ** 2 for r in rows) / len(rows))}


def write_markdown(path: Path, title: str, intro: str, rows: list[dict]) -> None:
    s = summary(rows)
    verdict = (f"All {s['points']} points within {TOLERANCE:.0%}" if s["all_within"]
               else f"{len(s['misses'])} of {s['points']} points miss {TOLERANCE:.0%}: {'; '.join(s['misses'])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{intro}\n\n{table(rows)}\n\n{verdict} (worst {s['worst']}, "
                    f"RMS {s['rms_error'] * 100:.1f}%).\n")
    print(f"saved {path}")
