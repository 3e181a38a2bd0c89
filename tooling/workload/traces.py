"""Loaders for the shipped traces and for operator files in the same formats.

Three formats are understood:

- **rates** (ServeGen): ``model,t_start_s,rate_rps[,...]`` per model and window, with an optional ``cv``
  column (inter-arrival coefficient of variation; 1.0 = Poisson when absent);
- **ServeGen clients**: headerless ``t_start_s, rate_rps, cv, pattern, param1, param2`` per client;
- **requests** (Azure 2023): ``TIMESTAMP, ContextTokens, GeneratedTokens``, one row per request.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

TRACES_DIR = Path(__file__).resolve().parent.parent / "traces"
SERVEGEN_DIR = TRACES_DIR / "servegen_1day"
SERVEGEN_RATES = SERVEGEN_DIR / "servegen_model_rates_10min_1day.csv"
SERVEGEN_TOKENS = SERVEGEN_DIR / "servegen_token_hist_1day.csv"
AZURE = {"azure-conv": TRACES_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv",
         "azure-code": TRACES_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"}
MOONCAKE = TRACES_DIR / "mooncake_fast25" / "conversation_trace.jsonl"


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class RateSeries:
    """One source of load (a model or one client of it) as per-window rates."""

    name: str
    t_start_s: np.ndarray  # window starts, seconds from the trace's t=0
    rate_rps: np.ndarray
    cv: np.ndarray  # inter-arrival CV per window (1.0 = Poisson)
    window_s: float

    @property
    def duration_s(self) -> float:
        return float(self.t_start_s[-1] + self.window_s) if len(self.t_start_s) else 0.0


@dataclass(frozen=True)
class Requests:
    """Request-level trace: arrival offsets (seconds from the first request) and token counts."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray


def _window_of(starts: np.ndarray) -> float:
    steps = np.diff(np.unique(starts))
    return float(steps.min()) if len(steps) else 600.0


def _csv_rows(path: Path, required: set[str], kind: str, parse) -> None:
    """Call ``parse(row)`` for every row of a CSV with a header; errors name the file and the line."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = required - set(reader.fieldnames or ())
            if missing:
                raise TraceFormatError(f"{path}: not {kind}, missing columns {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                try:
                    parse(row)
                except (ValueError, TypeError) as exc:
                    raise TraceFormatError(f"{path}:{line}: {exc}") from None
    except OSError as exc:
        raise TraceFormatError(f"cannot read {path}: {exc.strerror}") from None


def read_rates(path: Path) -> dict[str, RateSeries]:
    """Per-model rate series from a ServeGen-format rate file (``model,t_start_s,rate_rps,...``)."""
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)

    def parse(row):
        cv = float(row["cv"]) if row.get("cv") not in (None, "") else 1.0
        rows[row["model"]].append((float(row["t_start_s"]), float(row["rate_rps"]), cv))

    _csv_rows(path, {"model", "t_start_s", "rate_rps"}, "a rate file (model,t_start_s,rate_rps[,cv,...])", parse)
    if not rows:
        raise TraceFormatError(f"{path}: no rows")
    return {model: _series(model, sorted(r)) for model, r in rows.items()}


def _series(name: str, rows: list[tuple[float, float, float]]) -> RateSeries:
    t, rate, cv = (np.array(col, dtype=float) for col in zip(*rows))
    if (rate < 0).any():
        raise TraceFormatError(f"{name}: negative rate")
    return RateSeries(name, t, rate, np.where(cv > 0, cv, 1.0), _window_of(t))


def read_servegen_clients(model: str, root: Path = SERVEGEN_DIR / "clients") -> list[RateSeries]:
    """Every client of a ServeGen model, one rate series each (empty pattern = no traffic)."""
    folder = root / model
    files = sorted(folder.glob("chunk-*-trace.csv"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        known = sorted(p.name for p in root.iterdir()) if root.exists() else []
        raise TraceFormatError(f"no ServeGen clients for {model!r} in {root} (known: {', '.join(known)})")
    out = []
    for path in files:
        rows = []
        with open(path, newline="") as f:
            for line, rec in enumerate(csv.reader(f), start=1):
                try:
                    rows.append((float(rec[0]), float(rec[1]), float(rec[2] or 1.0)))
                except (ValueError, IndexError) as exc:
                    raise TraceFormatError(f"{path}:{line}: {exc}") from None
        out.append(_series(f"{model}/{path.stem}", rows))
    return out


def servegen_models() -> list[str]:
    return sorted(p.name for p in (SERVEGEN_DIR / "clients").iterdir() if p.is_dir())


def _parse_timestamp(text: str) -> float:
    """Azure timestamps carry 7 fractional digits, one more than ``fromisoformat`` takes everywhere."""
    date, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(date).timestamp() + (float(f"0.{frac}") if frac else 0.0)


def read_requests(path: Path) -> Requests:
    """A request-level trace in the Azure 2023 format."""
    times, inputs, outputs = [], [], []

    def parse(row):
        times.append(_parse_timestamp(row["TIMESTAMP"]))
        inputs.append(int(row["ContextTokens"]))
        outputs.append(int(row["GeneratedTokens"]))

    _csv_rows(path, {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}, "an Azure request trace", parse)
    if not times:
        raise TraceFormatError(f"{path}: no requests")
    t = np.array(times)
    order = np.argsort(t, kind="stable")
    return Requests(t[order] - t[order][0], np.array(inputs)[order], np.array(outputs)[order])


@dataclass(frozen=True)
class TokenHistogram:
    """Log-binned token-length distribution (ServeGen): bins [lo, hi) with probabilities."""

    lo: np.ndarray
    hi: np.ndarray
    prob: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw lengths: a bin by probability, then uniformly inside it."""
        idx = rng.choice(len(self.prob), size=n, p=self.prob)
        return np.maximum(1, np.floor(self.lo[idx] + rng.random(n) * (self.hi[idx] - self.lo[idx]))).astype(int)

    @property
    def mean(self) -> float:
        return float(np.sum(self.prob * (self.lo + self.hi - 1) / 2))


def read_token_histograms(path: Path = SERVEGEN_TOKENS) -> dict[tuple[str, str], TokenHistogram]:
    """``(model, field) -> histogram``; ServeGen calls the multimodal input field ``text_tokens``."""
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            field = "input_tokens" if row["field"] == "text_tokens" else row["field"]
            rows[(row["model"], field)].append((float(row["bin_lo"]), float(row["bin_hi_excl"]), float(row["prob"])))
    out = {}
    for key, r in rows.items():
        lo, hi, p = (np.array(c) for c in zip(*r))
        out[key] = TokenHistogram(lo, hi, p / p.sum())
    return out
