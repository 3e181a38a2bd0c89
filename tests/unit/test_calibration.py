"""Calibration files override the published device and start-up figures, the fitter recovers the roofline's
constants from step times the roofline itself produced, and the GPU script's help needs no GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.calibration_fit import DECODE_BATCHES, PREFILL_TOKENS, Point, compare, fit_device, within
from simulator.calibration import cpu_device, load_calibration
from simulator.costs import Costs
from simulator.hardware import A100_80G, LLAMA2_7B, LLAMA2_13B, TINY_5M, TINY_300M, step_time

ROOT = Path(__file__).resolve().parents[2]


def test_load_calibration_overrides_the_base_device_and_returns_costs(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"device": {"base": "a100-80g-sxm", "mfu": 0.42, "step_overhead_s": 0.005},
                                "costs": {"engine_start_s": 21.5, "activate_s": 0.12},
                                "measured": {"anything": 1}, "source": "test"}))
    device, costs = load_calibration(path)
    assert device == A100_80G.scaled(mfu=0.42, step_overhead_s=0.005)
    assert costs == {"engine_start_s": 21.5, "activate_s": 0.12}
    assert Costs().with_(**costs).engine_start_s == 21.5

    path.write_text(json.dumps({"device": {"base": "cpu", "peak_flops": 2e11}, "costs": {}}))
    device, costs = load_calibration(path)
    assert device == cpu_device(peak_flops=2e11) and device.mfu == 1.0 and costs == {}

    path.write_text(json.dumps({"costs": {"pinned_bytes_per_s": 3e10}}))
    assert load_calibration(path) == (None, {"pinned_bytes_per_s": 3e10})


@pytest.mark.parametrize("data", [{"device": {"base": "tpu-v9"}}, {"costs": {"engine_start": 1.0}}])
def test_load_calibration_refuses_unknown_names(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        load_calibration(path)


def synthetic(device, shapes) -> list[Point]:
    """The calibration scripts' points, timed by the roofline itself on ``device``."""
    points = []
    for shape in shapes:
        for n in PREFILL_TOKENS:
            points.append(Point(shape.name, "prefill", n, 0, 0.0))
        for b in DECODE_BATCHES:
            points.append(Point(shape.name, "decode", b, 64, 0.0))
    return [Point(p.model, p.kind, p.size, p.context, step_time(next(s for s in shapes if s.name == p.model),
                                                                 device, p.batch)) for p in points]


@pytest.mark.parametrize("truth, shapes", [
    (cpu_device(peak_flops=150e9, mem_bw=12e9, step_overhead_s=0.004), (TINY_5M, TINY_300M)),
    (A100_80G.scaled(mfu=0.6, mbu=0.7, step_overhead_s=0.002), (LLAMA2_7B, LLAMA2_13B)),
], ids=["cpu", "a100"])
def test_the_fit_recovers_known_constants(truth, shapes):
    points = synthetic(truth, shapes)
    fitted = fit_device(points, cpu_device())
    assert fitted.peak_flops == pytest.approx(truth.peak_flops * truth.mfu, rel=0.02)
    assert fitted.mem_bw == pytest.approx(truth.mem_bw * truth.mbu, rel=0.02)
    assert fitted.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=0.02)
    rows = compare(points, fitted)
    assert within(rows, 0.01) and {r["bound"] for r in rows} == {"compute", "memory"}


def test_calibrate_gpu_help_runs_without_cuda():
    r = subprocess.run([sys.executable, "-m", "loadtest.calibrate_gpu", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--shapes" in r.stdout and "GPU" in r.stdout
