"""One way to read checkpoint files: torch.load(weights_only=True) with an allow-list of
DeepSpeed's own plain types, so loading a checkpoint never unpickles arbitrary objects. Used by
resume (DeepSpeed's checkpoint engine), the reshard conversion and export. Imports torch only
when it loads: `zerotune export --help` and the reshard workers start without it.

Nothing is patched process-wide: our own reads call safe_load, DeepSpeed's engine gets it as its
checkpoint engine's load, and the DeepSpeed modules that call torch.load directly see a `torch`
whose load is safe_load only while `safe_loads_in(...)` runs (every other torch.load of the process,
in any thread, keeps its own arguments).
"""
from __future__ import annotations

import contextlib
import threading


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


# The DeepSpeed modules that read checkpoint files with torch.load themselves (not through the
# checkpoint engine): the universal load (ZeRO 1-2 / 3 optimizers, the per-parameter fragments),
# deepspeed.checkpoint.ds_to_universal with the readers it uses, and zero_to_fp32.
UNIVERSAL_LOAD = ("deepspeed.runtime.base_optimizer", "deepspeed.runtime.zero.stage3",
                  "deepspeed.checkpoint.universal_checkpoint")
DS_TO_UNIVERSAL = ("deepspeed.checkpoint.ds_to_universal", "deepspeed.checkpoint.deepspeed_checkpoint",
                   "deepspeed.checkpoint.zero_checkpoint", "deepspeed.checkpoint.reshape_3d_utils")
ZERO_TO_FP32 = ("deepspeed.utils.zero_to_fp32",)


class _SafeTorch:
    """Stands for the `torch` module inside one DeepSpeed module: everything is torch's, except
    `load`, which is safe_load (weights_only, DeepSpeed's plain types only)."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    @staticmethod
    def load(f, map_location=None, *args, weights_only=None, mmap=None, **kwargs):
        return safe_load(f, map_location=map_location, mmap=bool(mmap))


_patch_lock = threading.Lock()
_patched: dict[str, int] = {}   # module -> how many contexts use its safe torch now


@contextlib.contextmanager
def safe_loads_in(modules: tuple[str, ...]):
    """Inside, the torch.load calls of these DeepSpeed modules (and only theirs) are safe_load:
    their module-global name `torch` is a _SafeTorch. torch.load itself is untouched, so any other
    load of the process (the background checkpoint writer, another library, another thread)
    behaves as it always does."""
    import importlib

    import torch
    with _patch_lock:
        for name in modules:
            module = importlib.import_module(name)
            if not _patched.get(name):
                module.torch = _SafeTorch(torch)
            _patched[name] = _patched.get(name, 0) + 1
    try:
        yield
    finally:
        with _patch_lock:
            for name in modules:
                _patched[name] -= 1
                if not _patched[name]:
                    importlib.import_module(name).torch = torch
