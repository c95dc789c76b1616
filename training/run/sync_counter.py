"""Counting what one training step costs beyond ZeRO's own work: collectives (by kind, calls and
bytes), host syncs (.item(), .tolist(), .cpu(), bool(t), ...) by call site, and the Python time
outside DeepSpeed's forward/backward/step. Switched on like the faults (training/run/faults.py)
by ZEROTUNE_TEST_COUNT_SYNCS=<file>: every rank appends one JSON line per step;
benchmarks/step_syncs.py and tests/test_step_syncs.py read it. Nothing is patched otherwise."""
from __future__ import annotations

import functools
import os
import sys
import time

COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast",
               "broadcast_object_list", "reduce", "all_to_all", "all_to_all_single", "barrier", "gather", "scatter",
               "send", "recv", "isend", "irecv", "batch_isend_irecv")
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _sent_bytes(kind: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank puts into a collective: its input tensor(s)."""
    import torch
    names = {"all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
             "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input", "all_to_all_single": "input",
             "all_gather": "tensor"}
    if kind in names:
        x = kwargs.get(names[kind], args[1] if len(args) > 1 else None)
    else:
        x = next(iter(args), None) if args else next(iter(kwargs.values()), None)
    xs = x if isinstance(x, (list, tuple)) else [x]
    return sum(t.numel() * t.element_size() for t in xs if isinstance(t, torch.Tensor))


class SyncCounter:
    """Per step (from one `step_counts` call of the loop to the next): collectives by kind (calls,
    bytes) and host syncs by call site, ours apart from ZeRO's (issued while DeepSpeed's engine
    forward/backward/step runs), and the wall time outside those engine calls. Installed before
    deepspeed.init_distributed, so DeepSpeed's comm layer captures the wrapped functions. On a
    CPU every .item() syncs nothing, so a call from zerotune/training/data/ (host batches, CPU
    tensors on a GPU run too) is not counted."""

    def __init__(self, path: str):
        self.path = path
        self.here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../training
        self.data_dir = os.path.join(self.here, "data") + os.sep
        self.engine, self.coll, self.engine_s, self.t0, self.step = 0, 0, 0.0, None, 0
        self.cur: dict = {}

    def install(self) -> None:
        import atexit
        import torch
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        from deepspeed.runtime.engine import DeepSpeedEngine
        from zerotune.training.run import step as steps
        for name in COLLECTIVES:
            for module in (dist, c10d):
                if hasattr(module, name):
                    self.wrap_collective(module, name)
        for name in HOST_SYNCS:
            self.wrap_sync(torch.Tensor, name)
        if torch.cuda.is_available():
            self.wrap_sync(torch.cuda.Event, "synchronize")
        for name in ("forward", "backward", "step"):
            self.wrap_engine(DeepSpeedEngine, name)

        def make(original):
            def step_counts(*args, **kwargs):   # the first thing of every step
                self.flush()
                self.cur.clear()
                self.cur.update(ours={}, zero={}, host_syncs={}, zero_host_syncs=0, zero_sync_sites={})
                self.step += 1
                self.t0, self.engine_s = time.perf_counter(), 0.0
                return original(*args, **kwargs)
            return step_counts
        steps.step_counts = functools.wraps(steps.step_counts)(make(steps.step_counts))
        atexit.register(lambda: self.flush(last=True))

    def flush(self, last: bool = False) -> None:
        import json
        if self.t0 is None:
            return
        wall, cur = time.perf_counter() - self.t0, self.cur
        line = {"rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1")), "step": self.step, "last": last,
                "ours": cur["ours"], "zero": cur["zero"], "host_syncs": cur["host_syncs"],
                "zero_host_syncs": cur["zero_host_syncs"], "zero_sync_sites": cur["zero_sync_sites"],
                "wall_s": wall, "python_s": wall - self.engine_s}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def wrap_collective(self, module, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def collective(*args, **kwargs):
            if self.coll or not self.cur:   # one built of others (all_gather_object): counted once; set-up: not
                return original(*args, **kwargs)
            c = self.cur["zero" if self.engine else "ours"].setdefault(name, {"calls": 0, "bytes": 0})
            c["calls"] += 1
            c["bytes"] += _sent_bytes(name, args, kwargs)
            self.coll += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.coll -= 1
        setattr(module, name, collective)

    def wrap_sync(self, cls, name: str) -> None:
        original = getattr(cls, name)

        def sync(tensor, *args, **kwargs):
            if not self.coll and self.cur:
                f = sys._getframe(1)
                file = f.f_code.co_filename
                if self.engine:
                    self.cur["zero_host_syncs"] += 1
                    site, table = f"{file.split('site-packages/')[-1]}:{f.f_lineno} {name}", "zero_sync_sites"
                elif not file.startswith(self.data_dir):
                    site, table = f"{os.path.relpath(file, os.path.dirname(self.here))}:{f.f_lineno} {name}", "host_syncs"
                else:
                    table = None
                if table:
                    self.cur[table][site] = self.cur[table].get(site, 0) + 1
            return original(tensor, *args, **kwargs)
        setattr(cls, name, sync)

    def wrap_engine(self, cls, name: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def method(engine, *args, **kwargs):
            outer, t0 = self.engine == 0, time.perf_counter()
            self.engine += 1
            try:
                return original(engine, *args, **kwargs)
            finally:
                self.engine -= 1
                if outer:
                    self.engine_s += time.perf_counter() - t0
        setattr(cls, name, method)
