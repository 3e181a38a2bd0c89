"""The headline benchmark's quick mode runs every system and fails when a system's numbers are missing."""

import json
import subprocess
import sys

from loadtest.headline import REGIMES, missing_points, sustainable
from simulator.run import SYSTEMS


def test_quick_mode_reports_every_system_at_every_rate(tmp_path):
    done = subprocess.run([sys.executable, "-m", "loadtest.headline", "--quick", "--processes", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "headline.json").read_text())
    assert report["missing"] == []
    for system in SYSTEMS:
        for rate in (4, 16):
            cell = report["summary"]["table"][f"a|{system}|{rate}"]
            assert cell["seeds"] == 2 and cell["ttft_p99_s"][0] > 0 and 0 <= cell["slo_attainment"][0] <= 1
    assert (tmp_path / "headline.md").read_text().count("| serverlessllm |") == 3  # levels, GPU cost, ratios
    assert (tmp_path / "headline.png").stat().st_size > 0


def test_a_missing_system_is_reported():
    regime = REGIMES[0]
    runs = [{"regime": "a", "system": s, "rate_rps": rate, "seed": seed, "sweep": None}
            for s in ("warmserve", "muxserve") for rate in regime.rates for seed in (0, 1)]
    assert missing_points(runs, [regime], ["warmserve", "muxserve"], [0, 1]) == []
    runs = [r for r in runs if not (r["system"] == "muxserve" and r["rate_rps"] == regime.rates[-1] and r["seed"] == 1)]
    assert missing_points(runs, [regime], ["warmserve", "muxserve"], [0, 1]) == [("a", "muxserve", regime.rates[-1])]


def test_sustainable_rate_needs_every_lower_rate_too():
    assert sustainable({2: 1.0, 4: 0.995, 8: 0.97, 16: 0.999}) == 4
    assert sustainable({2: 0.9, 4: 1.0}) == 0.0
