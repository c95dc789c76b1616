"""Issue 29 part B: what the training loop adds to ZeRO's own communication per optimizer step
is the same on 1, 2 and 4 processes, with at most one host sync. benchmarks/step_syncs.py runs
`zerotune train` on CPU (gloo) with training/run/sync_counter.py's ZEROTUNE_TEST_COUNT_SYNCS switch,
which counts every collective and host sync from outside (torch.distributed and torch.Tensor
wrapped at process start; ZeRO's own are those inside DeepSpeed's engine forward/backward/step)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import step_syncs  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero", [3, 0])
def test_our_collectives_are_constant_in_world_size_with_one_host_sync_per_step(tmp_path, zero):
    rows = step_syncs.measure(tmp_path, [1, 2, 4], [zero], steps=4)
    seen = {r["world"]: (r["collectives_by_kind"], r["sync_sites"]) for r in rows}
    for r in rows:
        assert r["steady"], f"world {r['world']}: the steady steps counted differently"
        assert r["host_syncs"] <= 1, f"world {r['world']}: {r['host_syncs']} host syncs per step: {r['sync_sites']}"
        assert r["collectives"] <= 2, f"world {r['world']}: {r['collectives_by_kind']}"
    assert len({repr(kinds) for kinds, _ in seen.values()}) == 1, f"ours differ with the world size: {seen}"
    assert any(r["zero_collectives"] > 0 for r in rows)   # the harness sees ZeRO's own, apart from ours
