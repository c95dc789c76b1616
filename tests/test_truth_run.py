"""benchmarks/truth_run.py (issue 13's multi-GPU truth run in one command) on CPU with the tiny
model on 1 and 2 processes: every check runs and says what it should on a correct system."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_truth_run_on_cpu(tmp_path):
    out = tmp_path / "truth.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "truth_run.py"), "--size", "tiny", "--gpus", "1,2",
                    "--steps", "6", "--warmup", "1", "--mbs", "2", "--seq", "128", "--work", str(tmp_path / "w"),
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=900)
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    by = {(r["check"], r.get("gpus", r.get("resumed_on"))): r for r in recs}
    assert by[("scaling", 1)]["rc"] == 0 and by[("scaling", 2)]["tok_s_gpu"] > 0
    for n in (1, 2):   # the 2-process checkpoint resumed on 1 and on 2, same global batch: same losses
        r = by[("resume", n)]
        assert r["rc"] == 0 and r["loaded_s"] is not None and r["worst_rel_loss_diff"] < 1e-5, r
    drill = by[("preemption", 2)]
    assert drill["stopped_with_85"] and drill["second_rc"] == 0 and drill["worst_rel_loss_diff"] < 1e-6, drill
    export = by[("export", None)]
    assert export["rc"] == 0 and export["equal"] and export["tensors"] > 0, export
