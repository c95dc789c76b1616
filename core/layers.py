"""Checkpointing and offloading by the decoder layer, torch-free (core/memory.py counts the bytes,
launcher/plan_layers.py chooses, training/model/long_sequence.py applies): how many layers a
recipe checkpoints and offloads, the speed of a partial choice, and the host's memory."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .memory import Strategy
from .speed import KEPT_ATTENTION_SPEED, OFFLOAD_ACTIVATIONS_SPEED, TILED_MLP_SPEED, efficiency


def checkpointed_layers(train, layers: int) -> int:
    """Decoder layers (the first ones) train.gradient_checkpointing recomputes, of `layers` (auto: all,
    the rule for a recipe that did not come through the launcher, which resolves it)."""
    g = train.gradient_checkpointing
    return min(g, layers) if type(g) is int else (layers if g else 0)


def offloaded_layers(train, layers: int) -> int:
    """Checkpointed layers (the first ones) whose input waits in CPU memory (auto: none)."""
    o, k = train.offload_activations, checkpointed_layers(train, layers)
    return min(o, k) if type(o) is int else (k if o is True else 0)


def layer_efficiency(st: Strategy, world: int, layers: int, ckpt_layers: int, offload_layers: int = 0,
                     tiled: bool = False, kept_attention: float = 0.0) -> tuple[float, str]:
    """MFU with `ckpt_layers` of `layers` recomputed: a token's time is the checkpointed layers' share
    at the checkpointed MFU plus the rest's at the uncheckpointed one; offloaded layers and the tiled
    MLP cost their assumed factors (OFFLOAD_ACTIVATIONS_SPEED for all layers, TILED_MLP_SPEED).
    kept_attention (train.recompute_attention: false): the share of a checkpointed layer's work its
    attention forward is (core/flops.py attention_forward_share), saved on each checkpointed layer,
    at KEPT_ATTENTION_SPEED's cost."""
    on, source = efficiency(replace(st, grad_ckpt=True), world)
    off, source_off = efficiency(replace(st, grad_ckpt=False), world)
    f = ckpt_layers / layers if st.grad_ckpt else 0.0
    mfu = 1 / (f / on + (1 - f) / off)
    mfu *= 1 - (1 - OFFLOAD_ACTIVATIONS_SPEED) * offload_layers / layers
    mfu *= TILED_MLP_SPEED if tiled else 1.0
    if kept_attention and f:
        mfu *= KEPT_ATTENTION_SPEED / (1 - f * kept_attention)
    return mfu, source if f == 1 else (source_off if f == 0 else f"{source}; {source_off}: by the layer")


def host_memory() -> Optional[float]:
    """This machine's memory (MemTotal of /proc/meminfo, bytes); None where there is none to read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None
