"""The speed model, torch-free: MFU per strategy, from zerotune's own measurements where there
are any. Tokens/s per GPU = MFU x peak FLOP/s / training FLOPs per token (core/flops.py).
MEASURED holds zerotune's own MFUs (benchmarks/results/); EFFICIENCY the first calibration, the HF
Trainer peer on one H100 80GB (2026-11-24), whose values marked "assumed" were never measured.
Checkpointing and offloading by the layer scale these (core/layers.py); docs/plan_vs_measured.md
compares estimates with measurements.
"""
from __future__ import annotations

FUSED_LOSS_SPEED = 0.96            # its tokens/s relative to the plain loss (measured 0.94-0.97, H200)
OFFLOAD_ACTIVATIONS_SPEED = 0.9    # train.offload_activations, every layer: ASSUMED (not measured), a copy each way
# train.recompute_attention: false: selective checkpointing's dispatch per op in the forward and the
# recompute, beside the attention forward it saves (core/flops.py attention_forward_share). Calibrated
# on LoRA 8B at 32k tokens, liger's kernels, one H100, 2026-12-06 (benchmarks/results/raw/2026-12-06-h100-callC/):
# 27 of 32 layers checkpointed keeping attention vs 26 recomputing it, by this model 1.096x, measured
# 6,710 / 6,260 tok/s = 1.072x.
KEPT_ATTENTION_SPEED = 0.98
TILED_MLP_SPEED = 0.97             # train.tiled_mlp: ASSUMED (not measured), the MLP's forward once more a layer
# MFU per strategy on one GPU, zerotune's own path through `zerotune train` (benchmarks/bench.py,
# one H200, 2026-11-27, 1B mbs 8 / 8B mbs 4, seq 2048, chunked loss), gradient checkpointing on
# and off. Keys: (method, zero, offload optimizer, offload params, gradient checkpointing).
MEASURED = {
    ("full", 3, False, False, True): (0.265, "measured: zerotune, 1B ZeRO-3 mbs 8"),
    ("full", 3, False, False, False): (0.309, "measured: zerotune, 1B ZeRO-3 mbs 8, no checkpointing"),
    ("full", 2, False, False, False): (0.340, "measured: zerotune, 1B ZeRO-2 mbs 8, no checkpointing"),
    ("full", 1, False, False, False): (0.344, "measured: zerotune, 1B ZeRO-1 mbs 8, no checkpointing"),
    ("full", 0, False, False, False): (0.352, "measured: zerotune, 1B ZeRO-0 mbs 8, no checkpointing"),
    # checkpointing on at ZeRO 0-2: the no-checkpointing figure / 1.166, the ratio measured at ZeRO-3
    ("full", 2, False, False, True): (0.292, "derived: ZeRO-2 without checkpointing / 1.166"),
    ("full", 1, False, False, True): (0.295, "derived: ZeRO-1 without checkpointing / 1.166"),
    ("full", 0, False, False, True): (0.302, "derived: ZeRO-0 without checkpointing / 1.166"),
    ("lora", 0, False, False, True): (0.361, "measured: zerotune, LoRA r16 8B mbs 4"),
    ("lora", 0, False, False, False): (0.490, "measured: zerotune, LoRA r16 8B mbs 4, no checkpointing"),
    ("qlora", 0, False, False, True): (0.341, "measured: zerotune, QLoRA r16 8B mbs 4"),
    ("qlora", 0, False, False, False): (0.456, "measured: zerotune, QLoRA r16 8B mbs 4, no checkpointing"),
}
# Older calibration (the HF Trainer peer on one H100, 2026-11-24), with checkpointing; used where
# MEASURED has no entry (no checkpointing: x NO_CHECKPOINTING).
EFFICIENCY = {
    ("full", 3, False, False): (0.221, "measured: peer, 1B ZeRO-3 mbs 8 seq 2048"),
    ("full", 3, True, True): (0.118, "measured: peer, 1B ZeRO-3 + offload optimizer and params"),
    ("full", 3, True, False): (0.16, "assumed: between ZeRO-3 and ZeRO-3 + offload all"),
    ("full", 2, True, False): (0.16, "assumed: as ZeRO-3 + offload optimizer"),
    ("full", 1, True, False): (0.16, "assumed: as ZeRO-3 + offload optimizer"),
    ("full", 2, False, False): (0.221, "assumed: as ZeRO-3 on one GPU"),
    ("full", 1, False, False): (0.221, "assumed: as ZeRO-3 on one GPU"),
    ("full", 0, False, False): (0.221, "assumed: as ZeRO-3 on one GPU"),
    ("lora", 0, False, False): (0.297, "measured: peer, LoRA r16 8B mbs 4"),
    ("lora", 3, False, False): (0.22, "assumed: LoRA with the frozen base gathered per layer"),
    ("qlora", 0, False, False): (0.237, "measured: peer, QLoRA r16 8B NF4 mbs 4"),
}
ZERO3_MULTI_GPU = 0.9   # assumed: ZeRO-3 moves 1.5x the bytes of ZeRO-1/2 (ZeRO paper, sec. 7)
NO_CHECKPOINTING = 4 / 3  # recomputation costs one more forward: 8N instead of 6N FLOPs per token


def efficiency(st, world: int) -> tuple[float, str]:
    """(MFU, its source) of a core.memory.Strategy on `world` GPUs: MEASURED where zerotune measured
    it, else the older EFFICIENCY calibration (x NO_CHECKPOINTING without checkpointing)."""
    method = st.method if st.method in ("full", "lora", "qlora") else "lora"
    key = (method, st.zero, st.offload_optimizer, st.offload_params)
    if (*key, st.grad_ckpt) in MEASURED:
        mfu, source = MEASURED[(*key, st.grad_ckpt)]
    else:
        mfu, source = EFFICIENCY.get(key, (0.15, "assumed: no measurement for this strategy"))
        if not st.grad_ckpt:
            mfu *= NO_CHECKPOINTING
    if st.zero == 3 and world > 1:
        mfu *= ZERO3_MULTI_GPU
    return mfu, source
