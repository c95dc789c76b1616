"""Safe loading is scoped to our own reads: inside safe_loads_in, the named DeepSpeed modules'
torch.load refuses arbitrary pickles, while a torch.load anywhere else in the process (another
thread: the background checkpoint writer, a library) keeps its own arguments."""
from __future__ import annotations

import collections
import pickle
import threading

import pytest
import torch

from zerotune.training.checkpoint.safe_load import ZERO_TO_FP32, safe_loads_in

Pickled = collections.namedtuple("Pickled", "x")   # not on the allow-list: a weights_only load refuses it


def test_a_load_in_another_thread_during_a_safe_load_is_not_affected(tmp_path):
    import deepspeed.utils.zero_to_fp32 as z
    f = tmp_path / "obj.pt"
    torch.save({"obj": Pickled(torch.ones(2))}, f)
    inside, done, got = threading.Event(), threading.Event(), {}

    def other_thread():
        inside.wait(30)
        try:
            got["value"] = torch.load(f, weights_only=False)["obj"].x.sum().item()
        except Exception as e:  # noqa: BLE001  (the failure is the result)
            got["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        done.set()
    t = threading.Thread(target=other_thread)
    t.start()
    with safe_loads_in(ZERO_TO_FP32):
        inside.set()
        assert done.wait(30)
        with pytest.raises(pickle.UnpicklingError):   # DeepSpeed's own load, inside: weights only
            z.torch.load(f, map_location="cpu", weights_only=False)
    t.join()
    assert got == {"value": 2.0}
    assert z.torch is torch   # restored
