"""One way to read checkpoint files: torch.load(weights_only=True) with an allow-list of
DeepSpeed's own plain types, so loading a checkpoint never unpickles arbitrary objects. Used by
resume (DeepSpeed's checkpoint engine), the reshard conversion and export. Imports torch only
when it loads: `zerotune export --help` and the reshard workers start without it.
"""
from __future__ import annotations

import contextlib


def deepspeed_safe_types() -> list:
    """The only classes a DeepSpeed checkpoint file may hold besides tensors and builtins: the
    allow-list for torch.load(weights_only=True), here and in export."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path, map_location=None, mmap: bool = False):
    """torch.load(weights_only=True), allowing only DeepSpeed's plain checkpoint types: how every
    checkpoint file is read (DeepSpeed's engine here, training/checkpoint/reshard.py's conversion)."""
    import torch
    with torch.serialization.safe_globals(deepspeed_safe_types()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def use_safe_loads(engine) -> None:
    """Make DeepSpeed read its checkpoint files with safe_load."""
    engine.checkpoint_engine.load = safe_load


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside (DeepSpeed's zero_to_fp32 included) runs with weights_only=True,
    allowing only DeepSpeed's own plain checkpoint types."""
    import torch
    original, allowed = torch.load, deepspeed_safe_types()

    def load(*a, **kw):
        kw["weights_only"] = True
        # per call: a nested safe_globals (the checkpoint engine's) removes the list when it exits
        with torch.serialization.safe_globals(allowed):
            return original(*a, **kw)
    torch.load = load
    try:
        yield
    finally:
        torch.load = original
