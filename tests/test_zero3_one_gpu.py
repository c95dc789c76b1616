"""benchmarks/zero3_one_gpu.py (issue 29 part A: the truth run's settings on one GPU) on CPU with
the tiny model: the three runs train and the two checks come out as rows a script can read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_zero3_one_gpu_on_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zero3_one_gpu.py"), "--size", "tiny", "--steps", "7",
                    "--every", "3", "--warmup", "1", "--mbs", "2", "--seq", "64", "--work", str(tmp_path / "w"),
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=1200)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    runs = {r["run"]: r for r in rows if r["check"] == "zero3_one_gpu_run"}
    assert {k: r["rc"] for k, r in runs.items()} == {"z3-saves": 0, "z3": 0, "z0": 0}
    steps = {r["run"]: r for r in rows if r["check"] == "zero3_one_gpu_steps"}
    assert [s["step"] for s in steps["z3-saves"]["steps"]] == list(range(1, 8))
    assert [c["step"] for c in steps["z3-saves"]["checkpoints"]][:2] == [3, 6]     # then the run's end
    blocking = next(r for r in rows if r["check"] == "save_blocking")
    # the first save counts from the start of step 1; the fraction is the worst save's, the first included
    assert blocking["gpus"] == 1 and 0 < blocking["fraction"] < 1 and [s["step"] for s in blocking["saves"]] == [3, 6]
    assert blocking["saves"][0]["steps_between"] == 3
    # the first save's window: from the start of step 1, that step's warm-up beyond the median step left out
    recs = steps["z3-saves"]["steps"]
    median = sorted(s["step_s"] for s in recs)[len(recs) // 2]
    start = recs[0]["time"] - recs[0]["step_s"]
    first = blocking["saves"][0]
    assert abs(first["between_s"] - (steps["z3-saves"]["checkpoints"][0]["time"] - start - max(0, recs[0]["step_s"] - median))) < 1e-3
    assert blocking["fraction"] == max(s["fraction"] for s in blocking["saves"])
    assert blocking["fraction_later"] == blocking["saves"][1]["fraction"]
    assert blocking["fraction_vs_nosave"] == max(s["fraction_vs_nosave"] for s in blocking["saves"])
    assert all(s["wait_s"] >= 0 and 0 < s["snapshot_s"] <= s["shards_s"] <= s["blocked_s"] + 1e-4 for s in blocking["saves"])
    ratio = next(r for r in rows if r["check"] == "zero3_vs_zero0")
    assert ratio["gpus"] == 1 and ratio["ratio"] > 0 and ratio["zero3_tok_s"] > 0
